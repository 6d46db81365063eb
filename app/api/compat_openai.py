"""OpenAI-compatible embeddings: ``POST /v1/embeddings`` and ``GET /v1/models``, so that the
``openai`` client with ``base_url="http://host:port/v1"`` works unchanged.

``model`` names a catalog embedding model; the vectors are those ``/embed`` gives (unit
length). Errors keep our message and type, in OpenAI's envelope
``{"error": {"message", "type", "param", "code"}, "request_id"}``: the openai client
shows nothing else.
"""

from __future__ import annotations

import base64
import struct
import time
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.api.calls import call, registry_of, service_of, tenant
from app.api.compat import ReshapedErrorsRoute, error_body, with_body
from app.api.errors import error_responses
from app.api.fields import Inputs, PositiveInt, as_list
from app.api.model_rules import serves
from app.service.requests import Embed
from app.tasks import Endpoint


def openai_error(code: str, message: str, param: str | None, request_id: str | None) -> dict[str, Any]:
    return {
        "error": {"message": message, "type": code, "param": param, "code": code},
        "request_id": request_id,
    }


class OpenAiErrorsRoute(ReshapedErrorsRoute):
    def reshape(self, response: Response) -> Response:
        body = error_body(response)
        if "message" not in body:
            return response
        details = body.get("details") or [{}]
        return with_body(
            response,
            openai_error(body["error"], body["message"], details[0].get("field"), body.get("request_id")),
        )


router = APIRouter(prefix="/v1", tags=["OpenAI compatibility"], route_class=OpenAiErrorsRoute)


class OpenAiErrorDetail(BaseModel):
    message: str = Field(description="What went wrong and what to change.")
    type: str = Field(description="Machine-readable error type (as `error` elsewhere in this API).")
    param: str | None = Field(None, description="The request field at fault, where one is.")
    code: str


class OpenAiErrorBody(BaseModel):
    error: OpenAiErrorDetail
    request_id: str | None = None


def openai_error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``error_responses``, with each body and example in OpenAI's error envelope."""
    out = error_responses(*statuses)
    for spec in out.values():
        content = spec["content"]["application/json"]
        ex = content["example"]
        content["example"] = openai_error(ex["error"], ex["message"], None, ex["request_id"])
        spec["model"] = OpenAiErrorBody
    return out


# When this process started: OpenAI's `created` for every catalog model.
STARTED = int(time.time())


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"model": "minilm", "input": ["A man is eating food.", "Someone is having a meal."]},
                {"model": "minilm", "input": "A man is eating food.", "encoding_format": "base64"},
            ]
        },
    )
    input: Inputs = Field(description="A text or a list of texts (token-id arrays are not accepted: send the text).")
    model: str = Field(description="A catalog embedding model (see GET /v1/models), e.g. 'minilm'.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: each vector as little-endian float32 bytes, base64-encoded."
    )
    dimensions: PositiveInt | None = Field(
        None, description="Accepted only when equal to the model's own size (no shortening)."
    )
    user: str | None = Field(None, description="Accepted and ignored.")

    @field_validator("input", mode="before")
    @classmethod
    def _texts_not_token_ids(cls, value: Any) -> Any:
        if isinstance(value, list) and any(isinstance(v, int | list) and not isinstance(v, bool) for v in value):
            raise ValueError(
                "input as token ids is not supported: each model reads its own tokenizer's ids, so send the text"
            )
        return value


class EmbeddingObject(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "object": "list",
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.0123, -0.0456, 0.0789]}],
                    "model": "minilm",
                    "usage": {"prompt_tokens": 9, "total_tokens": 9},
                }
            ]
        }
    )
    object: Literal["list"] = "list"
    data: list[EmbeddingObject]
    model: str
    usage: Usage


class OpenAiModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="When this server started (Unix seconds).")
    owned_by: str = Field(description="The hub organisation for hub models, else 'local'.")


class OpenAiModelList(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "object": "list",
                    "data": [{"id": "minilm", "object": "model", "created": 1767225600, "owned_by": "local"}],
                }
            ]
        }
    )
    object: Literal["list"] = "list"
    data: list[OpenAiModel]


def as_base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


@router.post(
    "/embeddings",
    response_model=EmbeddingsResponse,
    responses=openai_error_responses(400, 401, 404, 413, 422, 429, 500, 503, 504),
    summary="Create embeddings (OpenAI)",
    openapi_extra=serves(Endpoint.embed),
)
async def create_embeddings(body: EmbeddingsRequest, request: Request) -> EmbeddingsResponse:
    """OpenAI's embeddings endpoint over a catalog embedding model: the vectors `/embed` gives
    (unit length), as floats or base64. `usage` counts the tokens the model read."""
    asked = Embed(as_list(body.input), body.model, dimensions=body.dimensions)
    answer = await call(request, service_of(request).embed(asked, tenant(request)))
    encode = as_base64 if body.encoding_format == "base64" else list
    tokens = sum(r.tokens for r in answer.results)
    return EmbeddingsResponse(
        data=[EmbeddingObject(index=i, embedding=encode(r.vector)) for i, r in enumerate(answer.results)],
        model=answer.model,
        usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
    )


def _describe(entry: Any) -> OpenAiModel:
    hub = entry.source.hub
    owner = hub.split("/")[0] if hub and "/" in hub else "local"
    return OpenAiModel(id=entry.name, created=STARTED, owned_by=owner)


@router.get(
    "/models",
    response_model=OpenAiModelList,
    responses=openai_error_responses(401),
    summary="List models (OpenAI)",
)
async def list_openai_models(request: Request) -> OpenAiModelList:
    """Every catalog model, in OpenAI's shape; `POST /v1/embeddings` takes the embedding ones."""
    return OpenAiModelList(data=[_describe(slot.entry) for slot in registry_of(request).slots()])


@router.get(
    "/models/{model}",
    response_model=OpenAiModel,
    responses=openai_error_responses(401, 404),
    summary="Describe a model (OpenAI)",
)
async def get_openai_model(model: str, request: Request) -> OpenAiModel:
    return _describe(registry_of(request).slot(model).entry)
