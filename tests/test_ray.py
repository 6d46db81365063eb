"""Tessera on a real local Ray cluster: two nodes on 127.0.0.1, one replica on each, Serve's
proxy and Tessera's gateway in front. What one process cannot show: requests spread over
replicas stay correct, model management and metrics hold for the whole cluster, neither a
rolling update nor a replica killed under load costs a client a failed request, and a
streamed answer comes through the gateway as events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'tessera[ray]')")
serve = pytest.importorskip("ray.serve")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every address on 127.0.0.1

from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.state import list_actors  # noqa: E402

from app.ray_serve import build  # noqa: E402

pytestmark = pytest.mark.ray
REPLICA_CLASS = "ServeReplica:tessera:Tessera"
TEXTS = [f"sample text number {i} about {w}" for i, w in enumerate(["films", "cars", "food", "rain"] * 5)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _app(local_catalog: Path, **args: Any) -> Any:
    env = {"TESSERA_CATALOG": str(local_catalog), "TESSERA_HUB": "offline", "HF_HUB_OFFLINE": "1"}
    env.update(args.pop("env", {}))
    return build({"num_replicas": 2, "num_cpus": 1, "max_replicas_per_node": 1, "env": env, **args})


# How long the fixture waits for the cluster to serve: seconds on an idle machine, minutes on
# a busy one. Serve's own waits for its proxies are a fixed 60 s (HTTP_PROXY_TIMEOUT, no
# setting): past them the fixture keeps waiting, up to this bound, for an answer through them.
READY_BOUND_S = 300
# Serve's checks of a proxy (5 s to answer "ready", 10 s to answer a health check, by default):
# a proxy slower than that is marked unhealthy, killed and restarted, again and again on a
# busy machine. Set before the cluster starts, so that every Ray process inherits them (the
# Serve controller, which runs the checks, included).
SERVE_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}


def wait_until_serving(url: str, deadline: float) -> None:
    """Until the app answers /health/ready 200 through Serve's proxy, or the deadline passes."""
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            ready = httpx.get(f"{url}/health/ready", timeout=10)
            if ready.status_code == 200:
                return
            last = f"{ready.status_code} {ready.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(1)
    raise TimeoutError(f"the cluster did not serve within {READY_BOUND_S} s (last: {last})")


@pytest.fixture(scope="module")
def cluster_url(local_catalog: Path) -> Iterator[str]:
    deadline = time.monotonic() + READY_BOUND_S
    with pytest.MonkeyPatch.context() as env:
        for name, value in SERVE_ENV.items():
            env.setenv(name, value)
        # The dashboard serves the state API that lists the replicas and their nodes.
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": True})
        cluster.add_node(num_cpus=2)
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        try:
            while True:  # a start that timed out left the controller up: the next call joins it
                try:
                    serve.start(http_options={"host": "127.0.0.1", "port": port})
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise
            with contextlib.suppress(TimeoutError):  # the app runs; only the proxies were slow
                serve.run(_app(local_catalog), name="tessera", route_prefix="/")
            wait_until_serving(url, deadline)
            yield url
        finally:
            serve.shutdown()
            ray.shutdown()
            cluster.shutdown()


def replicas() -> list[Any]:
    return list_actors(filters=[("class_name", "=", REPLICA_CLASS), ("state", "=", "ALIVE")])


