"""bench/rerank.py (Tessera's rerank against Infinity's): its requests and its ranking check, and
its dry run without Infinity or wrk (the cross-encoder built, every Tessera catalog checked,
Tessera's torch backend served, each prepared body answered best first), so that the bench a
quiet machine runs cannot rot."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from rerank import DOCUMENTS, agreement, make_requests

ROOT = Path(__file__).resolve().parents[1]


def test_each_request_is_one_short_query_and_sixteen_documents_the_same_every_run() -> None:
    requests = make_requests(8)
    assert requests == make_requests(8)
    assert all(len(documents) == DOCUMENTS for _, documents in requests)
    assert all(5 <= len(query.split()) <= 15 for query, _ in requests)
    assert len({d for _, documents in requests for d in documents}) == 8 * DOCUMENTS


def test_agreement_counts_requests_ranked_alike_the_same_best_and_the_largest_logit_difference() -> None:
    first = [float(i) for i in range(DOCUMENTS)]
    swapped = [*first[:-2], first[-1], first[-2]]  # the two best documents change places
    checks = {
        "tessera torch": {"logits": [first, first]},
        "close": {"logits": [[x + 0.001 for x in first], first]},
        "swapped": {"logits": [first, swapped]},
    }
    got = agreement(checks)
    spread = float(DOCUMENTS - 1)
    assert got["close"] == {"same_order": "2/2", "same_best": "2/2", "max_logit_diff": 0.001, "spread": spread}
    assert got["swapped"] == {"same_order": "1/2", "same_best": "1/2", "max_logit_diff": 1.0, "spread": spread}


def test_rerank_bench_dry_run_serves_tessera_without_infinity(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-infinity")
    command = [sys.executable, str(ROOT / "bench" / "rerank.py"), "--dry-run"]
    command += ["--infinity", missing, "--infinity-bt", missing, "--out", str(tmp_path / "rerank.json")]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # it stops its server on SIGTERM
        output, _ = process.communicate(timeout=60)
        raise AssertionError(f"the dry run took over 600 s:\n{output[-3000:]}") from None
    assert process.returncode == 0, output[-3000:]
    assert "dry run: tessera torch answered 32 requests of 16 documents, best first" in output
    assert "default activation tessera torch sigmoid" in output
    assert (tmp_path / "rerank.json").exists()
