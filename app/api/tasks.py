"""The task routes: /classify, /translate, /summarize, /embed.

Each route validates the request, picks the catalog model, turns inputs into runner
payloads and hands them to the registry; it never touches torch. A client that
disconnects has its work cancelled, which drops its queued inputs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

from fastapi import APIRouter, Request

from app.api.errors import error_responses
from app.api.fields import as_list
from app.api.json_route import JsonBodyRoute
from app.api.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    EmbedRequest,
    EmbedResponse,
    GenerationParameters,
    SummarizeRequest,
    SummarizeResponse,
    Summary,
    TranslateRequest,
    TranslateResponse,
    Translation,
)
from app.api.security import RateLimit, tenant_of
from app.config import Settings
from app.errors import InputTooLarge, InvalidInput, WrongTask
from app.registry.registry import ModelRegistry, translates
from app.runners.seq2seq import Seq2SeqRunner
from app.service.types import ClassifyInput, EmbedInput, ExtractInput, Seq2SeqInput, ZeroShotInput
from app.tasks import Endpoint

router = APIRouter(tags=["tasks"], route_class=JsonBodyRoute)
T = TypeVar("T")

TASK_ERRORS = error_responses(400, 401, 404, 413, 422, 429, 500, 503, 504)


def registry_of(request: Request) -> ModelRegistry:
    return request.app.state.registry


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


def check_inputs(settings: Settings, texts: list[str]) -> None:
    if len(texts) > settings.max_inputs_per_request:
        raise InputTooLarge(
            f"{len(texts)} inputs in one request; the limit is {settings.max_inputs_per_request} "
            "(TESSERA_MAX_INPUTS_PER_REQUEST): split the request"
        )
    for i, text in enumerate(texts):
        if len(text) > settings.max_chars_per_input:
            raise InputTooLarge(
                f"input {i} has {len(text)} characters; the limit is {settings.max_chars_per_input} "
                "(TESSERA_MAX_CHARS_PER_INPUT)"
            )


def admit(request: Request, texts: list[str]) -> None:
    """A request's inputs within the server's limits, and within its tenant's rate limit."""
    check_inputs(settings_of(request), texts)
    rate_limit: RateLimit | None = request.app.state.rate_limit
    if rate_limit is not None:
        rate_limit.take(tenant_of(request), len(texts))


def timeout_of(settings: Settings, requested: float | None) -> float:
    return min(requested or settings.request_timeout_s, settings.max_request_timeout_s)


def check_generation(settings: Settings, params: GenerationParameters) -> None:
    if params.max_new_tokens is not None and params.max_new_tokens > settings.max_new_tokens_cap:
        raise InvalidInput(
            f"max_new_tokens {params.max_new_tokens} is over this server's cap of {settings.max_new_tokens_cap}"
        )
    if params.max_length is not None and params.max_length > settings.max_new_tokens_cap:
        raise InvalidInput(f"max_length {params.max_length} is over this server's cap of {settings.max_new_tokens_cap}")
    if params.num_beams is not None and params.num_beams > settings.max_num_beams:
        raise InvalidInput(f"num_beams {params.num_beams} is over this server's cap of {settings.max_num_beams}")


