"""Overload and soak, against a real server process with a small queue: a storm of requests
gets only answers (200, or 429 with Retry-After), never a dropped connection or a 5xx, and
leaves nothing queued; five identical storms leave the process's memory on a plateau, and
so do five storms of mixed request shapes (bench/mixed_soak.py's) in every process of the
default layout.

The load comes from the benchmark's own client (bench/load.py: a minimal HTTP/1.1 client
on uvloop, about 0.06 ms of CPU per request), so that generating it takes little of the
cores the server runs on.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import httpx
import pytest

from app import heap
from tests.conftest import server_process

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from load import Storm, storm
from mixed_soak import bodies, mixed_storm, server_processes

pytestmark = pytest.mark.soak

REQUESTS, CONCURRENCY, QUEUE = 5000, 128, 64
# A queue of 64 takes requests of at most 64 inputs (the server refuses to start otherwise).
LIMITS = {"TESSERA_MAX_QUEUE_ITEMS": str(QUEUE), "TESSERA_MAX_INPUTS_PER_REQUEST": str(QUEUE)}
BODY = {"inputs": "the quick brown fox jumps over the lazy dog near the river bank", "model": "bert-clf"}
# After the first storm the allocator holds what a storm needs; five storms in a row on the
# tiny classifier read 446, 446, 447, 447, 447 MB here (and 544-557 MB on MiniLM), so growth
# past 5 % would be a leak, not the allocator settling.
PLATEAU = 1.05


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def check(result: Storm) -> None:
    assert set(result.statuses) <= {200, 429}, result
    assert result.statuses.get(200, 0) > 0 and result.statuses.get(429, 0) > 0, result  # it did overload
    assert sum(result.statuses.values()) == REQUESTS
    assert result.without_retry_after == 0
    assert result.connection_errors == 0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc (Linux)")
def test_storms_get_only_200_or_429_with_retry_after_and_memory_plateaus(local_catalog: Path) -> None:
    env = {"TESSERA_CATALOG": str(local_catalog), **LIMITS}
    with server_process(env) as server:
        base = server.url
        assert httpx.post(f"{base}/classify", json=BODY, timeout=60).status_code == 200
        # The one process, or the engine and fronts (not the supervisor, which runs no request).
        processes = server_processes(server.process.pid)
        after: dict[str, list[float]] = {role: [] for role in processes}
        for _ in range(5):
            check(storm(base, "/classify", BODY, requests=REQUESTS, concurrency=CONCURRENCY))
            assert httpx.get(f"{base}/models/bert-clf", timeout=10).json()["queue_depth"] == 0
            for role, pid in processes.items():
                after[role].append(rss_mb(pid))
        assert httpx.get(f"{base}/health/live", timeout=10).status_code == 200
    for role, rss in after.items():
        print(f"{role}: RSS after each storm (MB): {', '.join(f'{mb:.0f}' for mb in rss)}")
        assert rss[-1] <= rss[0] * PLATEAU, (role, rss)


# Mixed shapes (1-8 texts of 5-300 words per request) on MiniLM, in the default layout: each
# batch's activations of new sizes fragmented the engine's heap (535, 681, 737, 803, 895,
# 918 MB: +25 % from storm 2 to 5), memory malloc kept but nothing used. A process that runs
# models now hands malloc's free pages back once it goes quiet (app/heap.py), so RSS is read
# once the server has been quiet for a while: storms 2-5 then read 578, 593, 594, 595 MB
# (+3 %; this test: 605, 591, 561, 558, 562). Untrimmed, this test read 656, 715, 755, 794,
# 798 MB (+12 %; the benchmark +25 %, one process +38 %): a leak, or fragmentation back,
# grows by tens of MB a storm.
MIXED_REQUESTS, MIXED_GROWTH = 3000, 1.06


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc (Linux)")
def test_storms_of_mixed_shapes_leave_every_process_on_a_plateau(local_catalog: Path) -> None:
    env = {"TESSERA_CATALOG": str(local_catalog), **LIMITS, "TESSERA_WORKERS": "1"}
    with server_process(env) as server:
        base, port = server.url, int(server.url.rsplit(":", 1)[1])
        body = {"inputs": ["warm up"], "model": "minilm-sentiment"}
        assert httpx.post(f"{base}/classify", json=body, timeout=60).status_code == 200
        processes = server_processes(server.process.pid)
        assert {"engine", "front-0"} <= processes.keys(), processes
        after: dict[str, list[float]] = {role: [] for role in processes}
        for n in range(5):
            payloads = bodies(random.Random(n), MIXED_REQUESTS, "minilm-sentiment", 8, (5, 300))
            result = mixed_storm(port, payloads, CONCURRENCY)
            assert set(result.statuses) <= {200, 429} and result.dropped == 0, result
            assert result.statuses.get(200, 0) > 0, result
            time.sleep(4 * heap.TRIM_QUIET_S)  # quiet: malloc's free pages handed back
            for role, pid in processes.items():
                after[role].append(rss_mb(pid))
        assert httpx.get(f"{base}/health/live", timeout=10).status_code == 200
    for role, rss in after.items():
        print(f"{role}: RSS after each storm (MB): {', '.join(f'{mb:.0f}' for mb in rss)}")
    for role, rss in after.items():  # storm 1 warms up: the plateau is storms 2-5
        assert max(rss[1:]) <= rss[1] * MIXED_GROWTH, (role, rss)
