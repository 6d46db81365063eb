"""The Hugging Face Inference API: ``POST /models/{name}``, so that ``huggingface_hub``'s
``InferenceClient("http://host:port/models/<name>")`` works unchanged.

The catalog entry's task (app/tasks.py: its HF task) picks the request body
(app/api/hf_bodies.py, one per entry) and the answer's shape (those of the HF task specs).
Each HF task is an adapter here: it turns the body into a service request, calls the
service (where every rule lives) and shapes the answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from app.api.calls import TASK_ERRORS, call, registry_of, service_of, tenant
from app.api.compat import ReshapedErrorsRoute, error_body
from app.api.fields import as_list
from app.api.hf_bodies import EMBEDDING_FIELDS, HfBody, body_for, parse_body
from app.catalog import Catalog
from app.service.requests import FILL_MASK_TOP_K, Classify, Embed, FillMask, Rerank, Summarize, TokenClassify, Translate
from app.service.service import InferenceService
from app.tasks import task_of


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


class HfLabel(BaseModel):
    label: str
    score: float


class HfTranslation(BaseModel):
    translation_text: str


class HfSummary(BaseModel):
    summary_text: str


class HfFill(BaseModel):
    score: float
    token: int
    token_str: str
    sequence: str


class HfEntity(BaseModel):
    entity_group: str | None = None
    entity: str | None = None
    score: float
    word: str
    start: int
    end: int
    index: int | None = None


@dataclass
class Call:
    """One request on its way through an HF task."""

    request: Request
    service: InferenceService
    name: str  # the catalog entry the path names
    body: Any  # its body model (app/api/hf_bodies.py)

    @property
    def texts(self) -> list[str]:
        return as_list(self.body.inputs)

    @property
    def single(self) -> bool:
        return isinstance(self.body.inputs, str)

    @property
    def tenant(self) -> str:
        return tenant(self.request)


async def _text_classification(c: Call) -> Any:
    params = c.body.parameters
    asked = Classify(c.texts, c.name, params.top_k, params.function_to_apply)
    answer = await call(c.request, c.service.classify(asked, c.tenant))
    return [r.labels for r in answer.results]


async def _zero_shot(c: Call) -> Any:
    params = c.body.parameters
    labels = list(params.candidate_labels) if params.candidate_labels else None
    top_k = getattr(params, "top_k", None)
    template, multi = params.hypothesis_template, params.multi_label
    asked = Classify(c.texts, c.name, top_k, candidate_labels=labels, hypothesis_template=template, multi_label=multi)
    answer = await call(c.request, c.service.classify(asked, c.tenant))
    ranked = [r.labels for r in answer.results]
    if labels is None:  # the entry's own labels: the text-classification shape
        return ranked
    return ranked[0] if c.single else ranked


def _must_fit(params: Any) -> bool:
    return bool(params.truncation == "do_not_truncate")


async def _translation(c: Call) -> Any:
    params = c.body.parameters
    # The body's schema holds src_lang and tgt_lang to this model's own (app/api/hf_bodies.py).
    generation = params.generate_parameters.generate_kwargs()
    asked = Translate(c.texts, c.name, generation=generation, must_fit=_must_fit(params))
    answer = await call(c.request, c.service.translate(asked, c.tenant))
    return [{"translation_text": r.text} for r in answer.results]


async def _summarization(c: Call) -> Any:
    params = c.body.parameters
    generate = getattr(params, "generate_parameters", None)  # absent for an extractive model
    generation = generate.generate_kwargs() if generate is not None else ()
    asked = Summarize(c.texts, c.name, generation, must_fit=_must_fit(params))
    answer = await call(c.request, c.service.summarize(asked, c.tenant))
    return [{"summary_text": r.text} for r in answer.results]


async def _feature_extraction(c: Call) -> Any:
    # huggingface_hub sends these at the top level; the HF spec has them in parameters.
    params = c.body.parameters.model_copy(update=c.body.model_dump(include=EMBEDDING_FIELDS, exclude_unset=True))
    asked = Embed(c.texts, c.name, params.normalize is not False, params.dimensions, must_fit=params.truncate is False)
    answer = await call(c.request, c.service.embed(asked, c.tenant))
    return answer.results[0].vector if c.single else [r.vector for r in answer.results]


async def _fill_mask(c: Call) -> Any:
    params = c.body.parameters
    asked = FillMask(c.texts, c.name, params.top_k or FILL_MASK_TOP_K, params.targets)
    answer = await call(c.request, c.service.fill_mask(asked, c.tenant))
    # The pipeline's shapes: one mask token, its candidates; several, a list per mask.
    per_input = [r.masks[0] if len(r.masks) == 1 else r.masks for r in answer.results]
    return per_input[0] if c.single else per_input


async def _token_classification(c: Call) -> Any:
    params = c.body.parameters
    asked = TokenClassify(
        c.texts,
        c.name,
        params.aggregation_strategy,
        params.ignore_labels,
        params.stride,
        must_fit=_must_fit(params),
    )
    answer = await call(c.request, c.service.token_classify(asked, c.tenant))
    per_input = [r.entities for r in answer.results]
    return per_input[0] if c.single else per_input


async def _sentence_similarity(c: Call) -> Any:
    # A reranker's scores, in the sentences' order (not ranked): the HF API's answer.
    inputs = c.body.inputs
    asked = Rerank(inputs.source_sentence, inputs.sentences, c.name, must_fit=_must_fit(c.body.parameters))
    answer = await call(c.request, c.service.rerank(asked, c.tenant))
    scores = [0.0] * len(inputs.sentences)
    for ranked in answer.results:
        scores[ranked.index] = ranked.score
    return scores


@dataclass(frozen=True)
class HfAdapter:
    """How one HF task is answered: the service call and shape, and what the docs show."""

    run: Callable[[Call], Awaitable[Any]]
    answer: Any  # the answer's type, for the docs
    example: dict[str, Any]
    answer_example: Any


_TEXT = "The new GPU doubles training throughput."
ADAPTERS: dict[str, HfAdapter] = {
    "text-classification": HfAdapter(
        _text_classification,
        list[list[HfLabel]],
        {"inputs": "I love this movie", "parameters": {"top_k": 2}},
        [[{"label": "POSITIVE", "score": 0.9998}, {"label": "NEGATIVE", "score": 0.0002}]],
    ),
    "zero-shot-classification": HfAdapter(
        _zero_shot,
        list[HfLabel] | list[list[HfLabel]],
        {"inputs": _TEXT, "parameters": {"candidate_labels": ["technology", "sports"]}},
        [{"label": "technology", "score": 0.97}, {"label": "sports", "score": 0.03}],
    ),
    "translation": HfAdapter(
        _translation,
        list[HfTranslation],
        {"inputs": "Good morning", "parameters": {"generate_parameters": {"num_beams": 4}}},
        [{"translation_text": "Guten Morgen"}],
    ),
    "summarization": HfAdapter(
        _summarization,
        list[HfSummary],
        {"inputs": "The city council met on Tuesday. Members voted to fund two new bus lines."},
        [{"summary_text": "Members voted to fund two new bus lines."}],
    ),
    "fill-mask": HfAdapter(
        _fill_mask,
        list[HfFill] | list[list[HfFill]] | list[list[list[HfFill]]],
        {"inputs": "The weather is [MASK] today.", "parameters": {"top_k": 2}},
        [
            {"score": 0.41, "token": 3835, "token_str": "nice", "sequence": "the weather is nice today."},
            {"score": 0.12, "token": 2204, "token_str": "good", "sequence": "the weather is good today."},
        ],
    ),
    "token-classification": HfAdapter(
        _token_classification,
        list[HfEntity] | list[list[HfEntity]],
        {"inputs": "My name is Clara and I live in Berkeley.", "parameters": {"aggregation_strategy": "simple"}},
        [
            {"entity_group": "PER", "score": 0.998, "word": "Clara", "start": 11, "end": 16},
            {"entity_group": "LOC", "score": 0.999, "word": "Berkeley", "start": 31, "end": 39},
        ],
    ),
    "sentence-similarity": HfAdapter(
        _sentence_similarity,
        list[float],
        {"inputs": {"source_sentence": "capital of France", "sentences": ["Paris is in France.", "Berlin."]}},
        [0.93, 0.12],
    ),
    "feature-extraction": HfAdapter(
        _feature_extraction,
        list[float] | list[list[float]],
        {"inputs": "A man is eating food.", "normalize": True},
        [0.0123, -0.0456, 0.0789],
    ),
}


@dataclass(frozen=True)
class HfTask:
    """How one catalog entry speaks the HF Inference API: its HF task, body and adapter."""

    task: str
    body: type[HfBody]
    adapter: HfAdapter


def hf_tasks(catalog: Catalog) -> dict[str, HfTask]:
    """Per catalog entry, built once at start-up."""
    tasks = {}
    for entry in catalog.models:
        hf_task = task_of(entry).hf_task
        tasks[entry.name] = HfTask(hf_task, body_for(entry, hf_task), ADAPTERS[hf_task])
    return tasks


@router.post("/models/{name}", response_model=None, responses=TASK_ERRORS, summary="Hugging Face Inference API")
async def hf_inference(name: str, request: Request) -> JSONResponse:
    """Run a catalog model as the Hugging Face Inference API does, so that
    `InferenceClient("http://host:port/models/<name>")` works unchanged: `text_classification`,
    `zero_shot_classification`, `translation`, `summarization`, `feature_extraction`, `fill_mask`,
    `token_classification` and (a reranker) `sentence_similarity`.
    The model's catalog task decides the parameters and the answer's shape. Errors carry
    their message in the `X-Error-Message` header too (that is what huggingface_hub shows)."""
    registry_of(request).slot(name)  # 404 for a name the catalog does not have
    task: HfTask = request.app.state.hf_tasks[name]
    body = parse_body(task.body, await request.body())
    return JSONResponse(await task.adapter.run(Call(request, service_of(request), name, body)))
