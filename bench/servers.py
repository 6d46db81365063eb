"""Server subprocesses: start one on a free local port, wait until it is ready, stop it.

Each server writes its log to a file (a pipe nobody reads would stall it), and its
tail is printed when it fails to start.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import httpx

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> bool:
    """Whether ``url`` answers 200 within ``timeout_s`` (polled; False at once if not ``alive``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return False


class ServerProcess:
    """``with ServerProcess(...) as server:`` runs ``args`` after ``python`` (this interpreter,
    unless another environment's: bench/rerank.py serves Infinity from its own virtualenv)."""

    def __init__(
        self,
        name: str,
        args: list[str],
        env: dict[str, str],
        ready_path: str,
        log_dir: Path,
        timeout_s: float,
        cwd: Path = ROOT,
        python: str = sys.executable,
    ) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [python, *[a.format(port=self.port) for a in args]]
        self.env = {**os.environ, **env}
        self.ready_path = ready_path
        self.log_path = log_dir / f"{name}.log"
        self.timeout_s = timeout_s
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(self.args, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        process = self.process
        if not wait_ready(self.url + self.ready_path, self.timeout_s, alive=lambda: process.poll() is None):
            why = f"exited with {process.returncode}" if process.poll() is not None else "was not ready"
            self._fail(f"{why} within {self.timeout_s:.0f}s")
        return self

    def _fail(self, why: str) -> None:
        self.stop()
        tail = self.log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{self.name} server {why}; last lines of {self.log_path}:\n{tail}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
