"""The real thing: `python -m app serve` as a uvicorn process, over a real socket."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
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
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert proc.returncode in (0, -signal.SIGTERM)
    assert "model minilm-sentiment unloaded" in output
    assert "Traceback" not in output
