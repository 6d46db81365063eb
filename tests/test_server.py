"""The real thing: `python -m app serve` as a uvicorn process, over a real socket."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, server_process


@pytest.fixture
def server(catalog_path: Path, layout_env: dict[str, str]) -> Iterator[ServerProcess]:
    # A drain long enough for the slow requests below on a busy machine (bounded all the same).
    env = {"TESSERA_CATALOG": str(catalog_path), "TESSERA_DRAIN_TIMEOUT_S": "150", **layout_env}
    with server_process(env) as running:
        yield running


def test_uvicorn_process_serves_and_shuts_down_cleanly(server: ServerProcess) -> None:
    base, proc = server.url, server.process
    r = httpx.post(f"{base}/classify", json={"inputs": "I love this movie"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["results"][0][0]["label"] == "positive"
    assert r.headers["x-request-id"]
    echoed = httpx.get(f"{base}/health/live", headers={"X-Request-ID": "trace-123"})
    assert echoed.headers["x-request-id"] == "trace-123"

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    output = server.output()  # drained: a rolling update reads a clean stop
    assert "drained: every request in flight finished" in output
    assert "model minilm-sentiment unloaded" in output
    assert "Traceback" not in output


@pytest.mark.faults
def test_sigterm_lets_requests_in_flight_finish_refuses_new_ones_and_exits_0(server: ServerProcess) -> None:
    base, proc = server.url, server.process
    assert httpx.post(f"{base}/models/marian-en-de/load", timeout=60).status_code == 200
    # Long generations (the tiny Marian's 511 steps, beams of 2): in flight for seconds.
    slow = {
        "inputs": ["hello there"] * 4,
        "model": "marian-en-de",
        "parameters": {"max_new_tokens": 600, "min_length": 600, "num_beams": 2},
        "timeout_s": 170,  # past the default 60 s on a busy machine
    }
    with ThreadPoolExecutor(3) as pool:
        in_flight = [pool.submit(httpx.post, f"{base}/translate", json=slow, timeout=180) for _ in range(3)]
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
    assert proc.wait(timeout=180) == 0
    output = server.output()
    assert "SIGTERM: draining (" in output and "drained: every request in flight finished" in output
