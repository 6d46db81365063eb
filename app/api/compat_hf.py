"""The Hugging Face Inference API: ``POST /models/{name}``, so that ``huggingface_hub``'s
``InferenceClient("http://host:port/models/<name>")`` works unchanged.

The catalog entry's task picks the request body and the answer's shape (those of the HF
task specs). Each entry gets its own body model, built once from the catalog: it both
validates requests and documents them (``app.api.openapi`` gives every model its own
path), so a translation model's body names its own languages and an embedding model's
its own vector size. The work goes through the same registry, runner payloads and limits
as the task routes in ``app.api.tasks``. An HF parameter that has no meaning here is
refused with a 422 naming it, never silently ignored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model

from app.api.compat import ReshapedErrorsRoute, error_body
from app.api.fields import Inputs, Labels, PositiveInt, Template, as_list, integral
from app.api.schemas import GenerationParameters
from app.api.security import tenant_of
from app.api.tasks import (
    TASK_ERRORS,
    admit,
    check_generation,
    registry_of,
    settings_of,
    timeout_of,
    until_disconnect,
    zero_shot_payloads,
)
from app.config import Settings
from app.errors import InputTooLarge, InvalidInput, WrongTask
from app.registry.catalog import Catalog
from app.registry.registry import ModelRegistry
from app.registry.sources import declared_width
from app.service.types import ClassifyInput, EmbedInput, ExtractInput, Seq2SeqInput


class HfErrorsRoute(ReshapedErrorsRoute):
    """huggingface_hub shows a server's ``X-Error-Message`` header, not our body's ``message``."""

    def reshape(self, response: Response) -> Response:
        message = error_body(response).get("message")
        if message:
            # A header carries visible ASCII only: a control character (say, from a model name
            # in the path) would make the server drop the connection instead of answering.
            one_line = " ".join(str(message).split())[:2000]
            response.headers["X-Error-Message"] = "".join(c if " " <= c <= "~" else "?" for c in one_line)
        return response


router = APIRouter(tags=["Hugging Face compatibility"], route_class=HfErrorsRoute)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


# -- parameters, per task (the names huggingface_hub sends) ---------------------------


class ClassificationParameters(_Strict):
    top_k: PositiveInt | None = Field(None, description="Labels to return; omitted: all, best first.")
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = None


class ZeroShotParameters(_Strict):
    candidate_labels: Labels
    multi_label: bool = False
    hypothesis_template: Template | None = None


class FixedLabelsParameters(_Strict):
    """A zero-shot entry with labels of its own: without candidate_labels it answers as
    text-classification over its labels (as /classify does)."""

    candidate_labels: Labels | None = None
    multi_label: bool = False
    hypothesis_template: Template | None = None
    top_k: PositiveInt | None = Field(None, description="Without candidate_labels: labels to return.")


Truncation = Literal["do_not_truncate", "longest_first", "only_first"]
TRUNCATION = Field(None, description="do_not_truncate: a too-long input answers 413 instead of being cut.")


class ExtractiveParameters(_Strict):
    truncation: Truncation | None = TRUNCATION


class SummarizationParameters(ExtractiveParameters):
    generate_parameters: GenerationParameters = Field(default_factory=GenerationParameters)


class TranslationParameters(SummarizationParameters):
    src_lang: str | None = None
    tgt_lang: str | None = None


class EmbeddingParameters(_Strict):
    normalize: bool | None = None
    truncate: bool | None = Field(None, description="false: a too-long input answers 413 instead of being cut.")
    truncation_direction: Literal["right"] | None = None
    dimensions: PositiveInt | None = Field(None, description="Accepted when equal to the model's vector size.")
    encoding_format: Literal["float"] | None = None


EMBEDDING_FIELDS = set(EmbeddingParameters.model_fields)


class HfOptions(_Strict):
    use_cache: bool | None = None
    wait_for_model: bool | None = None


class HfBody(_Strict):
    """What every task's body holds; each task adds its ``parameters``."""

    inputs: Inputs
    options: HfOptions | None = Field(
        None, description="Accepted and ignored: the server always waits for a model, and never caches."
    )


# HF parameters (and values) that have no meaning here, refused by name with what to do instead.
UNSUPPORTED: dict[str, str] = {
    "clean_up_tokenization_spaces": "clean_up_tokenization_spaces is not supported: outputs are decoded with "
    "the model tokenizer's own setting; drop it",
    "prompt_name": "prompt_name is not supported: this server applies no prompts; prepend it yourself",
}
UNSUPPORTED_VALUES: dict[tuple[str, Any], str] = {
    ("truncation", "only_second"): "truncation 'only_second' needs a pair of texts; this task reads one",
    ("truncation_direction", "left"): "truncation_direction 'left' is not supported: long inputs are cut on the right",
    ("encoding_format", "base64"): "encoding_format 'base64' is for the OpenAI-compatible POST /v1/embeddings; "
    "this route answers floats",
}


