"""Distributed tracing (app/tracing.py, docs/tracing.md) against a real OTLP/HTTP receiver:
`python -m app serve` in either layout, configured by the standard OTEL_* variables, sends
the spans of a request made with a caller's ``traceparent``, from the HTTP route through the
engine hop, the queue and the batch to the forward pass; off, it sends nothing."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app import tracing
from app.engine import core as engine_core
from tests.conftest import ServerProcess, core_of, serve, server_process
from tests.otlp_receiver import ReceivedSpan, Receiver, serve_receiver

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
GENERATE_TRACE = "5af7651916cd43dd8448eb211c80319d"
UNSAMPLED_TRACE = "6bf92f3577b34da6a3ce929d0e0e4737"
SERVER, CLIENT = 2, 3  # OTLP span kinds


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    yield from serve_receiver()


def traced_env(receiver: Receiver, catalog: Path, layout_env: dict[str, str]) -> dict[str, str]:
    return {
        **layout_env,
        "TESSERA_CATALOG": str(catalog),
        "TESSERA_HUB": "offline",
        "TESSERA_LOG_FORMAT": "json",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_SERVICE_NAME": "tessera-test",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }


def stop(server: ServerProcess) -> None:
    """SIGTERM, as an orchestrator stops it: every process flushes its spans on the way out."""
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(120) == 0, server.output()[-3000:]


def one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    found = [span for span in spans if span.name == name]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def test_a_request_is_traced_from_the_route_to_the_forward_pass_under_the_callers_trace(
    receiver: Receiver, local_catalog: Path, layout_env: dict[str, str]
) -> None:
    fronts = layout_env["TESSERA_WORKERS"] != "0"
    traceparent = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    with server_process(traced_env(receiver, local_catalog, layout_env)) as server:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            answer = http.post(
                "/embed",
                json={"inputs": ["a first text", "a second one"], "model": "bert-embed"},
                headers={"traceparent": traceparent, "tracestate": "vendor=1"},
            )
            assert answer.status_code == 200, answer.text
            # Another request, in a trace of its own (no traceparent), and one that shares
            # batches with others: each batch links to every request it served.
            untraced = http.post("/embed", json={"inputs": "alone", "model": "bert-embed"})
            assert untraced.status_code == 200
            texts = [f"text {i}" for i in range(6)]
            together: list[httpx.Response] = []
            threads = [
                threading.Thread(
                    target=lambda t=t: together.append(http.post("/embed", json={"inputs": t, "model": "bert-embed"}))
                )
                for t in texts
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert [r.status_code for r in together] == [200] * len(texts)
            assert http.get("/health/live").headers.get("traceparent") is None  # probes: no trace
            # A translation: continuous batching, whose generation is one span with its steps.
            translated = http.post(
                "/translate",
                json={"inputs": "hello world", "model": "marian-en-de"},
                headers={"traceparent": f"00-{GENERATE_TRACE}-{CALLER_SPAN}-01"},
            )
            assert translated.status_code == 200, translated.text
            # A caller that does not sample: the context goes on (the answer names it), no span is sent.
            unsampled = http.post(
                "/embed",
                json={"inputs": "not sampled", "model": "bert-embed"},
                headers={"traceparent": f"00-{UNSAMPLED_TRACE}-{CALLER_SPAN}-00"},
            )
            assert unsampled.headers["traceparent"].startswith(f"00-{UNSAMPLED_TRACE}-")
            assert unsampled.headers["traceparent"].endswith("-00")
        stop(server)
        logs = server.output()

    # The answer names the request's trace: the caller's, and the server span's id.
    version, trace_id, server_span_id, flags = answer.headers["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", CALLER_TRACE, "01")
    own_trace = untraced.headers["traceparent"].split("-")[1]
    assert own_trace != CALLER_TRACE

    spans = receiver.of_trace(CALLER_TRACE)
    print(f"\n{'fronts+engine' if fronts else 'one-process'}:\n{receiver.tree(CALLER_TRACE)}")
    http_span = one(spans, "POST /embed")
    hop = one(spans, "tessera.engine")
    engine = one(spans, "tessera.engine.request")
    queue = one(spans, "tessera.queue")
    load = one(spans, "tessera.model.load")  # the first request loads the model
    assert http_span.span_id == server_span_id
    assert (http_span.parent_id, http_span.kind) == (CALLER_SPAN, SERVER)
    assert (hop.parent_id, hop.kind) == (http_span.span_id, CLIENT)
    assert (engine.parent_id, engine.kind) == (hop.span_id, SERVER)
    assert queue.parent_id == engine.span_id
    assert load.parent_id == engine.span_id and load.attributes["tessera.model.state"] == "loaded"

    assert http_span.attributes["http.route"] == "/embed"
    assert http_span.attributes["http.response.status_code"] == 200
    assert http_span.attributes["tessera.model"] == "bert-embed"
    assert http_span.attributes["tessera.inputs"] == 2
    assert engine.attributes["tessera.inputs"] == 2 and engine.attributes["tessera.tokens"] > 0
    assert (
        http_span.attributes["tessera.tokens"]
        == hop.attributes["tessera.tokens"]
        == engine.attributes["tessera.tokens"]
    )
    assert not any(span.error for span in spans)

    # The batch that served it is no one's child: it links to the request's engine span.
    batches = [s for s in receiver.named("tessera.batch") if (CALLER_TRACE, engine.span_id) in s.links]
    assert len(batches) == 1
    [batch] = batches
    assert batch.parent_id == "" and batch.trace_id != CALLER_TRACE
    assert batch.attributes["tessera.batch.size"] == 2 and batch.attributes["tessera.batch.padded_tokens"] > 0
    assert "tessera.batch.lane" in batch.attributes
    forward = [s for s in receiver.named("tessera.forward") if s.parent_id == batch.span_id]
    assert len(forward) == 1 and forward[0].trace_id == batch.trace_id
    # Every batch links to each request it served (the concurrent ones included).
    engine_spans = {(s.trace_id, s.span_id) for s in receiver.named("tessera.engine.request")}
    embeds = {span for span in engine_spans if span[0] != GENERATE_TRACE}
    assert len(embeds) == 2 + len(texts)
    linked = [link for s in receiver.named("tessera.batch") for link in s.links]
    assert sorted(linked) == sorted(embeds)

    # Continuous batching: the input's generation, with its steps, below the request's span.
    generated = receiver.of_trace(GENERATE_TRACE)
    print(receiver.tree(GENERATE_TRACE))
    request = one(generated, "tessera.engine.request")
    generate = one(generated, "tessera.generate")
    assert generate.parent_id == request.span_id and generate.attributes["tessera.steps"] >= 1
    assert one(generated, "tessera.queue").parent_id == request.span_id
    assert receiver.of_trace(UNSAMPLED_TRACE) == []

    # Each process configured its own provider from the OTEL_* variables.
    processes = {s.resource["tessera.process"] for s in spans}
    assert processes == ({"front-0", "engine"} if fronts else {"server"})
    assert engine.resource["tessera.process"] == ("engine" if fronts else "server")
    assert len({s.resource["process.pid"] for s in spans}) == (2 if fronts else 1)
    assert all(s.resource["service.name"] == "tessera-test" for s in spans)
    assert all(s.resource["deployment.environment"] == "test" for s in spans)

    # The access log's JSON line of the request carries its trace.
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "tessera.access" and line.get("trace_id") == CALLER_TRACE]
    assert len(access) == 1 and access[0]["span_id"] == server_span_id


def test_tracing_off_sends_no_span_and_no_traceparent(
    receiver: Receiver, local_catalog: Path, layout_env: dict[str, str]
) -> None:
    env = {**layout_env, "TESSERA_CATALOG": str(local_catalog), "TESSERA_HUB": "offline", "TESSERA_LOG_FORMAT": "json"}
    assert not any(name.startswith("OTEL_EXPORTER") for name in os.environ)
    with server_process(env) as server:
        answer = httpx.post(
            f"{server.url}/embed",
            json={"inputs": "a text", "model": "bert-embed"},
            headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"},
            timeout=120,
        )
        assert answer.status_code == 200
        assert "traceparent" not in answer.headers
        stop(server)
        logs = server.output()
    assert receiver.posts == 0 and receiver.spans == []
    assert "trace_id" not in logs


@pytest.mark.anyio
async def test_tracing_off_makes_no_span_and_carries_no_context(
    app_factory: Callable[..., FastAPI], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off, every site stops at its one check: nothing that makes a span or a context runs
    (in the front, on the wire, in the engine, in the batcher and the continuous batcher)."""

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("tracing work with tracing off")

    for name in ("start", "start_here", "start_server", "record", "wire_of", "current", "task_context"):
        monkeypatch.setattr(tracing, name, refused)
    monkeypatch.setattr(engine_core, "request_span", refused)
    app = app_factory()
    carried: list[Any] = []
    async with serve(app) as client:
        core = core_of(app)
        handle = core.handle
        monkeypatch.setattr(
            core, "handle", lambda origin, op: (carried.append(getattr(op, "trace", None)), handle(origin, op))
        )
        for route, body in (
            ("/embed", {"inputs": ["a text", "another"], "model": "bert-embed"}),
            ("/translate", {"inputs": "hello world", "model": "marian-en-de"}),
        ):
            answer = await client.post(route, json=body, headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"})
            assert answer.status_code == 200, answer.text
            assert "traceparent" not in answer.headers
    assert not tracing.enabled
    assert carried and all(trace is None for trace in carried)


def test_tracing_is_on_with_its_setting_its_alias_or_an_otlp_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.config import Settings

    for name in (*tracing.ENDPOINTS, "TESSERA_OPENTELEMETRY", "TESSERA_TRACING"):
        monkeypatch.delenv(name, raising=False)
    assert not tracing.requested(Settings())
    for name, value in (
        ("TESSERA_OPENTELEMETRY", "true"),
        ("TESSERA_TRACING", "1"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://collector:4318/v1/traces"),
    ):
        with monkeypatch.context() as env:
            env.setenv(name, value)
            assert tracing.requested(Settings()), name


def test_a_malformed_traceparent_starts_a_new_trace() -> None:
    good = tracing.parse(f"00-{CALLER_TRACE}-{CALLER_SPAN}-01", "vendor=1")
    assert good is not None and good.trace_flags.sampled and good.is_remote
    assert (f"{good.trace_id:032x}", f"{good.span_id:016x}") == (CALLER_TRACE, CALLER_SPAN)
    assert good.trace_state.get("vendor") == "1"
    assert not tracing.parse(f"00-{CALLER_TRACE}-{CALLER_SPAN}-00").trace_flags.sampled  # type: ignore[union-attr]
    for bad in (
        "",
        "garbage",
        f"ff-{CALLER_TRACE}-{CALLER_SPAN}-01",  # the forbidden version
        f"00-{'0' * 32}-{CALLER_SPAN}-01",  # an all-zero trace id
        f"00-{CALLER_TRACE}-{'0' * 16}-01",
        f"00-{CALLER_TRACE}-{CALLER_SPAN}-01-extra",  # version 00 has four fields
        f"00-{CALLER_TRACE}-{CALLER_SPAN}-011",
        f"00-{CALLER_TRACE[:-1]}x-{CALLER_SPAN}-01",
    ):
        assert tracing.parse(bad) is None, bad
    assert tracing.parse(f"01-{CALLER_TRACE}-{CALLER_SPAN}-01-future") is not None  # a later version: read its prefix
    assert tracing.sampled_on_wire((f"00-{CALLER_TRACE}-{CALLER_SPAN}-01", ""))
    assert not tracing.sampled_on_wire((f"00-{CALLER_TRACE}-{CALLER_SPAN}-00", ""))


def test_a_ratio_sampler_decides_at_the_route_and_a_sampled_caller_still_wins(
    receiver: Receiver, local_catalog: Path
) -> None:
    """parentbased_traceidratio at 0: a request of its own is not sampled (its answer names an
    unsampled trace, nothing is sent), one whose caller samples is traced (parent-based)."""
    env = traced_env(receiver, local_catalog, {"TESSERA_WORKERS": "0"})
    env.update({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"})
    with server_process(env) as server:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            body = {"inputs": "a text", "model": "bert-embed"}
            alone = http.post("/embed", json=body)
            called = http.post("/embed", json=body, headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"})
        stop(server)
    assert alone.status_code == called.status_code == 200
    version, own_trace, _, flags = alone.headers["traceparent"].split("-")
    assert (version, flags) == ("00", "00") and own_trace != CALLER_TRACE
    assert receiver.of_trace(own_trace) == []
    names = {span.name for span in receiver.of_trace(CALLER_TRACE)}
    assert {"POST /embed", "tessera.engine", "tessera.engine.request", "tessera.queue"} <= names
    batches = ("tessera.batch", "tessera.forward")  # a batch's own trace, linked to the request
    assert {span.trace_id for span in receiver.spans if span.name not in batches} == {CALLER_TRACE}
