"""The framework internals Tessera relies on, checked where an upgrade would move them.

pyproject.toml pins uvicorn, fastapi and starlette to ranges this file passed on. Before
widening a range, run it against the new version: each failure names the internal that
moved and the file that relies on it. Behaviour covered elsewhere is not repeated here:
tests/test_json_route.py (the direct path against the real app's routes),
tests/test_server.py (SIGTERM drains and the process exits 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import signal
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import ResponseValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.routing import Match

from app import serving
from app.api.drain import Drain
from app.api.errors import allowed_methods
from app.api.json_route import JsonBodyRoute, _Plan

SERVER = "app/serving.py"
DECODING = "app/runners/decoding.py"
POSITIONS = "app/runners/positions.py"
SEARCH = "app/runners/search.py"
JSON_ROUTE = "app/api/json_route.py"


async def answer(request: dict[str, Any], receive: Any, send: Any) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"5")],
        }
    )
    await send({"type": "http.response.body", "body": b"hello"})


def moved(internal: str, where: str) -> str:
    return f"{internal} moved or changed ({where} relies on it): adapt it before widening the pin in pyproject.toml"


def assert_parameters(function: Callable[..., Any], expected: list[str], internal: str, where: str) -> None:
    got = list(inspect.signature(function).parameters)
    assert got == expected, moved(f"{internal}{inspect.signature(function)} (expected parameters {expected})", where)


# uvicorn's Server (app/serving.py: DrainingServer) --------------------------------------------


def test_uvicorns_server_keeps_the_methods_and_flags_draining_server_uses() -> None:
    server = uvicorn.Server
    capture = getattr(server, "capture_signals", None)
    assert capture is not None, moved("uvicorn.Server.capture_signals", SERVER)
    assert_parameters(capture, ["self"], "uvicorn.Server.capture_signals", SERVER)
    assert inspect.isgeneratorfunction(getattr(capture, "__wrapped__", None)), moved(
        "uvicorn.Server.capture_signals (a @contextmanager)", SERVER
    )
    assert_parameters(server.handle_exit, ["self", "sig", "frame"], "uvicorn.Server.handle_exit", SERVER)
    assert inspect.iscoroutinefunction(server.startup), moved("uvicorn.Server.startup (a coroutine)", SERVER)
    assert_parameters(server.startup, ["self", "sockets"], "uvicorn.Server.startup", SERVER)
    assert_parameters(server.run, ["self", "sockets"], "uvicorn.Server.run", SERVER)
    assert "timeout_graceful_shutdown" in inspect.signature(uvicorn.Config).parameters, moved(
        "uvicorn.Config(timeout_graceful_shutdown=)", SERVER
    )
    made = uvicorn.Server(uvicorn.Config(answer))
    for flag in ("should_exit", "force_exit", "started"):
        assert getattr(made, flag, None) is False, moved(f"uvicorn.Server.{flag} (a bool, False at first)", SERVER)


def test_uvicorn_serves_through_draining_servers_signal_capture_and_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn's serve() must enter our capture_signals (no re-raised SIGTERM: exit 0) and
    await our startup (the heap frozen once start-up is done)."""
    seen: list[str] = []
    capture = serving.DrainingServer.capture_signals

    @contextlib.contextmanager
    def recording(self: serving.DrainingServer) -> Iterator[None]:
        seen.append("capture_signals")
        with capture(self):
            assert signal.getsignal(signal.SIGTERM) == self.handle_exit
            yield

    monkeypatch.setattr(serving.DrainingServer, "capture_signals", recording)
    monkeypatch.setattr(serving.heap, "freeze_survivors", lambda: seen.append("startup"))
    config = uvicorn.Config(answer, host="127.0.0.1", port=0, lifespan="off", log_config=None)
    server = serving.DrainingServer(config, Drain(), 1.0)
    server.should_exit = True  # start up, then shut down at once
    before = signal.getsignal(signal.SIGTERM)
    asyncio.run(server.serve())
    assert seen == ["capture_signals", "startup"], moved("uvicorn.Server.serve calling capture_signals/startup", SERVER)
    assert signal.getsignal(signal.SIGTERM) == before


# FastAPI's request handler (app/api/json_route.py: JsonBodyRoute) ----------------------------


class Echo(BaseModel):
    text: str
    count: int = 1