def refuse_unsupported(data: dict[str, Any]) -> None:
    """The clear refusal for an HF parameter this server does not implement, wherever it is sent."""
    params = data.get("parameters")
    for where in (data, params if isinstance(params, dict) else {}):
        for key, value in where.items():
            if key in UNSUPPORTED:
                raise InvalidInput(UNSUPPORTED[key])
            if isinstance(value, str | int | float | bool) and (key, value) in UNSUPPORTED_VALUES:
                raise InvalidInput(UNSUPPORTED_VALUES[(key, value)])


# -- answers ------------------------------------------------------------------------------


class HfLabel(BaseModel):
    label: str
    score: float


class HfTranslation(BaseModel):
    translation_text: str


class HfSummary(BaseModel):
    summary_text: str


# -- one request on its way through a task ------------------------------------------------


@dataclass
class Call:
    request: Request
    registry: ModelRegistry
    settings: Settings
    entry: Any
    body: Any  # the entry's body model
    texts: list[str]

    @property
    def single(self) -> bool:
        return isinstance(self.body.inputs, str)

    async def infer(self, payloads: Sequence[Any], group: Hashable = None) -> list[Any]:
        timeout = timeout_of(self.settings, None)
        tenant = tenant_of(self.request)
        work = self.registry.infer(self.entry.name, payloads, group=group, timeout_s=timeout, tenant=tenant)
        return await until_disconnect(self.request, work)


def _too_long(call: Call, results: Sequence[Any], option: str) -> None:
    for i, result in enumerate(results):
        if result.truncated:
            raise InputTooLarge(
                f"input {i} is longer than model '{call.entry.name}' accepts and {option}; "
                "shorten it, or allow truncation"
            )


def _top(labels: list[Any], top_k: int | None) -> list[Any]:
    return labels[:top_k] if top_k else labels


async def _text_classification(call: Call) -> Any:
    params: ClassificationParameters = call.body.parameters
    results = await call.infer([ClassifyInput(t, params.top_k, params.function_to_apply) for t in call.texts])
    return [_top(r.labels, params.top_k) for r in results]


async def _zero_shot(call: Call) -> Any:
    params: ZeroShotParameters | FixedLabelsParameters = call.body.parameters
    labels = list(params.candidate_labels) if params.candidate_labels else None
    payloads = zero_shot_payloads(call.entry, call.texts, labels, params.hypothesis_template, params.multi_label)
    results = await call.infer(payloads)
    top_k = getattr(params, "top_k", None)
    if labels is None:  # the entry's own labels: the text-classification shape
        return [_top(r.labels, top_k) for r in results]
    ranked = [_top(r.labels, top_k) for r in results]
    return ranked[0] if call.single else ranked


def _generation(call: Call, params: SummarizationParameters) -> tuple[tuple[str, Any], ...]:
    check_generation(call.settings, params.generate_parameters)
    return params.generate_parameters.generate_kwargs()


async def _translation(call: Call) -> Any:
    params: TranslationParameters = call.body.parameters
    generation = _generation(call, params)
    results = await call.infer([Seq2SeqInput(t, generation) for t in call.texts], group=generation)
    if params.truncation == "do_not_truncate":
        _too_long(call, results, "truncation is 'do_not_truncate'")
    return [{"translation_text": r.text} for r in results]


async def _summarization(call: Call) -> Any:
    params: ExtractiveParameters = call.body.parameters
    if isinstance(params, SummarizationParameters):
        generation = _generation(call, params)
        results = await call.infer([Seq2SeqInput(t, generation) for t in call.texts], group=generation)
    else:
        results = await call.infer([ExtractInput(t, call.entry.max_sentences) for t in call.texts])
    if params.truncation == "do_not_truncate":
        _too_long(call, results, "truncation is 'do_not_truncate'")
    return [{"summary_text": r.text} for r in results]


async def _feature_extraction(call: Call) -> Any:
    # huggingface_hub sends these at the top level; the HF spec has them in parameters.
    top_level = call.body.model_dump(include=EMBEDDING_FIELDS, exclude_unset=True)
    params: EmbeddingParameters = call.body.parameters.model_copy(update=top_level)
    normalize = params.normalize is not False
    results = await call.infer([EmbedInput(t, normalize) for t in call.texts])
    if params.truncate is False:
        _too_long(call, results, "truncate is false")
    size = len(results[0].vector)
    if params.dimensions is not None and params.dimensions != size:
        raise WrongTask(
            f"model '{call.entry.name}' gives {size}-dimensional vectors, not {params.dimensions}; drop dimensions"
        )
    return results[0].vector if call.single else [r.vector for r in results]


# -- one table: the HF task each catalog entry speaks -------------------------------------


@dataclass(frozen=True)
class HfTask:
    """How one catalog entry speaks the HF Inference API."""

    task: str  # the HF task name
    body: type[HfBody]  # validates and documents the entry's requests
    run: Callable[[Call], Awaitable[Any]]
    answer: Any  # the answer's type, for the docs
    example: dict[str, Any]
    answer_example: Any


_TEXT = "The new GPU doubles training throughput."


