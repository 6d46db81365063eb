"""What operators rely on: health, metrics, API keys, limits, CORS, request ids and logs."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI

from app.config import Settings
from app.logs import JsonFormatter, configure_logging
from app.main import create_app
from tests.conftest import core_of, serve

pytestmark = pytest.mark.anyio


async def test_readiness_waits_for_preloaded_models_while_liveness_answers_at_once(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    catalog = tmp_path / "catalog.yaml"
    entries = [
        {
            "name": "pre",
            "task": "text-classification",
            "preload": True,
            "source": {"path": str(tiny_models["bert-clf"])},
        },
        {"name": "lazy", "task": "embedding", "source": {"path": str(tiny_models["bert-embed"])}},
    ]
    catalog.write_text(yaml.safe_dump({"models": entries}))
    app = create_app(Settings(catalog=catalog, hub="offline"))
    async with serve(app) as client:
        assert (await client.get("/health/live")).status_code == 200
        first = await client.get("/health/ready")
        if first.status_code == 503:  # caught while the background preload runs
            assert first.json()["waiting_for"] == ["pre"]
        for _ in range(200):
            ready = await client.get("/health/ready")
            if ready.status_code == 200:
                break
            await asyncio.sleep(0.05)
        assert ready.status_code == 200
        states = {m["name"]: m["state"] for m in (await client.get("/models")).json()["models"]}
        assert states == {"pre": "loaded", "lazy": "not_loaded"}


async def test_readiness_reports_a_failed_preload(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.yaml"
    entry = {
        "name": "gone",
        "task": "embedding",
        "preload": True,
        "source": {"path": str(tmp_path / "missing")},
    }
    catalog.write_text(yaml.safe_dump({"models": [entry]}))
    async with serve(create_app(Settings(catalog=catalog, hub="offline"))) as client:
        for _ in range(100):
            body = (await client.get("/health/ready")).json()
            if body["failed"]:
                break
            await asyncio.sleep(0.05)
        assert body == {"status": "failed", "waiting_for": ["gone"], "failed": ["gone"]}


async def test_metrics_count_requests_batches_loads_and_memory(client: httpx.AsyncClient) -> None:
    await client.post("/classify", json={"inputs": ["a", "b", "c"], "model": "bert-clf"})
    await client.post("/classify", json={"inputs": "x", "model": "nope"})
    # With fronts and an engine every sample also names its process: the same figures else.
    text = re.sub(r'process="[^"]*",?', "", (await client.get("/metrics")).text)
    assert 'tessera_requests_total{model="bert-clf",route="/classify",status="200"} 1.0' in text
    assert 'tessera_requests_total{model="",route="/classify",status="404"} 1.0' in text
    assert 'tessera_model_loads_total{model="bert-clf",outcome="success"} 1.0' in text
    tokens = {
        kind: float(text.split(f'tessera_batch_tokens_total{{kind="{kind}",model="bert-clf"}} ')[1].split()[0])
        for kind in ("input", "padded")
    }
    assert 3 * 3 <= tokens["input"] <= tokens["padded"]  # [CLS] a [SEP] at least, per input
    assert 'tessera_batch_size_sum{model="bert-clf"} 3.0' in text
    assert 'tessera_model_loaded{device="cpu",model="bert-clf"} 1.0' in text
    assert 'tessera_queue_depth{model="bert-clf"} 0.0' in text
    memory = next(line for line in text.splitlines() if line.startswith('tessera_model_memory_bytes{model="bert-clf"}'))
    assert float(memory.split()[-1]) > 0
    assert "tessera_inference_seconds_bucket" in text and "tessera_model_load_seconds_count" in text


async def test_api_keys_guard_every_route_but_health_and_docs(app_factory: Callable[..., FastAPI]) -> None:
    async with serve(app_factory(api_keys="key-one, key-two")) as client:
        body = {"inputs": "I love this movie"}
        missing = await client.post("/classify", json=body)
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert missing.json()["error"] == "unauthorized"
        wrong = await client.post("/classify", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        for key in ("key-one", "key-two"):
            ok = await client.post("/classify", json=body, headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200
        for path in ("/models", "/metrics", "/v1/models"):
            assert (await client.get(path)).status_code == 401
        for path in ("/health/live", "/health/ready", "/docs", "/openapi.json"):
            assert (await client.get(path)).status_code == 200


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_loading_and_unloading_need_an_admin_key_and_say_which_key_kind(
    app_factory: Callable[..., FastAPI],
) -> None:
    async with serve(app_factory(api_keys="infer-key", admin_keys="admin-key")) as client:
        body = {"inputs": "I love this movie", "model": "bert-clf"}
        for key in ("infer-key", "admin-key"):  # an admin key is an inference key too
            assert (await client.post("/classify", json=body, headers=bearer(key))).status_code == 200
        for action in ("load", "unload"):
            refused = await client.post(f"/models/bert-clf/{action}", headers=bearer("infer-key"))
            assert refused.status_code == 403
            assert refused.json()["error"] == "forbidden"
            assert "needs an admin key (TESSERA_ADMIN_KEYS); this key is an inference key" in refused.json()["message"]
            assert (await client.post(f"/models/bert-clf/{action}")).status_code == 401
            assert (await client.post(f"/models/bert-clf/{action}", headers=bearer("wrong"))).status_code == 401
            done = await client.post(f"/models/bert-clf/{action}", headers=bearer("admin-key"))
            assert done.status_code == 200, done.text


async def test_with_api_keys_and_no_admin_key_model_management_is_off_not_open(
    app_factory: Callable[..., FastAPI],
) -> None:
    async with serve(app_factory(api_keys="infer-key")) as client:
        refused = await client.post("/models/bert-clf/load", headers=bearer("infer-key"))
        assert refused.status_code == 403
        assert "model management is off on this server" in refused.json()["message"]
        assert "TESSERA_ADMIN_KEYS" in refused.json()["message"]


async def test_admin_keys_alone_guard_management_and_leave_inference_open(
    app_factory: Callable[..., FastAPI],
) -> None:
    async with serve(app_factory(admin_keys="admin-key")) as client:
        assert (await client.post("/classify", json={"inputs": "hi", "model": "bert-clf"})).status_code == 200
        assert (await client.post("/models/bert-clf/unload")).status_code == 401
        assert (await client.post("/models/bert-clf/unload", headers=bearer("admin-key"))).status_code == 200


async def test_the_rate_limit_answers_429_with_retry_after_per_key(app_factory: Callable[..., FastAPI]) -> None:
    # A burst of 4 takes requests of at most 4 inputs (a larger one could never pass).
    app = app_factory(api_keys="k1,k2", rate_limit_inputs_per_s=0.5, rate_limit_burst=4, max_inputs_per_request=4)
    async with serve(app) as client:
        body = {"inputs": ["one", "two", "three"], "model": "bert-clf"}
        assert (await client.post("/classify", json=body, headers=bearer("k1"))).status_code == 200
        limited = await client.post("/classify", json=body, headers=bearer("k1"))  # 1 left of 4, 3 asked
        assert limited.status_code == 429
        assert "rate limit: 0.5 inputs per second for 'inference-key-1'" in limited.json()["message"]
        assert int(limited.headers["retry-after"]) == 4  # (3 - 1) / 0.5 s, give or take the refill meanwhile
        assert (await client.post("/classify", json=body, headers=bearer("k2"))).status_code == 200  # its own


async def queued(slot: Any, depth: int) -> None:
    for _ in range(500):
        if slot.batcher.queue_depth >= depth:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the queue never reached {depth}")


async def test_a_key_that_fills_a_models_queue_does_not_lock_another_key_out(
    app_factory: Callable[..., FastAPI],
) -> None:
    app = app_factory(api_keys="flooder,light", max_queue_items=4, max_inputs_per_request=4, lanes_per_model=1)
    async with serve(app) as client:
        await client.post("/classify", json={"inputs": "warm", "model": "bert-clf"}, headers=bearer("flooder"))
        slot = core_of(app).registry.slot("bert-clf")
        gate, real = threading.Event(), slot.runner.infer
        slot.runner.infer = lambda payloads, encoded: gate.wait(30) and real(payloads, encoded)
        try:
            body = {"inputs": ["a", "b", "c", "d"], "model": "bert-clf"}
            flood = asyncio.create_task(client.post("/classify", json=body, headers=bearer("flooder")))
            await queued(slot, 4)
            more = await client.post("/classify", json={**body, "inputs": "e"}, headers=bearer("flooder"))
            assert more.status_code == 429 and "4 of them yours" in more.json()["message"]
            light = asyncio.create_task(
                client.post("/classify", json={"inputs": "f", "model": "bert-clf"}, headers=bearer("light"))
            )
            await queued(slot, 5)
            gate.set()
            assert (await light).status_code == 200
            assert (await flood).status_code == 200
        finally:
            gate.set()
            slot.runner.infer = real


async def test_docs_can_require_a_key_too(app_factory: Callable[..., FastAPI]) -> None:
    async with serve(app_factory(api_keys="k", docs_public=False)) as client:
        assert (await client.get("/openapi.json")).status_code == 401
        assert (await client.get("/openapi.json", headers={"Authorization": "Bearer k"})).status_code == 200


def test_api_keys_never_appear_in_settings_output() -> None:
    settings = Settings(api_keys="super-secret-key", hub="offline")
    assert "super-secret-key" not in repr(settings) and "super-secret-key" not in str(settings.model_dump())


@pytest.mark.parametrize(
    ("overrides", "body", "fragment"),
    [
        ({"max_inputs_per_request": 3}, {"inputs": ["a"] * 4}, "limit is 3 (TESSERA_MAX_INPUTS_PER_REQUEST)"),
        ({"max_chars_per_input": 10}, {"inputs": ["short", "x" * 11]}, "input 1 has 11 characters"),
        (
            {"max_tokens_per_request": 20, "max_inputs_per_request": 20},
            {"inputs": ["one two three four five six"] * 4},
            "TESSERA_MAX_TOKENS_PER_REQUEST",
        ),
    ],
)
async def test_per_request_limits_answer_413_naming_the_limit(
    app_factory: Callable[..., FastAPI], overrides: dict[str, int], body: dict[str, object], fragment: str
) -> None:
    async with serve(app_factory(**overrides)) as client:
        r = await client.post("/classify", json=body | {"model": "bert-clf"})
        assert r.status_code == 413, r.text
        assert fragment in r.json()["message"]
        ok = await client.post("/classify", json={"inputs": "fine", "model": "bert-clf"})
        assert ok.status_code == 200


async def test_oversized_bodies_are_refused_before_parsing(app_factory: Callable[..., FastAPI]) -> None:
    async with serve(app_factory(max_body_bytes=2048, max_chars_per_input=2000)) as client:
        big = {"inputs": "x" * 5000}
        declared = await client.post("/classify", json=big)
        assert declared.status_code == 413
        assert "TESSERA_MAX_BODY_BYTES" in declared.json()["message"]
        assert declared.headers["x-request-id"] == declared.json()["request_id"]

        async def chunks():  # no Content-Length: the limit counts what arrives
            for _ in range(10):
                yield b"x" * 500

        streamed = await client.post("/classify", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413


async def test_cors_allows_the_configured_origins_only(app_factory: Callable[..., FastAPI]) -> None:
    async with serve(app_factory(cors_origins="https://app.example.com")) as client:
        headers = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"}
        allowed = await client.options("/classify", headers=headers)
        assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
        other = await client.options("/classify", headers=headers | {"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


async def test_access_log_names_model_inputs_batch_and_request_id(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="tessera.access"):
        r = await client.post(
            "/classify", json={"inputs": ["a", "b"], "model": "bert-clf"}, headers={"X-Request-ID": "req-42"}
        )
    assert r.headers["x-request-id"] == "req-42"
    line = next(rec for rec in caplog.records if rec.name == "tessera.access")
    message = line.getMessage()
    assert "POST /classify 200" in message and "model=bert-clf inputs=2 batch=2" in message
    assert JsonFormatter().format(line).startswith("{")


def test_json_logs_carry_the_request_id() -> None:
    record = logging.LogRecord("tessera.access", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    record.request_id = "abc"
    record.model = "m"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "hello world" and line["request_id"] == "abc" and line["model"] == "m"
    configure_logging("json", "WARNING")  # and it installs without error
    configure_logging("text", "WARNING")


def test_download_command_fails_clearly_offline(catalog_path: Path) -> None:
    env = {"TESSERA_CATALOG": str(catalog_path), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}

    def download(name: str, **overrides: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "app", "download", name]
        return subprocess.run(command, env=env | overrides, capture_output=True, text=True, timeout=120)

    proc = download("hub-sst2")
    assert proc.returncode == 1
    assert "HF_HUB_OFFLINE=1 is set" in proc.stderr
    proc = download("hub-sst2", HF_HUB_OFFLINE="0", TESSERA_DOWNLOAD_TIMEOUT_S="5")
    assert proc.returncode == 1
    assert "hub-sst2: FAILED" in proc.stderr
    unknown = download("nope")
    assert unknown.returncode == 2 and "unknown model(s): nope" in unknown.stderr


async def test_tracing_uses_the_provider_the_process_set_up_and_only_when_asked_for(
    app_factory: Callable[..., FastAPI], recorded_spans: Any
) -> None:
    """An app embedded in a process that configured OpenTelemetry itself traces into that
    process's provider (app/tracing.py); off, nothing is recorded and no answer names a trace."""
    recorded_spans.clear()
    body = {"inputs": "a text", "model": "bert-embed"}
    async with serve(app_factory()) as client:
        answer = await client.post("/embed", json=body)
        assert answer.status_code == 200 and "traceparent" not in answer.headers
    assert recorded_spans.get_finished_spans() == ()
    async with serve(app_factory(opentelemetry=True)) as client:
        answer = await client.post("/embed", json=body)
        assert answer.status_code == 200
        probe = await client.get("/health/live")
        assert "traceparent" not in probe.headers  # probes and scrapes are not traced
        # Exemplars: the request latency's sample names the request's trace, in OpenMetrics only.
        scrape = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert scrape.headers["content-type"].startswith("application/openmetrics-text")
        assert scrape.text.rstrip().endswith("# EOF")
        trace_id = answer.headers["traceparent"].split("-")[1]
        assert f'trace_id="{trace_id}"' in scrape.text
        assert "trace_id" not in (await client.get("/metrics")).text  # the Prometheus text format has none
    names = {span.name for span in recorded_spans.get_finished_spans()}
    assert {"POST /embed", "tessera.engine", "tessera.engine.request", "tessera.queue", "tessera.batch"} <= names

    # With keys, the server span names the tenant, never the key.
    recorded_spans.clear()
    async with serve(app_factory(opentelemetry=True, api_keys="s3cret-key")) as client:
        keyed = await client.post("/embed", json=body, headers={"Authorization": "Bearer s3cret-key"})
        assert keyed.status_code == 200
    [server] = [span for span in recorded_spans.get_finished_spans() if span.name == "POST /embed"]
    assert server.attributes is not None and server.attributes["tessera.tenant"] == "inference-key-1"
    assert not any(
        "s3cret" in str(value) for s in recorded_spans.get_finished_spans() for value in (s.attributes or {}).values()
    )
