"""The task routes: /classify, /translate, /summarize, /embed, /fill-mask, /token-classification
(and the rerank routes, in app/api/rerank.py).

Each parses its body (app/api/schemas.py), asks the service (app/service/service.py,
where every rule lives) and shapes the answer; it never touches torch or a runner. A
client that disconnects has its work cancelled, which drops its queued inputs. /translate
and /summarize stream on request (app/api/streaming.py).
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.api.calls import TASK_ERRORS, call, service_of, tenant
from app.api.fields import as_list
from app.api.json_route import JsonBodyRoute
from app.api.model_rules import serves
from app.api.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    EmbedRequest,
    EmbedResponse,
    Entity,
    FillMaskRequest,
    FillMaskResponse,
    SummarizeRequest,
    SummarizeResponse,
    Summary,
    TokenClassificationRequest,
    TokenClassificationResponse,
    TranslateRequest,
    TranslateResponse,
    Translation,
)
from app.api.streaming import STREAMED_RESPONSE, stream
from app.service.requests import Classify, Embed, FillMask, Summarize, TokenClassify, Translate
from app.tasks import Endpoint

router = APIRouter(tags=["tasks"], route_class=JsonBodyRoute)


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=TASK_ERRORS,
    summary="Classify texts",
    openapi_extra=serves(Endpoint.classify),
)
async def classify(body: ClassifyRequest, request: Request) -> ClassifyResponse:
    """Label each input with a text-classification model, or with a zero-shot model and your
    `candidate_labels`. Scores are sorted best first; `top_k: null` returns every label."""
    params = body.parameters
    asked = Classify(
        as_list(body.inputs),
        body.model,
        params.top_k,
        params.function_to_apply,
        params.candidate_labels,
        params.hypothesis_template,
        params.multi_label,
        body.timeout_s,
    )
    answer = await call(request, service_of(request).classify(asked, tenant(request)))
    return ClassifyResponse(
        model=answer.model,
        results=[r.labels for r in answer.results],
        truncated=[r.truncated for r in answer.results],
    )


@router.post(
    "/translate",
    response_model=TranslateResponse,
    responses={**TASK_ERRORS, **STREAMED_RESPONSE},
    summary="Translate texts",
    openapi_extra=serves(Endpoint.translate),
)
async def translate(body: TranslateRequest, request: Request) -> TranslateResponse | Response:
    """Translate each input with a catalog model, named by `model` or picked by the
    `source_lang`/`target_lang` pair. Inputs over the model's maximum are truncated (and
    flagged), or with `long_input: chunk` translated in pieces cut at their line breaks.
    `stream: true` answers Server-Sent Events."""
    params = body.parameters
    asked = Translate(
        as_list(body.inputs),
        body.model,
        body.source_lang,
        body.target_lang,
        params.generate_kwargs(),
        body.timeout_s,
        long_input=params.long_input,
    )
    service, who = service_of(request), tenant(request)
    if body.stream:
        return await stream(request, lambda progress: service.translate(asked, who, progress))
    answer = await call(request, service.translate(asked, who))
    results = [Translation(translation_text=r.text, truncated=r.truncated, chunks=r.chunks) for r in answer.results]
    return TranslateResponse(model=answer.model, results=results)


@router.post(
    "/summarize",
    response_model=SummarizeResponse,
    responses={**TASK_ERRORS, **STREAMED_RESPONSE},
    summary="Summarize texts",
    openapi_extra=serves(Endpoint.summarize),
)
async def summarize(body: SummarizeRequest, request: Request) -> SummarizeResponse | Response:
    """Summarize each input, abstractively (a seq2seq model) or extractively (the sentences
    that best cover the document). With `long_input: chunk`, a document longer than the
    model's maximum is summarized piece by piece, then the joined summaries are summarized.
    `stream: true` answers Server-Sent Events."""
    params = body.parameters
    asked = Summarize(
        as_list(body.inputs),
        body.model,
        params.generate_kwargs(),
        params.long_input,
        params.max_sentences,
        body.timeout_s,
    )
    service, who = service_of(request), tenant(request)
    if body.stream:
        return await stream(request, lambda progress: service.summarize(asked, who, progress))
    answer = await call(request, service.summarize(asked, who))
    results = [Summary(summary_text=r.text, truncated=r.truncated, chunks=r.chunks) for r in answer.results]
    return SummarizeResponse(model=answer.model, results=results)


@router.post(
    "/embed",
    response_model=EmbedResponse,
    responses=TASK_ERRORS,
    summary="Embed texts",
    openapi_extra=serves(Endpoint.embed),
)
async def embed(body: EmbedRequest, request: Request) -> EmbedResponse:
    """One vector per input, pooled as the model declares (mean for all-MiniLM-L6-v2) and,
    unless `normalize` is false, scaled to unit length."""
    asked = Embed(as_list(body.inputs), body.model, body.normalize, timeout_s=body.timeout_s)
    answer = await call(request, service_of(request).embed(asked, tenant(request)))
    return EmbedResponse(
        model=answer.model,
        dimensions=len(answer.results[0].vector),
        embeddings=[r.vector for r in answer.results],
        tokens=sum(r.tokens for r in answer.results),
    )


@router.post(
    "/fill-mask",
    response_model=FillMaskResponse,
    responses=TASK_ERRORS,
    summary="Fill masked words",
    openapi_extra=serves(Endpoint.fill_mask),
)
async def fill_mask(body: FillMaskRequest, request: Request) -> FillMaskResponse:
    """The likeliest tokens for each mask token (e.g. `[MASK]`, the model's own) in each
    input, best first, with the input completed by each."""
    params = body.parameters
    asked = FillMask(as_list(body.inputs), body.model, params.top_k, params.targets, body.timeout_s)
    answer = await call(request, service_of(request).fill_mask(asked, tenant(request)))
    return FillMaskResponse(
        model=answer.model,
        results=[r.masks for r in answer.results],
        truncated=[r.truncated for r in answer.results],
    )


@router.post(
    "/token-classification",
    openapi_extra=serves(Endpoint.token_classification),
    response_model=TokenClassificationResponse,
    response_model_exclude_none=True,
    responses=TASK_ERRORS,
    summary="Find entities in texts",
)
async def token_classification(body: TokenClassificationRequest, request: Request) -> TokenClassificationResponse:
    """Label the tokens of each input (named entities, parts of speech ...) and group them into
    entities as transformers' pipeline does, with character offsets into the input."""
    params = body.parameters
    asked = TokenClassify(
        as_list(body.inputs),
        body.model,
        params.aggregation_strategy,
        params.ignore_labels,
        params.stride,
        body.timeout_s,
    )
    answer = await call(request, service_of(request).token_classify(asked, tenant(request)))
    return TokenClassificationResponse(
        model=answer.model,
        results=[[Entity.model_validate(e) for e in r.entities] for r in answer.results],
        truncated=[r.truncated for r in answer.results],
    )
