"""Rerank routes, in the three shapes clients speak: ``POST /rerank`` with TEI's body,
``POST /v1/rerank`` with Cohere's v1 (and Jina's) body, ``POST /v2/rerank`` with Cohere's v2,
so that ``cohere.Client(base_url=...).rerank`` and ``cohere.ClientV2(...).rerank`` work
unchanged. Each turns its body into one service request (app/service/service.py: the
limits, the model, the order, ``top_n``) and shapes the answer as its clients expect.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from app.api.calls import TASK_ERRORS, call, service_of, tenant
from app.api.errors import request_id_of
from app.api.fields import TEXT_SCHEMA, PositiveInt, Text, Texts, Timeout, one_text
from app.api.json_route import JsonBodyRoute
from app.api.model_rules import serves
from app.api.schemas import ModelName
from app.service.requests import Ranked, Rerank
from app.tasks import Endpoint

Schema = dict[str, Any]
router = APIRouter(tags=["rerank"], route_class=JsonBodyRoute)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


# -- TEI: POST /rerank --------------------------------------------------------------------


class TeiRerankRequest(_Body):
    model_config = ConfigDict(  # with _Body's: pydantic merges a subclass's config into its parent's
        json_schema_extra={
            "examples": [
                {
                    "query": "What is the capital of France?",
                    "texts": ["Paris is the capital of France.", "Berlin is in Germany."],
                    "return_text": True,
                }
            ]
        },
    )
    query: Text
    texts: Texts = Field(description="The documents to rank against the query.")
    raw_scores: bool = Field(False, description="The model's raw scores (a cross-encoder's logits, no sigmoid).")
    return_text: bool = Field(False, description="Answer each document's text beside its score.")
    truncate: bool | None = Field(
        None, description="false: a (query, text) pair over the model's maximum answers 413 instead of being cut."
    )
    truncation_direction: str | None = Field(None, pattern="^[Rr]ight$", description="Pairs are cut on the right.")
    model: ModelName = None
    timeout_s: Timeout = None


class TeiRank(BaseModel):
    index: int = Field(description="The document's position in `texts`.")
    score: float
    text: str | None = Field(None, description="With return_text: the document.")


@router.post(
    "/rerank",
    openapi_extra=serves(Endpoint.rerank),
    response_model=list[TeiRank],
    response_model_exclude_none=True,
    responses=TASK_ERRORS,
)
async def rerank(body: TeiRerankRequest, request: Request) -> list[TeiRank]:
    """Rank `texts` by relevance to `query`, best first (TEI's `/rerank`): a cross-encoder's
    score (sigmoid of its logit, or the logit with `raw_scores`), or an embedder's cosine."""
    asked = Rerank(
        body.query, body.texts, body.model, None, body.raw_scores, body.timeout_s, must_fit=body.truncate is False
    )
    answer = await call(request, service_of(request).rerank(asked, tenant(request)))
    texts = body.texts if body.return_text else None
    return [TeiRank(index=r.index, score=r.score, text=texts[r.index] if texts else None) for r in answer.results]


# -- Cohere and Jina: POST /v1/rerank, POST /v2/rerank ---------------------------------


def _document(value: Any) -> Any:
    """A document: a string, or an object whose ``text`` is ranked (its other fields come back
    as sent); either way its text follows an input's rules."""
    if isinstance(value, str):
        return one_text(value)
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        one_text(value["text"])
        try:  # answered as sent: it must be JSON that UTF-8 can carry
            json.dumps(value, ensure_ascii=False, allow_nan=False).encode()
        except (ValueError, UnicodeEncodeError, RecursionError):
            raise ValueError("a document's fields must be JSON without NaN, Infinity or lone surrogates") from None
        return value
    raise ValueError("a document is a string, or an object with a string 'text'")


Document = Annotated[
    Any,
    BeforeValidator(_document),
    WithJsonSchema(
        {
            "anyOf": [
                TEXT_SCHEMA,
                {"type": "object", "properties": {"text": TEXT_SCHEMA}, "required": ["text"]},
            ]
        }
    ),
]


def refusing(name: str, why: str, allowed: tuple[Any, ...] = (None,)) -> BeforeValidator:
    """A Cohere field this server does not implement: any value but ``allowed`` is refused by
    name, saying why (the schema states the same: see ``not_supported``)."""

    def check(value: Any) -> Any:
        if value in allowed:
            return None
        raise ValueError(f"{name} is not supported: {why}; drop it")

    return BeforeValidator(check)


def not_supported(why: str, *also: Schema) -> WithJsonSchema:
    return WithJsonSchema({"anyOf": [{"type": "null"}, *also], "description": f"Not supported: {why}."})


_BY_TEXT = "documents rank by their text"
_TRUNCATED = "a pair past the model's maximum is truncated"
RankFields = Annotated[
    Any,
    refusing("rank_fields", _BY_TEXT, (None, [], ["text"])),
    not_supported(_BY_TEXT, {"type": "array", "items": {"const": "text"}, "maxItems": 1}),
]
ChunksPerDoc = Annotated[Any, refusing("max_chunks_per_doc", _TRUNCATED), not_supported(_TRUNCATED)]
TokensPerDoc = Annotated[Any, refusing("max_tokens_per_doc", _TRUNCATED), not_supported(_TRUNCATED)]


class CohereRerankRequest(_Body):
    query: Text
    documents: list[Document] = Field(
        min_length=1,
        description="Strings, or objects whose `text` is ranked (their other fields are answered as sent).",
        json_schema_extra={"x-limit": {"maxItems": "max_inputs_per_request"}},
    )
    model: ModelName = None
    top_n: PositiveInt | None = Field(None, description="Answer the best top_n documents; omitted: all of them.")
    timeout_s: Timeout = None

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d["text"] for d in self.documents]

    def document(self, index: int) -> dict[str, Any]:
        given = self.documents[index]
        return {"text": given} if isinstance(given, str) else dict(given)


