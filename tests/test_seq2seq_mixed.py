"""bench/seq2seq_mixed.py: its client reads the /translate event stream as specified, and
its smoke run (a one-layer Marian, a few requests per cell) serves every request through
the real server, streamed or not, so that the scenario a quiet machine runs cannot rot."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from translate_client import EventStream

ROOT = Path(__file__).resolve().parents[1]


def test_event_stream_yields_each_event_a_blank_line_completes() -> None:
    lines = [
        "event: delta",
        'data: {"index": 0, "text": "Das", "tokens": 1}',
        "",
        "event: final",
        'data: {"index": 0, "text": "Das Haus", "truncated": false}',
        "",
        "event: done",
        "data: {}",
    ]
    stream = EventStream()
    events = [got for line in lines if (got := stream.feed(line)) is not None]
    assert events == [
        ("delta", '{"index": 0, "text": "Das", "tokens": 1}'),
        ("final", '{"index": 0, "text": "Das Haus", "truncated": false}'),
    ]
    assert stream.close() == ("done", "{}")  # a stream may end without the last blank line
    assert stream.close() is None


def test_seq2seq_mixed_smoke_run_answers_every_request() -> None:
    command = [sys.executable, str(ROOT / "bench" / "seq2seq_mixed.py"), "--small", "--requests", "2"]
    command += ["--concurrency", "1,2"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # it stops its server on SIGTERM
        output, _ = process.communicate(timeout=60)
        raise AssertionError(f"the smoke run took over 600 s:\n{output[-3000:]}") from None
    assert process.returncode == 0, output[-3000:]
    assert "this checkout: streaming " in output
    table = output[output.index("server ") :].splitlines()
    rows = [line.split() for line in table if line.startswith("this checkout")]
    assert [(r[2], r[3], r[4]) for r in rows] == [
        ("greedy", "1", "2"),
        ("greedy", "2", "2"),
        ("beams", "1", "2"),
        ("beams", "2", "2"),
    ]
    assert all(r[-1] == "0" for r in rows), "\n".join(table)  # no failed request
