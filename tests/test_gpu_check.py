"""bench/gpu_check.py's dry run: the GPU check's own code (models, the default process
layout, served against offline, the out-of-memory requests, the memory budget, the table)
run on the CPU with tiny models, so that the script a lent GPU machine runs cannot rot."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = (
    "classify float16 c=64: served/offline",
    "classify bfloat16 c=64: served/offline",
    "classify float32 c=64: served/offline",
    "seq2seq (static) c=16: served/offline",
    "OOM: 16-text batches, halved",
    "memory budget",
)


def test_gpu_check_dry_run_serves_every_check_on_the_cpu() -> None:
    command = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--quick"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # it stops its servers on SIGTERM
        output, _ = process.communicate(timeout=60)
        raise AssertionError(f"the dry run took over 600 s:\n{output[-3000:]}") from None
    assert process.returncode == 0, output[-3000:]
    table = output[output.index("== GPU check, dry run on the CPU") :]
    lines = table.splitlines()
    for row in ROWS:
        found = [line for line in lines if line.startswith(row)]
        assert found, f"no row {row!r} in:\n{table}"
    verdicts = {row: next(line for line in lines if line.startswith(row)).split()[-1] for row in ROWS}
    assert verdicts[ROWS[0]] == verdicts[ROWS[1]] == "CPU"  # "skipped: CPU"
    assert verdicts["OOM: 16-text batches, halved"] == "only"  # "GPU only": no OOM on a CPU
    assert verdicts["memory budget"] == "met"
    assert "32/32 answered" in next(line for line in lines if line.startswith("OOM:"))
    assert "no mechanism failed" in table