def _body(
    entry: Any, parameters: type[BaseModel], required: bool = False, top_level: dict[str, Any] | None = None
) -> type[HfBody]:
    """The entry's own body model (its name in the OpenAPI document: Hf_<entry>)."""
    default = ... if required else Field(default_factory=parameters)
    fields: dict[str, Any] = {"parameters": (parameters, default), **(top_level or {})}
    model: type[HfBody] = create_model("Hf_" + _identifier(entry.name), __base__=HfBody, **fields)
    return model


def _identifier(name: str) -> str:
    return re.sub(r"\W", "_", name)


def _one_of(*values: Any) -> Any:
    """Literal[values] (None dropped), or str where there are none."""
    kept = tuple(dict.fromkeys(v for v in values if v is not None))
    return Literal[kept] if kept else str


def hf_task(entry: Any) -> HfTask:
    """The HF task, body and answer of one catalog entry."""
    task, engine = entry.task, getattr(entry, "engine", None)
    if task == "text-classification":
        return HfTask(
            "text-classification",
            _body(entry, ClassificationParameters),
            _text_classification,
            list[list[HfLabel]],
            {"inputs": "I love this movie", "parameters": {"top_k": 2}},
            [[{"label": "POSITIVE", "score": 0.9998}, {"label": "NEGATIVE", "score": 0.0002}]],
        )
    if task == "zero-shot-classification":
        fixed = bool(entry.labels)
        return HfTask(
            "zero-shot-classification",
            _body(entry, FixedLabelsParameters if fixed else ZeroShotParameters, required=not fixed),
            _zero_shot,
            list[HfLabel] | list[list[HfLabel]],
            {"inputs": _TEXT, "parameters": {"candidate_labels": ["technology", "sports"]}},
            [{"label": "technology", "score": 0.97}, {"label": "sports", "score": 0.03}],
        )
    if task == "translation":
        languages = create_model(
            "HfTranslationParameters_" + _identifier(entry.name),
            __base__=TranslationParameters,
            src_lang=(_one_of(entry.source_lang, entry.tokenizer_src_lang) | None, None),
            tgt_lang=(_one_of(entry.target_lang, entry.forced_bos_token) | None, None),
        )
        return HfTask(
            "translation",
            _body(entry, languages),
            _translation,
            list[HfTranslation],
            {"inputs": "Good morning", "parameters": {"generate_parameters": {"num_beams": 4}}},
            [{"translation_text": "Guten Morgen"}],
        )
    if task == "summarization":
        extractive = engine == "extractive"
        return HfTask(
            "summarization",
            _body(entry, ExtractiveParameters if extractive else SummarizationParameters),
            _summarization,
            list[HfSummary],
            {"inputs": "The city council met on Tuesday. Members voted to fund two new bus lines."},
            [{"summary_text": "Members voted to fund two new bus lines."}],
        )
    width = declared_width(entry)
    sized = EmbeddingParameters
    if width is not None:  # its size is known here: the schema names it
        exact: Any = Annotated[_one_of(width), BeforeValidator(integral)] | None
        sized = create_model(
            "HfEmbeddingParameters_" + _identifier(entry.name),
            __base__=EmbeddingParameters,
            dimensions=(exact, Field(None, description="The model's vector size.")),
        )
    top_level = {name: (info.annotation, info) for name, info in sized.model_fields.items()}
    return HfTask(
        "feature-extraction",
        _body(entry, sized, top_level=top_level),
        _feature_extraction,
        list[float] | list[list[float]],
        {"inputs": "A man is eating food.", "normalize": True},
        [0.0123, -0.0456, 0.0789],
    )


def hf_tasks(catalog: Catalog) -> dict[str, HfTask]:
    return {entry.name: hf_task(entry) for entry in catalog.models}


# -- the route ----------------------------------------------------------------------------


def parse_body(model: type[HfBody], raw: bytes) -> Any:
    """The entry's body from the request's bytes; any failure answers 422 like a task route's."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error", "input": {}}]
        ) from None
    if isinstance(data, dict):
        refuse_unsupported(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


@router.post("/models/{name}", response_model=None, responses=TASK_ERRORS, summary="Hugging Face Inference API")
async def hf_inference(name: str, request: Request) -> JSONResponse:
    """Run a catalog model as the Hugging Face Inference API does, so that
    `InferenceClient("http://host:port/models/<name>")` works unchanged: `text_classification`,
    `zero_shot_classification`, `translation`, `summarization` and `feature_extraction`.
    The model's catalog task decides the parameters and the answer's shape. Errors carry
    their message in the `X-Error-Message` header too (that is what huggingface_hub shows)."""
    registry, settings = registry_of(request), settings_of(request)
    entry = registry.slot(name).entry
    task: HfTask = request.app.state.hf_tasks[name]
    body = parse_body(task.body, await request.body())
    texts = as_list(body.inputs)
    admit(request, texts)
    return JSONResponse(await task.run(Call(request, registry, settings, entry, body, texts)))