async def refuse_when_asked(request: Request) -> None:
    if request.headers.get("x-refuse"):
        raise HTTPException(401, "refused")


async def echo(body: Echo, request: Request) -> Echo:
    if body.text == "break the response model":
        return {"text": None}  # type: ignore[return-value]
    return body


def test_fastapis_route_keeps_what_json_body_route_reads() -> None:
    assert_parameters(APIRoute.get_route_handler, ["self"], "fastapi.routing.APIRoute.get_route_handler", JSON_ROUTE)
    route = APIRoute("/echo", echo, methods=["POST"], response_model=Echo, dependencies=[Depends(refuse_when_asked)])
    calls = [getattr(dependency, "call", None) for dependency in route.dependant.dependencies]
    assert calls == [refuse_when_asked], moved("APIRoute.dependant.dependencies[*].call", JSON_ROUTE)
    for name in ("include", "exclude", "by_alias", "exclude_unset", "exclude_defaults", "exclude_none"):
        assert hasattr(route, f"response_model_{name}"), moved(f"APIRoute.response_model_{name}", JSON_ROUTE)
    assert (route.endpoint, route.response_model, route.status_code) == (echo, Echo, None), moved(
        "APIRoute.endpoint / response_model / status_code", JSON_ROUTE
    )
    app = FastAPI(dependencies=[Depends(refuse_when_asked)])
    assert [d.dependency for d in app.router.dependencies] == [refuse_when_asked], moved(
        "FastAPI().router.dependencies[*].dependency", JSON_ROUTE
    )
    assert app.dependency_overrides == {}, moved("FastAPI().dependency_overrides (a dict)", JSON_ROUTE)
    error = ResponseValidationError([{"loc": ("response",)}], body="sent")
    assert (error.errors(), error.body) == ([{"loc": ("response",)}], "sent"), moved(
        "fastapi.exceptions.ResponseValidationError(errors, body=)", JSON_ROUTE
    )
    assert _Plan.of(route) is not None, moved("the APIRoute a (body: Model, request: Request) route makes", JSON_ROUTE)


def bare_app(route_class: type[APIRoute]) -> FastAPI:
    app = FastAPI(dependencies=[Depends(refuse_when_asked)])
    router = APIRouter(route_class=route_class)
    router.add_api_route("/echo", echo, methods=["POST"], response_model=Echo)
    app.include_router(router)
    return app


