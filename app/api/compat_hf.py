"""The Hugging Face Inference API: ``POST /models/{name}``, so that ``huggingface_hub``'s
``InferenceClient("http://host:port/models/<name>")`` works unchanged.

The catalog entry's task picks the request parameters and the answer's shape (those of
the HF task specs); the work goes through the same registry, runner payloads and limits
as the task routes in ``app.api.tasks``. An HF parameter that has no meaning here is
refused with a 422 naming it, never silently ignored.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Body, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.api.compat import ReshapedErrorsRoute, error_body
from app.api.schemas import GenerationParameters, Inputs, Text, as_list
from app.api.tasks import (
    TASK_ERRORS,
    check_generation,
    check_inputs,
    registry_of,
    settings_of,
    timeout_of,
    until_disconnect,
    zero_shot_payloads,
)
from app.config import Endpoint, Settings
from app.errors import InputTooLarge, InvalidInput, WrongTask
from app.registry.registry import ModelRegistry
from app.runners.classification import ClassifyInput
from app.runners.embedding import EmbedInput, ExtractInput
from app.runners.seq2seq import Seq2SeqInput


class HfErrorsRoute(ReshapedErrorsRoute):
    """huggingface_hub shows a server's ``X-Error-Message`` header, not our body's ``message``."""

    def reshape(self, response: Response) -> Response:
        message = error_body(response).get("message")
        if message:
            one_line = " ".join(str(message).split())[:2000]
            response.headers["X-Error-Message"] = one_line.encode("latin-1", "replace").decode("latin-1")
        return response


router = APIRouter(tags=["Hugging Face compatibility"], route_class=HfErrorsRoute)

M = TypeVar("M", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# -- parameters, per task (the names huggingface_hub sends) ---------------------------


class ClassificationParameters(_Strict):
    top_k: int | None = Field(None, ge=1, description="Labels to return; omitted: all, best first.")
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = None


class ZeroShotParameters(_Strict):
    candidate_labels: list[Text] = Field(..., min_length=1, max_length=100)
    multi_label: bool = False
    hypothesis_template: str | None = None

    @model_validator(mode="after")
    def _template_has_slot(self) -> ZeroShotParameters:
        if self.hypothesis_template is not None and self.hypothesis_template.count("{}") != 1:
            raise ValueError("hypothesis_template must contain '{}' exactly once, e.g. 'This text is about {}.'")
        return self


Truncation = Literal["do_not_truncate", "longest_first", "only_first", "only_second"]


class GenerationTaskParameters(_Strict):
    clean_up_tokenization_spaces: bool | None = None
    truncation: Truncation | None = Field(
        None, description="do_not_truncate: a too-long input answers 413 instead of being cut."
    )
    generate_parameters: GenerationParameters = GenerationParameters()


class TranslationParameters(GenerationTaskParameters):
    src_lang: str | None = None
    tgt_lang: str | None = None


class EmbeddingParameters(_Strict):
    normalize: bool | None = None
    prompt_name: str | None = None
    truncate: bool | None = None
    truncation_direction: Literal["left", "right"] | None = None
    dimensions: int | None = Field(None, ge=1)
    encoding_format: Literal["float", "base64"] | None = None


EMBEDDING_FIELDS = set(EmbeddingParameters.model_fields)


class HfOptions(_Strict):
    use_cache: bool | None = None
    wait_for_model: bool | None = None


class HfRequest(EmbeddingParameters):
    """``inputs`` and ``parameters`` as the HF task specs define them; feature-extraction
    parameters come at the top level (as huggingface_hub sends them) or in ``parameters``."""

    inputs: Inputs
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="By the model's task. text-classification: top_k, function_to_apply. "
        "zero-shot-classification: candidate_labels, multi_label, hypothesis_template (without "
        "candidate_labels, a zero-shot model with fixed labels answers as text-classification). "
        "translation: src_lang, tgt_lang, truncation, generate_parameters. summarization: truncation, "
        "generate_parameters. feature-extraction: normalize, truncate, dimensions.",
    )
    options: HfOptions | None = Field(
        None, description="Accepted and ignored: the server always waits for a model, and never caches."
    )


class HfLabel(BaseModel):
    label: str
    score: float


class HfTranslation(BaseModel):
    translation_text: str


class HfSummary(BaseModel):
    summary_text: str


HfAnswer = list[list[HfLabel]] | list[HfLabel] | list[HfTranslation] | list[HfSummary] | list[float] | list[list[float]]

_TEXT = "The new GPU doubles training throughput."
REQUEST_EXAMPLES: dict[str, dict[str, Any]] = {
    "text-classification": {
        "summary": "text-classification (e.g. distilbert-sst2)",
        "value": {"inputs": "I love this movie", "parameters": {"top_k": 2}},
    },
    "zero-shot-classification": {
        "summary": "zero-shot-classification",
        "value": {"inputs": _TEXT, "parameters": {"candidate_labels": ["technology", "sports"]}},
    },
    "translation": {
        "summary": "translation (e.g. opus-mt-en-de)",
        "value": {"inputs": "Good morning", "parameters": {"generate_parameters": {"num_beams": 4}}},
    },
    "summarization": {"summary": "summarization", "value": {"inputs": "The city council met ..."}},
    "feature-extraction": {
        "summary": "feature-extraction (an embedding model, e.g. minilm)",
        "value": {"inputs": "A man is eating food.", "normalize": True},
    },
}
ANSWER_EXAMPLES: dict[str, dict[str, Any]] = {
    "text-classification": {
        "summary": "text-classification: per input, labels best first",
        "value": [[{"label": "POSITIVE", "score": 0.9998}, {"label": "NEGATIVE", "score": 0.0002}]],
    },
    "zero-shot-classification": {
        "summary": "zero-shot-classification (one input)",
        "value": [{"label": "technology", "score": 0.97}, {"label": "sports", "score": 0.03}],
    },
    "translation": {"summary": "translation", "value": [{"translation_text": "Guten Morgen"}]},
    "summarization": {"summary": "summarization", "value": [{"summary_text": "The council funded ..."}]},
    "feature-extraction": {
        "summary": "feature-extraction (one input: one vector)",
        "value": [0.0123, -0.0456, 0.0789],
    },
}


# -- the route ----------------------------------------------------------------------------


@dataclass
class Call:
    """One request on its way through a task: what every task function needs."""

    request: Request
    registry: ModelRegistry
    settings: Settings
    entry: Any
    body: HfRequest
    texts: list[str]

    @property
    def single(self) -> bool:
        return isinstance(self.body.inputs, str)

    async def infer(self, payloads: Sequence[Any], group: Hashable = None) -> list[Any]:
        work = self.registry.infer(self.entry.name, payloads, group=group, timeout_s=timeout_of(self.settings, None))
        return await until_disconnect(self.request, work)


@router.post(
    "/models/{name}",
    response_model=None,
    responses={
        200: {
            "model": HfAnswer,
            "description": "The HF Inference API answer of the model's task.",
            "content": {"application/json": {"examples": ANSWER_EXAMPLES}},
        },
        **TASK_ERRORS,
    },
    summary="Hugging Face Inference API",
)
async def hf_inference(
    name: str, body: Annotated[HfRequest, Body(openapi_examples=REQUEST_EXAMPLES)], request: Request
) -> JSONResponse:
    """Run a catalog model as the Hugging Face Inference API does, so that
    `InferenceClient("http://host:port/models/<name>")` works unchanged: `text_classification`,
    `zero_shot_classification`, `translation`, `summarization` and `feature_extraction`.
    The model's catalog task decides the parameters and the answer's shape. Errors carry
    their message in the `X-Error-Message` header too (that is what huggingface_hub shows)."""
    registry, settings = registry_of(request), settings_of(request)
    entry = registry.slot(name).entry
    texts = as_list(body.inputs)
    check_inputs(settings, texts)
    embedding_fields = sorted(body.model_fields_set & EMBEDDING_FIELDS)
    if embedding_fields and entry.task != "embedding":
        raise WrongTask(
            f"{', '.join(embedding_fields)} {'apply' if len(embedding_fields) > 1 else 'applies'} to "
            "embedding (feature-extraction) models only; "
            f"'{entry.name}' is a {entry.task} model"
        )
    call = Call(request, registry, settings, entry, body, texts)
    return JSONResponse(await TASKS[entry.task](call))


def parse(model: type[M], data: dict[str, Any]) -> M:
    """Validate ``parameters`` for the model's task; errors answer 422 like any request field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", "parameters", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


