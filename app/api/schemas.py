"""Request and response bodies of the task routes, each with an example for the docs page."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

Text = Annotated[str, StringConstraints(min_length=1)]


def _check_inputs(value: str | list[str]) -> str | list[str]:
    texts = [value] if isinstance(value, str) else value
    if not texts:
        raise ValueError("inputs is an empty list; send at least one text")
    for i, text in enumerate(texts):
        if not text.strip():
            raise ValueError(f"input {i} is empty or blank; send text with at least one non-space character")
    return value


Inputs = Annotated[
    str | list[str],
    AfterValidator(_check_inputs),
    Field(description="One text, or a list of texts (answered in the same order)."),
]
ModelName = Annotated[
    str | None, Field(description="A catalog model name (see GET /models); omitted: the endpoint's default.")
]
Timeout = Annotated[
    float | None,
    Field(gt=0, description="Seconds this request may wait and run, up to the server's cap; past it: 504."),
]


def as_list(inputs: str | list[str]) -> list[str]:
    return [inputs] if isinstance(inputs, str) else list(inputs)


class _Request(BaseModel):
    # NaN and Infinity parse as JSON here; no parameter of ours means anything with them.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# -- classification -------------------------------------------------------------------


class ClassifyParameters(_Request):
    top_k: int | None = Field(1, ge=1, description="Labels to return per input; null returns all labels.")
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = Field(
        None, description="How logits become scores, as in transformers (default: from the model config)."
    )
    candidate_labels: list[Text] | None = Field(
        None, min_length=1, max_length=100, description="Zero-shot: the labels to choose from."
    )
    hypothesis_template: str | None = Field(
        None, description="Zero-shot: how a label becomes a hypothesis; must contain '{}'."
    )
    multi_label: bool = Field(False, description="Zero-shot: score each label independently.")

    @model_validator(mode="after")
    def _template_has_slot(self) -> ClassifyParameters:
        if self.hypothesis_template is not None and self.hypothesis_template.count("{}") != 1:
            raise ValueError("hypothesis_template must contain '{}' exactly once, e.g. 'This text is about {}.'")
        return self


class ClassifyRequest(_Request):
    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [
                {"inputs": "I love this movie"},
                {"inputs": ["Great service!", "Cold food, rude staff."], "parameters": {"top_k": 2}},
                {
                    "inputs": "The new GPU doubles training throughput.",
                    "parameters": {"candidate_labels": ["technology", "sports", "politics"]},
                },
            ]
        },
    )
    inputs: Inputs
    model: ModelName = None
    # A factory, not a shared default instance: pydantic deep-copies a default on every request.
    parameters: ClassifyParameters = Field(default_factory=ClassifyParameters)
    timeout_s: Timeout = None


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "minilm-sentiment",
                    "results": [[{"label": "positive", "score": 0.83}]],
                    "truncated": [False],
                }
            ]
        }
    )
    model: str = Field(description="The catalog model that answered.")
    results: list[list[LabelScore]] = Field(description="Per input, labels sorted by score, best first.")
    truncated: list[bool] = Field(description="Per input, whether it was cut to the model's maximum length.")


# -- generation (translate, summarize) --------------------------------------------------


class GenerationParameters(_Request):
    max_new_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    min_length: int | None = Field(None, ge=0, description="Fewest tokens in the output.")
    max_length: int | None = Field(None, ge=1, description="Most tokens in the output (max_new_tokens wins).")
    num_beams: int | None = Field(None, ge=1, description="Beam search width; 1 is greedy.")
    do_sample: bool | None = Field(None, description="Sample instead of searching.")
    temperature: float | None = Field(None, gt=0, description="Sampling temperature.")
    top_k: int | None = Field(None, ge=1, description="Sampling: keep the k most likely tokens.")
    top_p: float | None = Field(None, gt=0, le=1, description="Sampling: nucleus probability mass.")
    repetition_penalty: float | None = Field(None, gt=0)
    no_repeat_ngram_size: int | None = Field(None, ge=0)
    length_penalty: float | None = None
    early_stopping: bool | None = None

    @model_validator(mode="after")
    def _consistent(self) -> GenerationParameters:
        if self.min_length is not None and self.max_length is not None and self.min_length > self.max_length:
            raise ValueError("min_length must not exceed max_length")
        sampling_only = [k for k in ("temperature", "top_k", "top_p") if getattr(self, k) is not None]
        if sampling_only and not self.do_sample:
            raise ValueError(f"{', '.join(sampling_only)} only apply with do_sample: true")
        return self

    def generate_kwargs(self) -> tuple[tuple[str, Any], ...]:
        return tuple(sorted(self.model_dump(exclude_none=True, exclude={"long_input", "max_sentences"}).items()))


class TranslateRequest(_Request):
    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [
                {"inputs": "The weather is nice today.", "source_lang": "en", "target_lang": "de"},
                {
                    "inputs": ["Good morning", "Thank you"],
                    "model": "opus-mt-en-fr",
                    "parameters": {"num_beams": 4},
                },
            ]
        },
    )
    inputs: Inputs
    model: ModelName = None
    source_lang: str | None = Field(None, min_length=2, max_length=12, description="ISO code, e.g. 'en'.")
    target_lang: str | None = Field(None, min_length=2, max_length=12, description="ISO code, e.g. 'de'.")
    parameters: GenerationParameters = Field(default_factory=GenerationParameters)
    timeout_s: Timeout = None

    @model_validator(mode="after")
    def _pair_complete(self) -> TranslateRequest:
        if (self.source_lang is None) != (self.target_lang is None):
            raise ValueError("give both source_lang and target_lang, or neither")
        return self


class Translation(BaseModel):
    translation_text: str
    truncated: bool = Field(description="Whether the input was cut to the model's maximum length.")


class TranslateResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "opus-mt-en-de",
                    "results": [{"translation_text": "Das Wetter ist heute schön.", "truncated": False}],
                }
            ]
        }
    )
    model: str
    results: list[Translation]


class SummarizeParameters(GenerationParameters):
    long_input: Literal["truncate", "chunk"] = Field(
        "truncate",
        description="An input longer than the model's maximum: 'truncate' it (and say so), or 'chunk': "
        "summarize model-sized pieces, then summarize the joined summaries.",
    )
    max_sentences: int | None = Field(None, ge=1, le=100, description="Extractive models: sentences to keep.")


class SummarizeRequest(_Request):
    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [
                {
                    "inputs": "The city council met on Tuesday to discuss the new transit plan. After hours "
                    "of debate, members voted to fund two new bus lines. Construction starts in spring. "
                    "Critics say the plan ignores the northern districts.",
                    "parameters": {"max_sentences": 2},
                }
            ]
        },
    )
    inputs: Inputs
    model: ModelName = None
    parameters: SummarizeParameters = Field(default_factory=SummarizeParameters)
    timeout_s: Timeout = None


class Summary(BaseModel):
    summary_text: str
    truncated: bool = Field(description="Whether the input was cut to the model's maximum length.")
    chunks: int = Field(1, description="Pieces the input was summarized in (long_input: chunk).")


class SummarizeResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "minilm-extractive",
                    "results": [
                        {
                            "summary_text": "The city council met on Tuesday to discuss the new transit plan. "
                            "After hours of debate, members voted to fund two new bus lines.",
                            "truncated": False,
                            "chunks": 1,
                        }
                    ],
                }
            ]
        }
    )
    model: str
    results: list[Summary]


# -- embeddings -----------------------------------------------------------------------


class EmbedRequest(_Request):
    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={"examples": [{"inputs": ["A man is eating food.", "Someone is having a meal."]}]},
    )
    inputs: Inputs
    model: ModelName = None
    normalize: bool = Field(True, description="Scale each vector to unit length (cosine = dot product).")
    timeout_s: Timeout = None


class EmbedResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"model": "minilm", "dimensions": 384, "embeddings": [[0.0123, -0.0456, 0.0789]], "tokens": 9}]
        }
    )
    model: str
    dimensions: int
    embeddings: list[list[float]] = Field(description="One vector per input, in input order.")
    tokens: int = Field(description="Tokens read, over all inputs.")