class CohereV1Request(CohereRerankRequest):
    model_config = ConfigDict(  # with _Body's: pydantic merges a subclass's config into its parent's
        json_schema_extra={
            "examples": [
                {
                    "query": "What is the capital of France?",
                    "documents": ["Paris is the capital of France.", {"text": "Berlin is in Germany.", "id": "b"}],
                    "top_n": 1,
                }
            ]
        },
    )
    return_documents: bool = Field(True, description="Answer each document beside its score (Cohere v1, Jina).")
    rank_fields: RankFields = None
    max_chunks_per_doc: ChunksPerDoc = None


class CohereV2Request(CohereRerankRequest):
    model_config = ConfigDict(  # with _Body's: pydantic merges a subclass's config into its parent's
        json_schema_extra={
            "examples": [
                {
                    "model": "minilm-rerank",
                    "query": "What is the capital of France?",
                    "documents": ["Paris is the capital of France.", "Berlin is in Germany."],
                    "top_n": 1,
                }
            ]
        },
    )
    return_documents: bool = Field(False, description="Answer each document beside its score.")
    max_tokens_per_doc: TokensPerDoc = None


class CohereResult(BaseModel):
    index: int = Field(description="The document's position in `documents`.")
    relevance_score: float
    document: dict[str, Any] | None = Field(None, description="With return_documents: the document, as sent.")


class CohereVersion(BaseModel):
    version: str


class CohereUnits(BaseModel):
    search_units: int


class CohereMeta(BaseModel):
    api_version: CohereVersion
    billed_units: CohereUnits


class CohereUsage(BaseModel):
    total_tokens: int = Field(description="Always 0: tokens are not counted (Jina's field, for its clients).")


class CohereRerankResponse(BaseModel):
    id: str
    model: str = Field(description="The catalog model that answered.")
    results: list[CohereResult] = Field(description="Best first.")
    meta: CohereMeta
    usage: CohereUsage


async def _cohere(body: CohereRerankRequest, request: Request, version: str) -> CohereRerankResponse:
    asked = Rerank(body.query, body.texts(), body.model, body.top_n, timeout_s=body.timeout_s)
    answer = await call(request, service_of(request).rerank(asked, tenant(request)))
    returned = bool(getattr(body, "return_documents", False))

    def result(r: Ranked) -> CohereResult:
        return CohereResult(
            index=r.index, relevance_score=r.score, document=body.document(r.index) if returned else None
        )

    return CohereRerankResponse(
        id=request_id_of(request) or uuid.uuid4().hex,
        model=answer.model,
        results=[result(r) for r in answer.results],
        meta=CohereMeta(api_version=CohereVersion(version=version), billed_units=CohereUnits(search_units=1)),
        usage=CohereUsage(total_tokens=0),
    )


@router.post(
    "/v1/rerank",
    openapi_extra=serves(Endpoint.rerank),
    response_model=CohereRerankResponse,
    response_model_exclude_none=True,
    responses=TASK_ERRORS,
)
async def rerank_v1(body: CohereV1Request, request: Request) -> CohereRerankResponse:
    """Cohere's (and Jina's) v1 rerank: `documents` best first as `results`, each with its
    `relevance_score`, its `index` and (unless `return_documents` is false) the document."""
    return await _cohere(body, request, "1")


@router.post(
    "/v2/rerank",
    openapi_extra=serves(Endpoint.rerank),
    response_model=CohereRerankResponse,
    response_model_exclude_none=True,
    responses=TASK_ERRORS,
)
async def rerank_v2(body: CohereV2Request, request: Request) -> CohereRerankResponse:
    """Cohere's v2 rerank: as v1, the documents answered only with `return_documents: true`."""
    return await _cohere(body, request, "2")