def _too_long(call: Call, results: Sequence[Any], option: str) -> None:
    for i, result in enumerate(results):
        if result.truncated:
            raise InputTooLarge(
                f"input {i} is longer than model '{call.entry.name}' accepts and {option}; "
                "shorten it, or allow truncation"
            )


async def _text_classification(call: Call) -> Any:
    if "candidate_labels" in call.body.parameters:
        raise WrongTask(
            f"model '{call.entry.name}' is a text-classification model; candidate_labels need a zero-shot "
            f"model: {', '.join(call.registry.names_for(Endpoint.zero_shot)) or 'none in the catalog'}"
        )
    params = parse(ClassificationParameters, call.body.parameters)
    results = await call.infer([ClassifyInput(t, params.top_k, params.function_to_apply) for t in call.texts])
    return [r.labels[: params.top_k] if params.top_k else r.labels for r in results]


async def _zero_shot(call: Call) -> Any:
    entry = call.entry
    if "candidate_labels" not in call.body.parameters:
        if not entry.labels:
            raise InvalidInput(
                f"model '{entry.name}' is a zero-shot model: send parameters.candidate_labels, "
                "the labels to choose from"
            )
        return await _fixed_labels(call)
    params = parse(ZeroShotParameters, call.body.parameters)
    payloads = zero_shot_payloads(
        entry, call.texts, list(params.candidate_labels), params.hypothesis_template, params.multi_label
    )
    results = await call.infer(payloads)
    return results[0].labels if call.single else [r.labels for r in results]