def zero_shot_payloads(
    entry: Any, texts: list[str], labels: list[str] | None, template: str | None, multi_label: bool = False
) -> list[ZeroShotInput]:
    """A client's labels become hypotheses through the template; without them, the entry's own
    labels do too (NLI), or are embedded through their descriptions (similarity engine)."""
    template = template or entry.template
    names = tuple(labels or entry.labels)
    if labels or entry.engine == "nli":
        # replace, not format: other braces in a client's template are text, not fields.
        hypotheses = tuple(template.replace("{}", name, 1) for name in names)
    else:
        hypotheses = tuple(entry.labels[name] for name in names)
    return [ZeroShotInput(text, names, hypotheses, multi_label) for text in texts]


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client goes away first."""
    request_task = asyncio.current_task()
    assert request_task is not None

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                request_task.cancel()  # the client is gone: so is its work
                return

    watcher = asyncio.create_task(watch())
    try:
        return await work
    finally:
        watcher.cancel()


@router.post("/classify", response_model=ClassifyResponse, responses=TASK_ERRORS, summary="Classify texts")
async def classify(body: ClassifyRequest, request: Request) -> ClassifyResponse:
    """Label each input with a text-classification model, or with a zero-shot model and your
    `candidate_labels`. Scores are sorted best first; `top_k: null` returns every label."""
    registry, settings = registry_of(request), settings_of(request)
    texts = as_list(body.inputs)
    admit(request, texts)
    params = body.parameters
    labels = params.candidate_labels
    if body.model is None and labels:
        entry = registry.resolve(None, Endpoint.zero_shot)
    elif labels:
        entry = registry.resolve(body.model, Endpoint.zero_shot)
    else:
        entry = registry.resolve(body.model, Endpoint.classify)

    payloads: list[Any]
    if entry.task == "zero-shot-classification":
        if params.function_to_apply is not None:
            raise WrongTask(f"function_to_apply does not apply to the zero-shot model '{entry.name}'; drop it")
        payloads = zero_shot_payloads(entry, texts, labels, params.hypothesis_template, params.multi_label)
    else:
        payloads = [ClassifyInput(t, params.top_k, params.function_to_apply) for t in texts]

    results = await until_disconnect(
        request,
        registry.infer(entry.name, payloads, timeout_s=timeout_of(settings, body.timeout_s), tenant=tenant_of(request)),
    )
    top_k = params.top_k
    return ClassifyResponse(
        model=entry.name,
        results=[r.labels[:top_k] if top_k else r.labels for r in results],
        truncated=[r.truncated for r in results],
    )


@router.post("/translate", response_model=TranslateResponse, responses=TASK_ERRORS, summary="Translate texts")
async def translate(body: TranslateRequest, request: Request) -> TranslateResponse:
    """Translate each input with a catalog model, named by `model` or picked by the
    `source_lang`/`target_lang` pair. Inputs over the model's maximum are truncated (and flagged)."""
    registry, settings = registry_of(request), settings_of(request)
    texts = as_list(body.inputs)
    admit(request, texts)
    check_generation(settings, body.parameters)
    languages = body.source_lang, body.target_lang
    if body.model is None and languages != (None, None):
        entry = registry.find_translation(*languages)
    else:
        entry = registry.resolve(body.model, Endpoint.translate)
        if not translates(entry, *languages):
            asked = f"{body.source_lang or '*'}->{body.target_lang or '*'}"
            raise WrongTask(
                f"model '{entry.name}' translates {entry.source_lang}->{entry.target_lang}, "
                f"not {asked}; drop model or the languages"
            )
    generation = body.parameters.generate_kwargs()
    payloads = [Seq2SeqInput(t, generation) for t in texts]
    results = await until_disconnect(
        request,
        registry.infer(
            entry.name,
            payloads,
            group=generation,
            timeout_s=timeout_of(settings, body.timeout_s),
            tenant=tenant_of(request),
        ),
    )
    return TranslateResponse(
        model=entry.name,
        results=[Translation(translation_text=r.text, truncated=r.truncated) for r in results],
    )


