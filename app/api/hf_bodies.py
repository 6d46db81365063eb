"""The Hugging Face Inference API's request bodies, per task, and per catalog entry.

Each catalog entry gets its own body model (``body_for``): its task's parameters (the names
huggingface_hub sends), a translation model's own languages, an embedding model's own
vector size where its config is on disk. The same model validates a request to
``POST /models/<name>`` and documents it (app/api/openapi.py gives each entry its path).
An HF parameter that has no meaning here is refused with a 422 naming it.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model

from app.api.fields import Inputs, Labels, PositiveInt, Template, Text, Texts, integral, masked_inputs
from app.api.schemas import GenerationParameters, TokenClassificationParameters
from app.errors import InvalidInput
from app.registry.sources import declared_mask_token, declared_width
from app.service.requests import FILL_MASK_TOP_K


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


class HfFillMaskParameters(_Strict):
    top_k: Annotated[int, Field(ge=1, le=100), BeforeValidator(integral)] | None = Field(
        None, description=f"Candidates per mask token (default {FILL_MASK_TOP_K})."
    )
    targets: Labels | None = Field(None, description="Score these candidate tokens only.")


class HfTokenClassificationParameters(TokenClassificationParameters):
    """The native route's parameters (the HF spec's names), and its truncation refusal."""

    truncation: Truncation | None = TRUNCATION


class SimilarityInputs(_Strict):
    source_sentence: Text = Field(description="The query.")
    sentences: Texts = Field(description="The documents scored against it, in order.")


class SimilarityParameters(_Strict):
    truncation: Truncation | None = TRUNCATION


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


def body_for(entry: Any, hf_task: str) -> type[HfBody]:
    """The body model of one catalog entry, whose HF task is ``hf_task``."""
    if hf_task == "text-classification":
        return _body(entry, ClassificationParameters)
    if hf_task == "zero-shot-classification":
        fixed = bool(entry.labels)
        return _body(entry, FixedLabelsParameters if fixed else ZeroShotParameters, required=not fixed)
    if hf_task == "translation":
        languages = create_model(
            "HfTranslationParameters_" + _identifier(entry.name),
            __base__=TranslationParameters,
            src_lang=(_one_of(entry.source_lang, entry.tokenizer_src_lang) | None, None),
            tgt_lang=(_one_of(entry.target_lang, entry.forced_bos_token) | None, None),
        )
        return _body(entry, languages)
    if hf_task == "summarization":
        return _body(entry, ExtractiveParameters if entry.engine == "extractive" else SummarizationParameters)
    if hf_task == "token-classification":
        return _body(entry, HfTokenClassificationParameters)
    if hf_task == "sentence-similarity":
        return _body(entry, SimilarityParameters, top_level={"inputs": (SimilarityInputs, ...)})
    if hf_task == "fill-mask":
        mask = declared_mask_token(entry)  # known here: the schema asks every input to hold it
        return _body(entry, HfFillMaskParameters, top_level={"inputs": (masked_inputs(mask), ...)} if mask else None)
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
    return _body(entry, sized, top_level=top_level)


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