async def _fixed_labels(call: Call) -> Any:
    """A zero-shot entry with its own labels, asked as text-classification (as /classify does)."""
    entry = call.entry
    params = parse(ClassificationParameters, call.body.parameters)
    if params.function_to_apply is not None:
        raise WrongTask(f"function_to_apply does not apply to the zero-shot model '{entry.name}'; drop it")
    results = await call.infer(zero_shot_payloads(entry, call.texts, None, None))
    return [r.labels[: params.top_k] if params.top_k else r.labels for r in results]


def _generation(call: Call, params: GenerationTaskParameters) -> tuple[tuple[str, Any], ...]:
    if params.clean_up_tokenization_spaces is not None:
        raise InvalidInput(
            "clean_up_tokenization_spaces is not supported: outputs are decoded with the model "
            "tokenizer's own setting; drop it"
        )
    if params.truncation == "only_second":
        raise InvalidInput("truncation 'only_second' needs a pair of texts; this task reads one")
    check_generation(call.settings, params.generate_parameters)
    return params.generate_parameters.generate_kwargs()


async def _translation(call: Call) -> Any:
    entry = call.entry
    params = parse(TranslationParameters, call.body.parameters)
    if (params.src_lang is None) != (params.tgt_lang is None):
        raise InvalidInput("give both src_lang and tgt_lang, or neither")
    if params.src_lang is not None and (
        params.src_lang not in (entry.source_lang, entry.tokenizer_src_lang)
        or params.tgt_lang not in (entry.target_lang, entry.forced_bos_token)
    ):
        raise WrongTask(
            f"model '{entry.name}' translates {entry.source_lang}->{entry.target_lang}, not "
            f"{params.src_lang}->{params.tgt_lang}; drop src_lang/tgt_lang or use another model"
        )
    generation = _generation(call, params)
    results = await call.infer([Seq2SeqInput(t, generation) for t in call.texts], group=generation)
    if params.truncation == "do_not_truncate":
        _too_long(call, results, "truncation is 'do_not_truncate'")
    return [{"translation_text": r.text} for r in results]


async def _summarization(call: Call) -> Any:
    entry = call.entry
    params = parse(GenerationTaskParameters, call.body.parameters)
    generation = _generation(call, params)
    if entry.engine == "extractive":
        if generation:
            raise InvalidInput(f"generate_parameters do not apply to the extractive model '{entry.name}'; drop them")
        results = await call.infer([ExtractInput(t, entry.max_sentences) for t in call.texts])
    else:
        results = await call.infer([Seq2SeqInput(t, generation) for t in call.texts], group=generation)
    if params.truncation == "do_not_truncate":
        _too_long(call, results, "truncation is 'do_not_truncate'")
    return [{"summary_text": r.text} for r in results]


async def _feature_extraction(call: Call) -> Any:
    params = parse(EmbeddingParameters, call.body.parameters).model_copy(
        update=call.body.model_dump(include=EMBEDDING_FIELDS, exclude_unset=True)
    )
    if params.prompt_name is not None:
        raise InvalidInput("prompt_name is not supported: this server applies no prompts; prepend it yourself")
    if params.truncation_direction == "left":
        raise InvalidInput("truncation_direction 'left' is not supported: long inputs are cut on the right")
    if params.encoding_format == "base64":
        raise InvalidInput(
            "encoding_format 'base64' is for the OpenAI-compatible POST /v1/embeddings; this route answers floats"
        )
    normalize = params.normalize is not False
    results = await call.infer([EmbedInput(t, normalize) for t in call.texts])
    if params.truncate is False:
        _too_long(call, results, "truncate is false")
    size = len(results[0].vector)
    if params.dimensions is not None and params.dimensions != size:
        raise InvalidInput(
            f"model '{call.entry.name}' gives {size}-dimensional vectors, not {params.dimensions}; drop dimensions"
        )
    return results[0].vector if call.single else [r.vector for r in results]


# The catalog task decides the HF task the route speaks.
TASKS: dict[str, Callable[[Call], Awaitable[Any]]] = {
    "text-classification": _text_classification,
    "zero-shot-classification": _zero_shot,
    "translation": _translation,
    "summarization": _summarization,
    "embedding": _feature_extraction,
}
