"""The task routes' direct path (app/api/json_route.py) answers exactly as FastAPI's handler.

Every request below is sent twice to the same app: once as served, once with the direct
path switched off, so that FastAPI's own handler answers; status, headers a client reads
and body bytes must be equal. Valid requests must really take the direct path.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import Depends, FastAPI, Request

from app.api import native
from app.api.json_route import _Plan
from app.api.security import require_api_key
from tests.conftest import serve

pytestmark = pytest.mark.anyio

JSON = "application/json"
TEXT = "The quick brown fox jumps over the lazy dog. It was not amused. The dog slept on. Foxes ran."

# (path, body, content type): the ones a client gets right ...
VALID: list[tuple[str, Any, str]] = [
    ("/classify", {"inputs": ["I love this movie", "awful, just awful"], "model": "bert-clf"}, JSON),
    ("/classify", {"inputs": "fine", "model": "distilbert-clf", "parameters": {"top_k": None}}, JSON),
    ("/classify", {"inputs": "a match", "model": "nli", "parameters": {"candidate_labels": ["sport", "food"]}}, JSON),
    ("/embed", {"inputs": ["one", "two words"], "model": "bert-embed"}, "application/json; charset=utf-8"),
    ("/translate", {"inputs": "Hello there", "model": "marian-en-de", "parameters": {"max_new_tokens": 5}}, JSON),
    ("/summarize", {"inputs": TEXT, "model": "minilm-extractive"}, JSON),
    ("/v1/embeddings", {"input": ["one", "two"], "model": "bert-embed"}, "application/vnd.api+json"),
]
# ... and the ones it gets wrong, in the body, the content type or the model asked for.
INVALID: list[tuple[str, Any, str]] = [
    ("/classify", b'{"inputs": ', JSON),
    ("/classify", b"", JSON),
    ("/classify", {"inputs": 5}, JSON),
    ("/classify", {"inputs": "x", "unknown_field": 1}, JSON),
    ("/classify", {"inputs": ""}, JSON),
    ("/classify", {"inputs": "x", "model": "bert-clf"}, "text/plain"),
    ("/classify", {"inputs": "x", "model": "marian-en-de"}, JSON),
    ("/classify", {"inputs": "x", "model": "no-such-model"}, JSON),
    ("/translate", {"inputs": "x", "model": "marian-en-de", "parameters": {"max_new_tokens": 10**6}}, JSON),
    ("/v1/embeddings", {"input": 7, "model": "bert-embed"}, JSON),
]
READ_HEADERS = ("content-type", "content-length", "retry-after", "www-authenticate", "x-error-message")


async def answers(app: FastAPI, requests: list[tuple[str, Any, str]]) -> list[tuple[int, dict[str, str], bytes]]:
    out = []
    async with serve(app) as client:
        for n, (path, body, content_type) in enumerate(requests):
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers = {"content-type": content_type, "x-request-id": f"req-{n}"}
            response = await client.post(path, content=raw, headers=headers)
            kept = {h: response.headers[h] for h in READ_HEADERS if h in response.headers}
            out.append((response.status_code, kept, response.content))
    return out


@pytest.fixture
def direct_answers(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the answers the direct path made."""
    made: list[int] = []
    dump = _Plan.dump

    def counting(plan: _Plan, result: Any) -> bytes:
        made.append(1)
        return dump(plan, result)

    monkeypatch.setattr(_Plan, "dump", counting)
    return made


async def test_valid_requests_take_the_direct_path_and_answer_as_fastapi_does(
    app_factory: Callable[..., FastAPI], direct_answers: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    direct = await answers(app_factory(), VALID)
    assert len(direct_answers) == len(VALID)
    assert all(status == 200 for status, _, _ in direct)
    monkeypatch.setattr(_Plan, "applies", lambda plan, request: False)
    assert await answers(app_factory(), VALID) == direct
    assert len(direct_answers) == len(VALID)  # nothing more: FastAPI's handler answered


async def test_invalid_requests_get_fastapis_answers(
    app_factory: Callable[..., FastAPI], direct_answers: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    served = await answers(app_factory(), INVALID)
    assert [status for status, _, _ in served] == [422, 422, 422, 422, 422, 422, 400, 404, 422, 422]
    assert direct_answers == []
    monkeypatch.setattr(_Plan, "applies", lambda plan, request: False)
    assert await answers(app_factory(), INVALID) == served


async def test_the_api_key_check_runs_on_the_direct_path(
    app_factory: Callable[..., FastAPI], direct_answers: list[int]
) -> None:
    body = {"inputs": "I love this movie", "model": "bert-clf"}
    async with serve(app_factory(api_keys="k")) as client:
        for refused in ({}, {"Authorization": "Bearer wrong"}):
            response = await client.post("/classify", json=body, headers=refused)
            assert response.status_code == 401 and response.json()["error"] == "unauthorized"
            assert response.headers["www-authenticate"].startswith("Bearer")
        assert (await client.post("/classify", json=body, headers={"Authorization": "Bearer k"})).status_code == 200
    assert direct_answers == [1]


def test_the_direct_path_takes_an_app_only_when_every_app_wide_dependency_is_a_guard() -> None:
    def solved_by_fastapi(request: Request) -> None:  # not async: FastAPI's handler must solve it
        return None

    plan = _Plan.of(native.router.routes[0])  # type: ignore[arg-type]
    assert plan is not None

    def app_with(*dependencies: Any) -> Any:
        return SimpleNamespace(app=SimpleNamespace(router=SimpleNamespace(dependencies=list(dependencies))))

    assert plan.app_guards(app_with()) == []
    assert plan.app_guards(app_with(Depends(require_api_key))) == [(require_api_key, "request")]
    assert plan.app_guards(app_with(Depends(require_api_key), Depends(solved_by_fastapi))) is None


async def test_dependency_overrides_keep_fastapis_handler_and_tracing_keeps_the_direct_path(
    app_factory: Callable[..., FastAPI], direct_answers: list[int]
) -> None:
    """An override must replace the dependency it names; tracing (app/tracing.py) is the
    request middleware's, so it leaves the direct path on."""
    body = {"inputs": "I love this movie", "model": "bert-clf"}
    keyed = app_factory(api_keys="k")
    keyed.dependency_overrides[require_api_key] = lambda: None
    async with serve(keyed) as client:
        assert (await client.post("/classify", json=body)).status_code == 200  # no key: overridden
    assert direct_answers == []
    async with serve(app_factory(opentelemetry=True)) as client:
        assert (await client.post("/classify", json=body)).status_code == 200
    assert direct_answers == [1]
