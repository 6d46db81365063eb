"""Whatever a client sends, the answer is a 2xx or a 4xx that says what to change, never a 5xx,
and the server stays healthy: property tests over arbitrary unicode (lone surrogates,
controls, NULs, RTL marks, emoji), numbers at the float limits, deep nesting and huge
strings, on every task route and both compatibility routes; then the cases found by
hand, each pinned to its answer.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from app.api.fields import text_problem
from app.config import Settings
from app.main import Front, create_app
from tests.conftest import LAYOUTS, LOCAL, core_of, engine_thread, running


def small_settings(catalog: Path) -> Settings:
    # Small caps keep each generated request cheap; the limits are what is tested, not the size.
    return Settings(
        catalog=catalog,
        hub="offline",
        max_new_tokens_cap=8,
        max_num_beams=2,
        max_inputs_per_request=16,
        max_chars_per_input=3000,
    )


@pytest.fixture(scope="module", params=LAYOUTS)
def api(local_catalog: Path, request: pytest.FixtureRequest) -> Iterator[TestClient]:
    settings = small_settings(local_catalog)
    with contextlib.ExitStack() as stack:
        if request.param == "one-process":
            app = create_app(settings)
        else:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="tessera-test-"))
            core = stack.enter_context(engine_thread(settings, Path(folder)))
            app = create_app(settings, engine=Front(core.address, "front-0"))  # type: ignore[attr-defined]
            app.state.engine_core = core
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client


# -- what a client may send ---------------------------------------------------------------

NASTY_TEXTS = [
    "bad \ud800 surrogate",
    "\udfff",
    "nul \x00 char",
    "\x1b[31mred\x1b[0m \x07",
    "\u202e\u202d right-to-left \u200f",
    "emoji \U0001f600\U0001f680 \u200d",
    "\ufeff",
    "\x85",
    "\u3000",
    "{} {0} %s {{}} }{",
    '"quoted" \\ backslash',
]
NUMBERS = st.one_of(
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2, 2**31, 2**63, 2**64, -(2**63), 10**30, 1e308, -1e308, 5e-324, 1e-308, 0.01, 100]),
)
# Valid Unicode of every kind (controls, NUL, RTL marks, emoji: hypothesis's text() leaves out
# only surrogates), sizes at and past the limits; then the lone surrogates too.
READABLE = st.one_of(
    st.text(max_size=40),
    st.sampled_from([t for t in NASTY_TEXTS if "\ud800" not in t and "\udfff" not in t]),
    st.text(max_size=5000),
    st.sampled_from([2999, 3000, 3001, 100_000]).map(lambda n: "A" * n),  # at and past the character limit
    st.integers(1, 1000).map(lambda n: "word " * n),  # past the models' token maximum
)
TEXTS = st.one_of(READABLE, st.text(st.characters(exclude_categories=()), max_size=40), st.sampled_from(NASTY_TEXTS))
LEAVES = st.one_of(st.none(), st.booleans(), NUMBERS, TEXTS)
JSON = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXTS, inner, max_size=3))
INPUTS = st.one_of(TEXTS, st.lists(TEXTS, max_size=20), JSON)
MODELS = st.one_of(st.sampled_from(LOCAL), TEXTS, JSON)


FINITE = st.floats(allow_nan=False, allow_infinity=False)
# Per field, a value of its type: at the edges of its range, or far past them.
GENERATION = {
    "max_new_tokens": st.one_of(st.integers(-1, 20), NUMBERS),
    "min_length": st.one_of(st.integers(-1, 20), NUMBERS),
    "max_length": st.one_of(st.integers(0, 20), NUMBERS),
    "num_beams": st.integers(-2, 4),
    "do_sample": st.booleans(),
    "temperature": st.one_of(FINITE, st.sampled_from([0.01, 100, 1e-308, 1e308])),
    "top_k": st.one_of(st.integers(0, 50), NUMBERS),
    "top_p": st.one_of(st.floats(0, 1), NUMBERS),
    "repetition_penalty": st.one_of(FINITE, st.sampled_from([0.01, 100, 1e-308, 1e308])),
    "no_repeat_ngram_size": st.one_of(st.integers(0, 5), NUMBERS),
    "length_penalty": st.one_of(FINITE, st.sampled_from([-10, 10, -1e308, 1e308])),
    "early_stopping": st.booleans(),
}
CLASSIFY = {
    "top_k": st.one_of(st.none(), st.integers(0, 5), NUMBERS),
    "function_to_apply": st.sampled_from(["softmax", "sigmoid", "none", "tanh"]),
    "candidate_labels": st.lists(TEXTS, max_size=4),
    "hypothesis_template": st.one_of(TEXTS, st.sampled_from(["{}", "about {} {x}", "{}{}", "{0} {}", "\ud800{}"])),
    "multi_label": st.booleans(),
}
EMBEDDING = {
    "normalize": st.booleans(),
    "truncate": st.booleans(),
    "truncation_direction": st.sampled_from(["left", "right"]),
    "dimensions": st.one_of(st.sampled_from([32, 384]), NUMBERS),
    "encoding_format": st.sampled_from(["float", "base64"]),
    "prompt_name": TEXTS,
}
TOKENS = {
    "aggregation_strategy": st.sampled_from(["none", "simple", "first", "average", "max", "longest"]),
    "ignore_labels": st.lists(TEXTS, max_size=3),
    "stride": st.one_of(st.integers(0, 600), NUMBERS),
}
RERANK = {
    "raw_scores": st.booleans(),
    "return_text": st.booleans(),
    "truncate": st.booleans(),
    "truncation_direction": st.sampled_from(["right", "left", "Right"]),
    "top_n": st.one_of(st.integers(0, 30), NUMBERS),
    "return_documents": st.booleans(),
    "rank_fields": st.lists(TEXTS, max_size=2),
    "max_chunks_per_doc": NUMBERS,
    "max_tokens_per_doc": NUMBERS,
}
HF = {
    **CLASSIFY,
    **EMBEDDING,
    **TOKENS,
    "src_lang": st.sampled_from(["en", "de", "fr"]),
    "tgt_lang": st.sampled_from(["en", "de", "fr"]),
    "truncation": st.sampled_from(["do_not_truncate", "longest_first", "only_first", "only_second"]),
    "clean_up_tokenization_spaces": st.booleans(),
}


def hf_parameters_of(field: Callable[[st.SearchStrategy[Any]], st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """An HF body's parameters: every task's, with arbitrary values (through ``field``)."""
    generation = field(st.fixed_dictionaries({}, optional={k: field(v) for k, v in GENERATION.items()}))
    return field(
        st.fixed_dictionaries({}, optional={**{k: field(v) for k, v in HF.items()}, "generate_parameters": generation})
    )


def requests(anything: bool) -> st.SearchStrategy[tuple[str, Any]]:
    """(path, body) for every JSON route: bodies of the right shape whose texts and numbers
    are arbitrary, or (``anything``) any JSON value in any field."""

    def field(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(strategy, JSON) if anything else strategy

    def fields(spec: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
        return field(st.fixed_dictionaries({}, optional={k: field(v) for k, v in spec.items()}))

    texts = TEXTS if anything else READABLE
    inputs = st.one_of(texts, st.lists(texts, min_size=1, max_size=20), *([JSON] if anything else []))
    models = field(st.sampled_from(LOCAL))
    timeout = field(st.one_of(st.integers(0, 5), NUMBERS))
    generation = fields(GENERATION)

    def body(**optional: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
        return st.fixed_dictionaries({"inputs": inputs}, optional=optional)

    routes = {
        "/classify": body(model=models, parameters=fields(CLASSIFY), timeout_s=timeout),
        "/translate": body(
            model=models,
            source_lang=field(st.sampled_from(["en", "de", "fr"])),
            target_lang=field(st.sampled_from(["en", "de", "fr"])),
            parameters=generation,
            timeout_s=timeout,
        ),
        "/summarize": body(
            model=models,
            parameters=fields(
                {**GENERATION, "long_input": st.sampled_from(["truncate", "chunk"]), "max_sentences": NUMBERS}
            ),
            timeout_s=timeout,
        ),
        "/embed": body(model=models, normalize=field(st.booleans()), timeout_s=timeout),
        "/token-classification": body(model=models, parameters=fields(TOKENS), timeout_s=timeout),
    }
    documents = st.lists(
        st.one_of(texts, st.fixed_dictionaries({"text": texts}, optional={"id": field(LEAVES)})),
        min_size=1,
        max_size=20,
    )
    rerank_options = {k: field(v) for k, v in RERANK.items()}
    reranks = {
        "/rerank": st.fixed_dictionaries(
            {"query": texts, "texts": st.lists(texts, min_size=1, max_size=20)},
            optional={"model": models, "timeout_s": timeout, **rerank_options},
        ),
        **{
            path: st.fixed_dictionaries(
                {"query": texts, "documents": field(documents)},
                optional={"model": models, "timeout_s": timeout, **rerank_options},
            )
            for path in ("/v1/rerank", "/v2/rerank")
        },
    }
    similarity = st.fixed_dictionaries(
        {"inputs": field(st.fixed_dictionaries({"source_sentence": texts, "sentences": st.lists(texts, max_size=20)}))},
        optional={"parameters": hf_parameters_of(field)},
    )
    hf_body = body(parameters=hf_parameters_of(field), **{k: field(v) for k, v in EMBEDDING.items()})
    openai_body = st.fixed_dictionaries(
        {"input": inputs, "model": models},
        optional={"encoding_format": field(EMBEDDING["encoding_format"]), "dimensions": field(NUMBERS)},
    )
    return st.one_of(
        *(st.tuples(st.just(path), strategy) for path, strategy in {**routes, **reranks}.items()),
        st.tuples(st.sampled_from(LOCAL).map(lambda name: f"/models/{name}"), hf_body),
        st.tuples(st.sampled_from(["/models/bert-rerank", "/models/minilm-rerank"]), similarity),
        st.tuples(st.just("/v1/embeddings"), openai_body),
    )


def encoded(value: Any) -> bytes:
    """JSON as a careless client writes it: NaN and Infinity included, surrogates escaped."""
    return json.dumps(value, allow_nan=True).encode()


def assert_client_error_or_success(response: httpx.Response, request: str) -> None:
    assert response.status_code < 500, f"{request} -> {response.status_code} {response.text[:500]}"
    if response.status_code >= 400:
        body = response.json()
        message = body["message"] if "message" in body else body["error"]["message"]  # ours / OpenAI's envelope
        assert message, request


# -- the properties -----------------------------------------------------------------------


def post_json(api: TestClient, path: str, value: Any) -> None:
    response = api.post(path, content=encoded(value), headers={"content-type": "application/json"})
    event(f"{path.split('/')[1]} {response.status_code}")  # --hypothesis-show-statistics: what ran
    assert_client_error_or_success(response, f"POST {path} {encoded(value)[:300]!r}")


# One route and model per runner family, with the least a request needs besides its texts.
EVERY_RUNNER = [
    ("/classify", {"model": "bert-clf"}),
    ("/classify", {"model": "distilbert-clf"}),
    ("/classify", {"model": "minilm-sentiment"}),
    ("/classify", {"model": "nli", "parameters": {"candidate_labels": ["sports", "politics"]}}),
    ("/translate", {"model": "marian-en-de"}),
    ("/translate", {"model": "t5-en-fr"}),
    ("/summarize", {"model": "bart-sum"}),
    ("/summarize", {"model": "t5-sum", "parameters": {"long_input": "chunk"}}),
    ("/summarize", {"model": "minilm-extractive"}),
    ("/embed", {"model": "bert-embed"}),
    ("/models/minilm", {}),
    ("/models/nli", {"parameters": {"candidate_labels": ["a", "b"]}}),
    ("/v1/embeddings", {"model": "minilm"}),
    ("/token-classification", {"model": "bert-ner", "parameters": {"aggregation_strategy": "average"}}),
    ("/models/bert-ner", {"parameters": {"aggregation_strategy": "none"}}),
    ("/rerank", {"model": "bert-rerank", "query": "which one?"}),
    ("/v1/rerank", {"model": "minilm-rerank", "query": "which one?"}),
]
# The field a route's texts go in: "inputs" unless named here.
TEXTS_FIELD = {"/v1/embeddings": "input", "/rerank": "texts", "/v1/rerank": "documents"}


# Readable, non-blank and within the character limit: every one of these must be answered.
ANSWERABLE = st.one_of(
    st.text(min_size=1, max_size=300),
    st.sampled_from([t for t in NASTY_TEXTS if "\ud800" not in t and "\udfff" not in t]),
    st.integers(1, 590).map(lambda n: "word " * n),  # up to the limit, past the models' token maximum
).filter(lambda text: text_problem(text) is None)  # the API's own rule, as its schema states it


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(EVERY_RUNNER), st.lists(ANSWERABLE, min_size=1, max_size=8))
def test_any_readable_text_reaches_its_model_and_is_answered(
    api: TestClient, route: tuple[str, dict[str, Any]], texts: list[str]
) -> None:
    path, extra = route
    field = TEXTS_FIELD.get(path, "inputs")
    response = api.post(path, content=encoded({field: texts, **extra}), headers={"content-type": "application/json"})
    assert response.status_code == 200, f"{path} {texts!r:.300} -> {response.text[:300]}"
    body = response.json()
    answers = body if isinstance(body, list) else body.get("results") or body.get("embeddings") or body["data"]
    assert len(answers) == len(texts)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.sampled_from(EVERY_RUNNER),
    st.lists(ANSWERABLE, min_size=1, max_size=8),
    st.data(),
    st.integers(0xD800, 0xDFFF).map(chr),
)
def test_a_lone_surrogate_in_any_text_is_a_422_naming_that_input(
    api: TestClient, route: tuple[str, dict[str, Any]], texts: list[str], data: st.DataObject, surrogate: str
) -> None:
    path, extra = route
    index = data.draw(st.integers(0, len(texts) - 1))
    at = data.draw(st.integers(0, len(texts[index])))
    texts[index] = texts[index][:at] + surrogate + texts[index][at:]
    field = TEXTS_FIELD.get(path, "inputs")
    response = api.post(path, content=encoded({field: texts, **extra}), headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    body = response.json()
    message = body["message"] if "message" in body else body["error"]["message"]
    named = f"input {index} holds" if field in ("input", "inputs") else f"{field}.{index}: Value error, the text holds"
    assert f"{named} a lone surrogate (U+{ord(surrogate):04X}" in message


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(requests(anything=False))
def test_no_request_of_the_right_shape_gets_a_5xx_whatever_its_texts_and_numbers(
    api: TestClient, request: tuple[str, Any]
) -> None:
    post_json(api, *request)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(requests(anything=True))
def test_no_json_body_on_any_route_gets_a_5xx(api: TestClient, request: tuple[str, Any]) -> None:
    post_json(api, *request)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.sampled_from(
        ["/classify", "/translate", "/summarize", "/embed", "/models/minilm", "/v1/embeddings", "/rerank", "/v2/rerank"]
    ),
    st.one_of(
        st.binary(max_size=200),  # not JSON, not UTF-8
        st.integers(1, 200_000).map(lambda depth: b"[" * depth + b"]" * depth),
        st.integers(1, 200_000).map(lambda depth: b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}"),
        st.sampled_from([b"", b"null", b"[]", b"{}", b'"text"', b"NaN", b"1e999", b'{"inputs": "x"}' * 3]),
    ),
)
def test_no_raw_body_gets_a_5xx(api: TestClient, path: str, raw: bytes) -> None:
    response = api.post(path, content=raw, headers={"content-type": "application/json"})
    assert_client_error_or_success(response, f"POST {path} {raw[:100]!r}")


def test_the_server_is_healthy_after_every_property(api: TestClient) -> None:
    # Runs after the properties above (pytest keeps the file's order): nothing is left queued,
    # and the same process still answers.
    assert api.get("/health/live").status_code == 200
    assert api.post("/classify", json={"inputs": "I love this movie", "model": "bert-clf"}).status_code == 200
    for model in api.get("/models").json()["models"]:
        assert model["queue_depth"] == 0, model
        assert model["state"] in ("loaded", "not_loaded"), model


# -- the cases found by hand ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        ("/classify", {"inputs": "bad \ud800 surrogate"}, "input 0 holds a lone surrogate (U+D800 at character 4)"),
        ("/embed", {"inputs": ["ok", "bad \udfff"]}, "input 1 holds a lone surrogate"),
        ("/translate", {"inputs": "x \ud800", "model": "marian-en-de"}, "input 0 holds a lone surrogate"),
        (
            "/summarize",
            {"inputs": "x \ud800. y.", "model": "bart-sum", "parameters": {"long_input": "chunk"}},
            "input 0 holds a lone surrogate",
        ),
        ("/models/bert-clf", {"inputs": "x \ud800"}, "input 0 holds a lone surrogate"),
        ("/v1/embeddings", {"model": "minilm", "input": "x \ud800"}, "input 0 holds a lone surrogate"),
        (
            "/classify",
            {"inputs": "x", "parameters": {"candidate_labels": ["a"], "hypothesis_template": "\ud800 {}"}},
            "hypothesis_template: Value error, the text holds a lone surrogate",
        ),
        (
            "/translate",
            {"inputs": "x", "model": "marian-en-de", "parameters": {"do_sample": True, "temperature": 1e-308}},
            "temperature",
        ),
        (
            "/translate",
            {"inputs": "x", "model": "marian-en-de", "parameters": {"num_beams": 2, "length_penalty": 1e308}},
            "length_penalty",
        ),
        ("/translate", {"inputs": "x", "model": "marian-en-de", "parameters": {"max_length": 1}}, "max_length"),
        ("/classify", {"inputs": "\ufeff \u3000"}, "input 0 is empty or blank"),
    ],
)
def test_inputs_found_by_hand_answer_422_naming_what_to_change(
    api: TestClient, path: str, value: Any, fragment: str
) -> None:
    response = api.post(path, content=encoded(value), headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    body = response.json()
    message = body["message"] if "message" in body else body["error"]["message"]
    assert fragment in message


def test_a_tokenizer_that_fails_on_one_input_fails_only_that_input_with_its_index(api: TestClient) -> None:
    slot = core_of(api.app).registry.slot("bert-clf")  # type: ignore[arg-type]
    api.post("/models/bert-clf/load")
    runner = slot.runner
    real = runner.tokenize

    def picky(payloads: Any) -> Any:
        if any("unreadable" in p.text for p in payloads):
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
        return real(payloads)

    runner.tokenize = picky
    try:
        response = api.post("/classify", json={"inputs": ["fine", "unreadable", "also fine"], "model": "bert-clf"})
    finally:
        runner.tokenize = real
    assert response.status_code == 422, response.text
    assert "input 1 could not be tokenized by model 'bert-clf' (TypeError" in response.json()["message"]


def test_deep_nesting_and_bad_utf8_say_the_body_cannot_be_parsed(api: TestClient) -> None:
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"inputs": "\xff\xfe"}'):
        response = api.post("/classify", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        assert response.json()["error"] == "invalid_body"
        assert "the body could not be parsed" in response.json()["message"]


def test_a_control_character_in_a_model_name_still_gets_an_answer_over_a_real_socket(local_catalog: Path) -> None:
    # uvicorn refuses to send a header holding a control character: the HF route's
    # X-Error-Message, which quotes the name, must not make it drop the connection.
    with running(create_app(small_settings(local_catalog))) as url:
        response = httpx.post(f"{url}/models/%C3%85%1A%F1%93%A9%91", json={"inputs": "x"}, timeout=30)
    assert response.status_code == 404
    assert response.headers["x-error-message"].startswith("unknown model '")
    assert all(" " <= c <= "~" for c in response.headers["x-error-message"])
    assert "\x1a" in response.json()["message"]