@router.post("/summarize", response_model=SummarizeResponse, responses=TASK_ERRORS, summary="Summarize texts")
async def summarize(body: SummarizeRequest, request: Request) -> SummarizeResponse:
    """Summarize each input, abstractively (a seq2seq model) or extractively (the sentences
    that best cover the document). With `long_input: chunk`, a document longer than the
    model's maximum is summarized piece by piece, then the joined summaries are summarized."""
    registry, settings = registry_of(request), settings_of(request)
    texts = as_list(body.inputs)
    admit(request, texts)
    params = body.parameters
    check_generation(settings, params)
    entry = registry.resolve(body.model, Endpoint.summarize)
    timeout = timeout_of(settings, body.timeout_s)

    generation = params.generate_kwargs()
    summaries: list[Summary]
    if entry.engine == "extractive":
        sentences = params.max_sentences or entry.max_sentences
        extracts = [ExtractInput(t, sentences) for t in texts]
        work = registry.infer(entry.name, extracts, timeout_s=timeout, tenant=tenant_of(request))
        results = await until_disconnect(request, work)
        summaries = [Summary(summary_text=r.text, truncated=r.truncated) for r in results]
    elif params.long_input == "chunk":
        deadline = time.monotonic() + timeout  # one deadline for every stage of every document
        summaries = await until_disconnect(
            request,
            all_or_nothing(
                _summarize_chunked(registry, entry.name, i, t, generation, deadline, tenant_of(request))
                for i, t in enumerate(texts)
            ),
        )
    else:
        payloads = [Seq2SeqInput(t, generation) for t in texts]
        results = await until_disconnect(
            request,
            registry.infer(entry.name, payloads, group=generation, timeout_s=timeout, tenant=tenant_of(request)),
        )
        summaries = [Summary(summary_text=r.text, truncated=r.truncated) for r in results]
    return SummarizeResponse(model=entry.name, results=summaries)


# Rounds of summarizing summaries before the last one may truncate: each round shrinks the
# text several-fold, so documents past a few hundred model windows are the only ones cut.
MAX_REDUCE_ROUNDS = 3


async def all_or_nothing(works: Iterable[Awaitable[T]]) -> list[T]:
    """Like gather, but the first failure cancels the rest instead of leaving them running."""
    tasks = [asyncio.ensure_future(w) for w in works]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


async def _summarize_chunked(
    registry: ModelRegistry,
    name: str,
    index: int,
    text: str,
    generation: tuple[tuple[str, Any], ...],
    deadline: float,
    tenant: str,
) -> Summary:
    """Map-reduce: summarize model-sized chunks together (one batch), then their joined summaries,
    again while they are still too long for the model."""

    async def summarize_all(texts: list[str]) -> list[str]:
        left = max(0.001, deadline - time.monotonic())
        payloads = [Seq2SeqInput(t, generation) for t in texts]
        results = await registry.infer(name, payloads, group=generation, timeout_s=left, tenant=tenant)
        return [r.text for r in results]

    async def split(runner: Seq2SeqRunner, document: str) -> list[str]:
        try:
            return await asyncio.to_thread(runner.split_into_chunks, document)
        except Exception as exc:  # the tokenizer could not read the client's text
            raise InvalidInput(
                f"input {index} could not be split into chunks ({type(exc).__name__}: {exc}); send plain UTF-8 text"
            ) from exc

    async with registry.use(name) as slot:
        runner = slot.runner
        assert isinstance(runner, Seq2SeqRunner)
        chunks = await split(runner, text)
        pieces, joined = len(chunks), text
        for _ in range(MAX_REDUCE_ROUNDS):
            if len(chunks) <= 1:
                break
            joined = " ".join(await summarize_all(chunks))
            chunks = await split(runner, joined)
    left = max(0.001, deadline - time.monotonic())
    last = [Seq2SeqInput(joined, generation)]
    [final] = await registry.infer(name, last, group=generation, timeout_s=left, tenant=tenant)
    return Summary(summary_text=final.text, truncated=final.truncated, chunks=pieces)


@router.post("/embed", response_model=EmbedResponse, responses=TASK_ERRORS, summary="Embed texts")
async def embed(body: EmbedRequest, request: Request) -> EmbedResponse:
    """One vector per input, pooled as the model declares (mean for all-MiniLM-L6-v2) and,
    unless `normalize` is false, scaled to unit length."""
    registry, settings = registry_of(request), settings_of(request)
    texts = as_list(body.inputs)
    admit(request, texts)
    entry = registry.resolve(body.model, Endpoint.embed)
    payloads = [EmbedInput(t, body.normalize) for t in texts]
    results = await until_disconnect(
        request,
        registry.infer(entry.name, payloads, timeout_s=timeout_of(settings, body.timeout_s), tenant=tenant_of(request)),
    )
    return EmbedResponse(
        model=entry.name,
        dimensions=len(results[0].vector),
        embeddings=[r.vector for r in results],
        tokens=sum(r.tokens for r in results),
    )