def requests_counted(metrics: str, route: str) -> dict[str, float]:
    """tessera_requests_total for a route, summed per replica label."""
    per: dict[str, float] = {}
    for m in re.finditer(r"^tessera_requests_total\{([^}]*)\} (\S+)$", metrics, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("route") == route and labels.get("status") == "200":
            per[labels["replica"]] = per.get(labels["replica"], 0) + float(m.group(2))
    return per


# A translation forced to a long output: it holds its replica for many decoder steps.
LONG = {"model": "marian-en-de", "parameters": {"min_length": 64, "max_new_tokens": 64}}


def reference(url: str) -> dict[tuple[str, str], Any]:
    with httpx.Client(base_url=url, timeout=60) as c:
        out = {}
        for text in TEXTS:
            out[("/classify", text)] = c.post("/classify", json={"inputs": text}).json()["results"]
            out[("/embed", text)] = c.post("/embed", json={"inputs": text}).json()["embeddings"]
            out[("/translate", text)] = c.post("/translate", json={"inputs": text, **LONG}).json()["results"]
        return out


Result = tuple[str, str, int, Any, int]  # route, text, status, body, attempts the gateway made


async def mixed_load(
    url: str,
    n: int,
    concurrency: int,
    answered: list[int] | None = None,
    routes: tuple[str, ...] = ("/classify", "/embed"),
) -> list[Result]:
    """n requests, taking ``routes`` in turn over TEXTS, at most ``concurrency`` at once;
    ``answered[0]`` counts the answers as they come."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:

        async def one(i: int) -> Result:
            route, text = routes[i % len(routes)], TEXTS[i % len(TEXTS)]
            async with gate:
                r = await c.post(route, json={"inputs": text, **(LONG if route == "/translate" else {})})
            if answered is not None:
                answered[0] += 1
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text
            return route, text, r.status_code, body, int(r.headers.get("x-tessera-attempts", 1))

        return await asyncio.gather(*(one(i) for i in range(n)))


def assert_all_correct(results: list[Result], expected: dict[tuple[str, str], Any]) -> None:
    failures = [(route, status, body) for route, _, status, body, _ in results if status != 200]
    assert not failures, failures[:3]
    for route, text, _, body, _ in results:
        if route == "/translate":
            assert body["results"] == expected[(route, text)]
        elif route == "/classify":
            got, want = body["results"][0][0], expected[(route, text)][0][0]
            assert got["label"] == want["label"] and got["score"] == pytest.approx(want["score"], abs=1e-4)
        else:
            assert body["embeddings"][0] == pytest.approx(expected[(route, text)][0], abs=1e-4)


class Background:
    """Mixed load from a thread while the test does something to the cluster."""

    def __init__(self, url: str, n: int, concurrency: int, routes: tuple[str, ...] = ("/classify", "/embed")) -> None:
        self.results: list[Result] = []
        self.answered = [0]
        self.thread = threading.Thread(
            target=lambda: self.results.extend(asyncio.run(mixed_load(url, n, concurrency, self.answered, routes)))
        )

    def __enter__(self) -> Background:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(timeout=300)
        assert not self.thread.is_alive(), "the load did not finish"


def test_two_replicas_on_distinct_nodes_answer_200_mixed_concurrent_requests_correctly(cluster_url: str) -> None:
    alive = replicas()
    assert len(alive) == 2 and len({a.node_id for a in alive}) == 2
    expected = reference(cluster_url)
    results = asyncio.run(mixed_load(cluster_url, 200, 32))
    assert_all_correct(results, expected)


def test_metrics_count_the_requests_of_every_replica(cluster_url: str) -> None:
    before = requests_counted(httpx.get(f"{cluster_url}/metrics").text, "/classify")
    results = asyncio.run(mixed_load(cluster_url, 120, 32))
    assert all(r[2] == 200 for r in results)
    after = requests_counted(httpx.get(f"{cluster_url}/metrics").text, "/classify")
    assert len(after) == 2, after  # both replicas answered, each under its own label
    assert sum(after.values()) - sum(before.values()) == 60


def test_a_model_loaded_through_the_api_is_loaded_on_every_replica(cluster_url: str) -> None:
    with httpx.Client(base_url=cluster_url, timeout=120) as c:
        loaded = c.post("/models/bert-clf/load").json()
        assert len(loaded["replicas"]) == 2 and {s["state"] for s in loaded["replicas"].values()} == {"loaded"}
        assert {c.get("/models/bert-clf").json()["state"] for _ in range(10)} == {"loaded"}
        unloaded = c.post("/models/bert-clf/unload").json()
        assert {s["state"] for s in unloaded["replicas"].values()} == {"not_loaded"}
        assert {c.get("/models/bert-clf").json()["state"] for _ in range(10)} == {"not_loaded"}
        assert c.post("/models/no-such-model/load").status_code == 404


def test_a_streamed_translation_reads_through_the_gateway_as_server_sent_events(cluster_url: str) -> None:
    body = {"inputs": ["hello world", "good morning"], "model": "marian-en-de"}
    with httpx.Client(base_url=cluster_url, timeout=120) as c:
        plain = c.post("/translate", json=body)
        assert plain.status_code == 200, plain.text
        with connect_sse(c, "POST", "/translate", json={**body, "stream": True}) as source:
            assert source.response.status_code == 200
            assert source.response.headers["content-type"].startswith("text/event-stream")
            assert "content-length" not in source.response.headers  # relayed as it came, not read whole
            events = [(event.event, json.loads(event.data)) for event in source.iter_sse()]
        # An error before the stream begins is the ordinary error answer, through the gateway too.
        missing = c.post("/translate", json={"inputs": "x", "model": "no-such-model", "stream": True})
    assert events[-1] == ("done", {"model": "marian-en-de"})
    finals = sorted((data for kind, data in events if kind == "final"), key=lambda f: f["index"])
    assert [(f["index"], f["text"]) for f in finals] == [
        (i, r["translation_text"]) for i, r in enumerate(plain.json()["results"])
    ]
    assert {kind for kind, _ in events} <= {"delta", "final", "done"}
    assert missing.status_code == 404 and missing.json()["error"] == "model_not_found"


def test_the_request_id_is_answered_once(cluster_url: str) -> None:
    r = httpx.post(f"{cluster_url}/classify", json={"inputs": "hi"}, headers={"X-Request-ID": "abc-123"})
    assert r.headers.get_list("x-request-id") == ["abc-123"]
    assert len(httpx.post(f"{cluster_url}/classify", json={"inputs": "hi"}).headers.get_list("x-request-id")) == 1


def test_a_rolling_update_under_load_fails_no_request(cluster_url: str, local_catalog: Path) -> None:
    expected = reference(cluster_url)
    before = {a.actor_id for a in replicas()}
    with Background(cluster_url, 400, 8) as load:
        time.sleep(1)
        # New init arguments: Serve replaces the replicas one by one, draining each.
        serve.run(_app(local_catalog, env={"TESSERA_LOG_LEVEL": "DEBUG"}), name="tessera", route_prefix="/")
    assert_all_correct(load.results, expected)
    assert not before & {a.actor_id for a in replicas()}


def test_a_replica_killed_under_load_fails_no_request(cluster_url: str) -> None:
    expected = reference(cluster_url)
    victim = replicas()[0]
    # Long translations among the short requests: whenever the replica is killed, it holds some.
    with Background(cluster_url, 400, 8, ("/classify", "/translate", "/embed", "/translate")) as load:
        # Once answers flow (a slow machine takes a while), both replicas hold requests.
        deadline = time.monotonic() + 120
        while load.answered[0] < 16 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(victim.pid, signal.SIGKILL)  # a crash: no drain, the requests it holds are lost with it
    assert_all_correct(load.results, expected)
    # The requests the dead replica held were answered by the other one, on the gateway's retry.
    assert any(attempts > 1 for *_, attempts in load.results)

    def replaced() -> bool:
        alive = {a.actor_id for a in replicas()}
        return len(alive) == 2 and victim.actor_id not in alive

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not replaced():
        time.sleep(1)
    assert replaced()  # Serve started a new replica in its place


def test_the_application_builder_refuses_what_it_cannot_honour() -> None:
    with pytest.raises(ValueError, match="attempts"):
        build({"attempts": 0})  # no try at all would answer every request 503
    with pytest.raises(ValueError, match="unknown"):
        build({"gateway": 1})


def test_a_request_is_traced_through_the_gateway_and_a_replica_under_the_callers_trace(
    cluster_url: str, local_catalog: Path
) -> None:
    """The cluster redeployed with an OTLP endpoint (app/tracing.py): the gateway's span is a
    child of the caller's, its try on a replica carries the context through the Serve handle,
    and the replica's spans (route, engine, queue, linked batch) go below it."""
    from tests.otlp_receiver import serve_receiver

    receiver_running = serve_receiver()
    receiver = next(receiver_running)
    try:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
        serve.run(_app(local_catalog, env=env), name="tessera", route_prefix="/")
        wait_until_serving(cluster_url, time.monotonic() + READY_BOUND_S)
        trace_id, caller = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
        answer = httpx.post(
            f"{cluster_url}/embed",
            json={"inputs": ["a traced text", "another"], "model": "bert-embed"},
            headers={"traceparent": f"00-{trace_id}-{caller}-01"},
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        expected = {"POST /embed", "tessera.replica", "tessera.engine", "tessera.engine.request", "tessera.queue"}
        deadline = time.monotonic() + 120  # the processes export every 100 ms: a bound, not a measure
        while time.monotonic() < deadline:
            names = [s.name for s in receiver.of_trace(trace_id)]
            if expected <= set(names) and names.count("POST /embed") == 2:
                break
            time.sleep(0.2)
        spans = receiver.of_trace(trace_id)
        print(f"\nray:\n{receiver.tree(trace_id)}")
        by_process = {(s.name, s.resource["tessera.process"]): s for s in spans}
        gateway = by_process[("POST /embed", "gateway")]
        attempt = by_process[("tessera.replica", "gateway")]
        replica = by_process[("POST /embed", "replica")]
        hop = by_process[("tessera.engine", "replica")]
        engine = by_process[("tessera.engine.request", "replica")]
        assert gateway.parent_id == caller
        assert answer.headers["traceparent"] == f"00-{trace_id}-{gateway.span_id}-01"
        assert attempt.parent_id == gateway.span_id and attempt.attributes["tessera.attempt"] == 1
        assert replica.parent_id == attempt.span_id and replica.attributes["tessera.inputs"] == 2
        assert hop.parent_id == replica.span_id and engine.parent_id == hop.span_id
        assert by_process[("tessera.queue", "replica")].parent_id == engine.span_id
        while time.monotonic() < deadline and not any(
            (trace_id, engine.span_id) in s.links for s in receiver.named("tessera.batch")
        ):
            time.sleep(0.2)
        assert any((trace_id, engine.span_id) in s.links for s in receiver.named("tessera.batch"))
    finally:
        receiver_running.close()