@pytest.mark.anyio
async def test_json_body_route_answers_as_fastapis_stock_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """FastAPI's own error answers (no handlers of ours), the request's body read twice when
    the direct path hands an invalid one to FastAPI's handler."""
    direct: list[int] = []
    dump = _Plan.dump
    monkeypatch.setattr(_Plan, "dump", lambda plan, result: direct.append(1) or dump(plan, result))
    requests: list[tuple[bytes, dict[str, str]]] = [
        (b'{"text": "hi", "count": 2}', {"content-type": "application/json"}),
        (b'{"text": "hi", "count": "many"}', {"content-type": "application/json"}),
        (b'{"text": ', {"content-type": "application/json"}),
        (b'{"text": "hi"}', {"content-type": "text/plain"}),
        (b'{"text": "hi"}', {"content-type": "application/json", "x-refuse": "1"}),
        (b'{"text": "break the response model"}', {"content-type": "application/json"}),
    ]
    answers = {}
    for route_class in (JsonBodyRoute, APIRoute):
        transport = httpx.ASGITransport(app=bare_app(route_class), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            sent = [await client.post("/echo", content=body, headers=headers) for body, headers in requests]
        answers[route_class] = [(r.status_code, r.headers.get("content-type"), r.content) for r in sent]
    assert [status for status, _, _ in answers[APIRoute]] == [200, 422, 422, 422, 401, 500]
    assert answers[JsonBodyRoute] == answers[APIRoute], moved("FastAPI's request handler (its answers)", JSON_ROUTE)
    assert direct == [1, 1]  # the two valid bodies took the direct path (one answer breaking its model)


# Starlette's request, routing and scope (app/api: middleware.py, security.py, errors.py) ----


def test_a_requests_state_lives_in_its_scope() -> None:
    """The access log reads the accounting routes leave on ``request.state`` from
    ``scope["state"]`` (middleware.py); ``tenant_of`` reads the API key there (security.py)."""
    shared: dict[str, Any] = {"request_id": "r1"}
    request = Request({"type": "http", "state": shared})
    request.state.model = "bert-clf"
    assert shared == {"request_id": "r1", "model": "bert-clf"}, moved(
        "starlette Request.state backed by scope['state']", "app/api/middleware.py, app/api/security.py"
    )
    assert request.state.request_id == "r1"


@pytest.mark.anyio
async def test_the_matched_route_is_left_in_the_scope() -> None:
    """The access log and the metrics label a request with ``scope["route"].path`` (middleware.py)."""
    app = FastAPI()

    @app.get("/items/{item}")
    async def item(item: str) -> str:
        return item

    seen: list[Any] = []

    async def outer(scope: Any, receive: Any, send: Any) -> None:
        await app(scope, receive, send)
        seen.append(getattr(scope.get("route"), "path", None))

    transport = httpx.ASGITransport(app=outer)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/items/7")).status_code == 200
    assert seen == ["/items/{item}"], moved("scope['route'] set by FastAPI's routing", "app/api/middleware.py")


def test_routes_match_a_scope_with_another_method_fully_or_partly() -> None:
    """A 405's Allow header lists the methods whose ``route.matches(scope)`` is Match.FULL (errors.py)."""
    app = FastAPI()
    app.post("/echo")(echo)
    scope = {"type": "http", "app": app, "path": "/echo", "method": "GET", "root_path": "", "headers": []}
    route = next(r for r in app.router.routes if getattr(r, "path", None) == "/echo")
    assert route.matches({**scope, "method": "POST"})[0] is Match.FULL
    assert route.matches(scope)[0] is Match.PARTIAL, moved(
        "starlette Route.matches -> (Match, scope)", "app/api/errors.py"
    )
    assert allowed_methods(Request(scope)) == ["POST"]


# -- transformers: what iteration-level decoding reads (app/runners/decoding.py, search.py) --

GENERATION_INTERNALS = {
    # generate's preparation of a request's settings (Plan)
    "_prepare_generation_config": ["generation_config"],
    "_prepare_special_tokens": ["generation_config", "kwargs_has_attention_mask", "device"],
    "_prepare_generated_length": [
        "generation_config",
        "has_default_max_length",
        "has_default_min_length",
        "model_input_name",
        "input_ids_length",
        "inputs_tensor",
    ],
    "_validate_generated_length": ["generation_config", "input_ids_length", "has_default_max_length"],
    "_get_logits_processor": [
        "generation_config",
        "input_ids_seq_length",
        "encoder_input_ids",
        "prefix_allowed_tokens_fn",
        "logits_processor",
        "device",
        "model_kwargs",
    ],
    "_get_stopping_criteria": ["generation_config", "stopping_criteria"],
    # _beam_search's steps (Beams)
    "_get_top_k_continuations": [
        "accumulated_log_probs",
        "running_sequences",
        "running_beam_indices",
        "cur_len",
        "decoder_prompt_len",
        "do_sample",
        "beams_to_keep",
        "num_beams",
        "batch_size",
    ],
    "_get_running_beams_for_next_iteration": [
        "topk_log_probs",
        "topk_running_sequences",
        "topk_running_beam_indices",
        "next_token_hits_stopping_criteria",
        "num_beams",
    ],
    "_update_finished_beams": [
        "sequences",
        "topk_running_sequences",
        "beam_scores",
        "topk_log_probs",
        "beam_indices",
        "topk_running_beam_indices",
        "is_early_stop_heuristic_unsatisfied",
        "is_sent_finished",
        "next_token_hits_stopping_criteria",
        "top_num_beam_mask",
        "num_beams",
        "cur_len",
        "decoder_prompt_len",
        "length_penalty",
        "early_stopping",
    ],
    "_check_early_stop_heuristic": [
        "is_early_stop_heuristic_unsatisfied",
        "running_beam_scores",
        "beam_scores",
        "is_sent_finished",
        "cur_len",
        "max_length",
        "decoder_prompt_len",
        "early_stopping",
        "length_penalty",
    ],
    "_beam_search_has_unfinished_sequences": [
        "is_early_stop_heuristic_unsatisfied",
        "is_sent_finished",
        "next_token_hits_stopping_criteria",
        "early_stopping",
    ],
}


@pytest.mark.parametrize("name", sorted(GENERATION_INTERNALS))
def test_generates_internals_that_decoding_calls_take_the_arguments_it_passes(name: str) -> None:
    from transformers import GenerationMixin

    method = getattr(GenerationMixin, name, None)
    assert method is not None, f"GenerationMixin.{name} is gone; {SEARCH} calls it"
    parameters = inspect.signature(method).parameters
    missing = [arg for arg in GENERATION_INTERNALS[name] if arg not in parameters]
    assert not missing, f"GenerationMixin.{name} no longer takes {missing}; {SEARCH} passes them"


def test_decoder_caches_are_layers_of_keys_and_values_that_decoding_edits(tiny_models: dict[str, Any]) -> None:
    import torch
    from transformers import AutoModelForSeq2SeqLM
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    model = AutoModelForSeq2SeqLM.from_pretrained(str(tiny_models["marian"])).eval()
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    with torch.inference_mode():
        model(
            input_ids=torch.tensor([[5, 6, 0]]),
            decoder_input_ids=torch.tensor([[model.config.pad_token_id]]),
            cache=cache,
        )
    for layers, length in ((cache.self_attention_cache.layers, 1), (cache.cross_attention_cache.layers, 3)):
        for layer in layers:
            assert isinstance(layer.keys, torch.Tensor) and layer.keys.shape[2] == length, DECODING
            assert isinstance(layer.values, torch.Tensor) and layer.values.shape[2] == length, DECODING
    assert all(cache.is_updated.values()), f"cross-attention reuse moved; {DECODING} merges filled caches"


@pytest.mark.parametrize("family", ["marian", "bart", "mbart", "pegasus"])
def test_absolute_decoder_positions_are_a_table_looked_up_by_position(family: str) -> None:
    """RowPositions (app/runners/positions.py) looks each row's position up in the decoder's
    table, past BART's offset: the table must still be an embedding called with position_ids."""
    import importlib

    import torch

    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    decoder_class = next(v for k, v in vars(module).items() if k.lower() == f"{family}decoder")
    source = inspect.getsource(decoder_class.forward)
    assert "self.embed_positions(" in source and "position_ids=position_ids" in source, POSITIONS
    table = next(
        v
        for k, v in vars(module).items()
        if k.endswith("PositionalEmbedding") and k.startswith(decoder_class.__name__[:-7])
    )
    assert issubclass(table, torch.nn.Embedding), POSITIONS
    assert "position_ids" in inspect.signature(table.forward).parameters, POSITIONS


@pytest.mark.parametrize("family", ["m2m_100", "nllb_moe"])
def test_sinusoidal_decoder_positions_count_from_past_the_padding_index(family: str) -> None:
    """RowPositions looks M2M100's and NLLB's positions up at padding_idx + 1 + the row's
    position, growing the table with make_weights, as their forward does."""
    import importlib

    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    table = next(v for k, v in vars(module).items() if k.endswith("SinusoidalPositionalEmbedding"))
    embed = table(16, 8, padding_idx=1)
    for name in ("weights", "padding_idx", "make_weights", "offset", "create_position_ids_from_input_ids"):
        assert hasattr(embed, name), f"{table.__name__}.{name} is gone; {POSITIONS} uses it"
    ids = embed.create_position_ids_from_input_ids(torch_ids([[5, 6, 7]]), 1, 4)
    assert ids.tolist() == [[1 + 1 + 4, 1 + 2 + 4, 1 + 3 + 4]], POSITIONS


def torch_ids(rows: list[list[int]]) -> Any:
    import torch

    return torch.tensor(rows)


def test_the_token_classification_pipelines_postprocess_reads_the_outputs_its_runner_builds() -> None:
    # app/runners/token_classification.py calls postprocess with windows it built itself (the
    # keys below) and the pipeline's AggregationStrategy; tests/test_token_classification.py
    # checks the answers, this names what moved if an upgrade changes the contract.
    from transformers.pipelines.token_classification import AggregationStrategy, TokenClassificationPipeline

    assert {s.value for s in AggregationStrategy} == {"none", "simple", "first", "average", "max"}
    parameters = inspect.signature(TokenClassificationPipeline.postprocess).parameters
    assert list(parameters)[1:] == ["all_outputs", "aggregation_strategy", "ignore_labels"]
    source = inspect.getsource(TokenClassificationPipeline.postprocess)
    for key in ("logits", "input_ids", "offset_mapping", "special_tokens_mask", "sentence"):
        assert f'"{key}"' in source, f"postprocess no longer reads {key!r}; the runner builds it"
