"""The real thing: `python -m app serve` as a uvicorn process, over a real socket."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(catalog_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = free_port()
    env = {**os.environ, "TESSERA_CATALOG": str(catalog_path), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/health/live", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            pytest.fail("server did not come up within 60 s")
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_uvicorn_process_serves_and_shuts_down_cleanly(server: tuple[str, subprocess.Popen[str]]) -> None:
    base, proc = server
    r = httpx.post(f"{base}/classify", json={"inputs": "I love this movie"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["results"][0][0]["label"] == "positive"
    assert r.headers["x-request-id"]
    echoed = httpx.get(f"{base}/health/live", headers={"X-Request-ID": "trace-123"})
    assert echoed.headers["x-request-id"] == "trace-123"

    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0  # drained: a rolling update reads a clean stop
    assert "drained: every request in flight finished" in output
    assert "model minilm-sentiment unloaded" in output
    assert "Traceback" not in output


def test_sigterm_lets_requests_in_flight_finish_refuses_new_ones_and_exits_0(
    server: tuple[str, subprocess.Popen[str]],
) -> None:
    base, proc = server
    assert httpx.post(f"{base}/models/marian-en-de/load", timeout=60).status_code == 200
    # Long generations (the tiny Marian's 511 steps, beams of 2): in flight for seconds.
    slow = {
        "inputs": ["hello there"] * 4,
        "model": "marian-en-de",
        "parameters": {"max_new_tokens": 600, "min_length": 600, "num_beams": 2},
    }
    with ThreadPoolExecutor(3) as pool:
        in_flight = [pool.submit(httpx.post, f"{base}/translate", json=slow, timeout=120) for _ in range(3)]
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/models/marian-en-de").json()["queue_depth"] < 12:
            assert time.monotonic() < deadline, "the requests never reached the model"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # the signal is handled between two turns of the event loop

        refused = httpx.post(f"{base}/classify", json={"inputs": "too late"}, timeout=10)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "draining"
        assert refused.headers["retry-after"] == "1" and refused.headers["connection"] == "close"
        ready = httpx.get(f"{base}/health/ready", timeout=10)
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        assert httpx.get(f"{base}/health/live", timeout=10).status_code == 200

        answers = [future.result() for future in in_flight]
    assert [a.status_code for a in answers] == [200, 200, 200]
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "SIGTERM: draining (" in output and "drained: every request in flight finished" in output
