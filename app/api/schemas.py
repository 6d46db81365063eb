"""Request and response bodies of the task routes, each with an example for the docs page."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from app.api.fields import Inputs, Label, Labels, NonNegativeInt, PositiveInt, Template, Timeout, integral, limit
from app.service.requests import FILL_MASK_TOP_K

ModelName = Annotated[
    str | None, Field(description="A catalog model name (see GET /models); omitted: the endpoint's default.")
]


class _Request(BaseModel):
    # NaN and Infinity parse as JSON here; no parameter of ours means anything with them.
    # Strict: a number is not a boolean and a string is not a number, as the schema says.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


# -- classification -------------------------------------------------------------------


class ClassifyParameters(_Request):
    top_k: PositiveInt | None = Field(1, description="Labels to return per input; null returns all labels.")
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = Field(
        None, description="How logits become scores, as in transformers (default: from the model config)."
    )
    candidate_labels: Labels | None = Field(None, description="Zero-shot: the labels to choose from.")
    hypothesis_template: Template | None = Field(
        None, description="Zero-shot: how a label becomes a hypothesis; '{}' exactly once."
    )
    multi_label: bool = Field(False, description="Zero-shot: score each label independently.")


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


SAMPLING_ONLY = ("temperature", "top_k", "top_p")
# The server's caps (x-limit: filled in from the settings in the OpenAPI document).
NewTokens = Annotated[
    int, Field(ge=1, json_schema_extra=limit(maximum="max_new_tokens_cap")), BeforeValidator(integral)
]
OutputLength = Annotated[
    int, Field(ge=2, json_schema_extra=limit(maximum="max_new_tokens_cap")), BeforeValidator(integral)
]
Beams = Annotated[int, Field(ge=1, json_schema_extra=limit(maximum="max_num_beams")), BeforeValidator(integral)]
Sentences = Annotated[int, Field(ge=1, le=100), BeforeValidator(integral)]


class GenerationParameters(_Request):
    """Settings for ``generate``. Ranges keep the arithmetic finite (a temperature of 1e-308
    turns every probability into NaN); caps are the server's (``x-limit``)."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={
            # temperature, top_k and top_p need do_sample: true (stated here as the validator checks it).
            "allOf": [
                {
                    "if": {"required": [name], "properties": {name: {"not": {"type": "null"}}}},
                    "then": {"required": ["do_sample"], "properties": {"do_sample": {"const": True}}},
                }
                for name in SAMPLING_ONLY
            ]
        },
    )

    max_new_tokens: NewTokens | None = Field(None, description="Most tokens to generate (at most the server's cap).")
    min_length: NonNegativeInt | None = Field(None, description="Fewest tokens in the output; max_length wins.")
    max_length: OutputLength | None = Field(
        None, description="Most tokens in the output, the decoder's start token included (max_new_tokens wins)."
    )
    num_beams: Beams | None = Field(None, description="Beam search width; 1 is greedy.")
    do_sample: bool | None = Field(None, description="Sample instead of searching.")
    temperature: float | None = Field(None, ge=0.01, le=100, description="Sampling temperature.")
    top_k: PositiveInt | None = Field(None, description="Sampling: keep the k most likely tokens.")
    top_p: float | None = Field(None, gt=0, le=1, description="Sampling: nucleus probability mass.")
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    no_repeat_ngram_size: NonNegativeInt | None = None
    length_penalty: float | None = Field(None, ge=-10, le=10, description="Beam search: exponent of the length.")
    early_stopping: bool | Literal["never"] | None = Field(
        None,
        description="Beam search: true stops once num_beams hypotheses finished; false and 'never' go on while "
        "a better one may come (false by a heuristic, 'never' by the length limit).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> GenerationParameters:
        sampling_only = [k for k in SAMPLING_ONLY if getattr(self, k) is not None]
        if sampling_only and self.do_sample is not True:
            raise ValueError(f"{', '.join(sampling_only)} only apply with do_sample: true")
        return self

    def generate_kwargs(self) -> tuple[tuple[str, Any], ...]:
        return tuple(sorted(self.model_dump(exclude_none=True, exclude={"long_input", "max_sentences"}).items()))


LongInput = Literal["truncate", "chunk"]
STREAM_DESCRIPTION = (
    "Answer as Server-Sent Events (text/event-stream): each input's text as it is generated, "
    "then its final text, then done. Errors before the first event answer as without it."
)


class TranslateParameters(GenerationParameters):
    long_input: LongInput = Field(
        "truncate",
        description="An input longer than the model's maximum: 'truncate' it (and say so), or 'chunk': "
        "translate it in pieces cut at its line breaks (then between sentences), rejoined with its "
        "own blank lines and newlines.",
    )


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
    source_lang: str | None = Field(
        None, min_length=2, max_length=12, description="ISO code of the input, e.g. 'en'; picks the model with model."
    )
    target_lang: str | None = Field(
        None, min_length=2, max_length=12, description="ISO code of the output, e.g. 'de'; picks the model with model."
    )
    parameters: TranslateParameters = Field(default_factory=TranslateParameters)
    timeout_s: Timeout = None
    stream: bool = Field(False, description=STREAM_DESCRIPTION)


class Translation(BaseModel):
    translation_text: str
    truncated: bool = Field(description="Whether the input was cut to the model's maximum length.")
    chunks: int = Field(1, description="Pieces the input was translated in (long_input: chunk).")


class TranslateResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "opus-mt-en-de",
                    "results": [{"translation_text": "Das Wetter ist heute schön.", "truncated": False, "chunks": 1}],
                }
            ]
        }
    )
    model: str
    results: list[Translation]


class SummarizeParameters(GenerationParameters):
    long_input: LongInput = Field(
        "truncate",
        description="An input longer than the model's maximum: 'truncate' it (and say so), or 'chunk': "
        "summarize model-sized pieces, then summarize the joined summaries.",
    )
    max_sentences: Sentences | None = Field(None, description="Extractive models: sentences to keep.")


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
    stream: bool = Field(
        False, description=STREAM_DESCRIPTION + " Extractive models send no deltas: their finals, then done."
    )


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


# -- fill-mask ---------------------------------------------------------------------------


class FillMaskParameters(_Request):
    top_k: Annotated[int, Field(ge=1, le=100), BeforeValidator(integral)] = Field(
        FILL_MASK_TOP_K, description="Candidates per mask token, best first."
    )
    targets: Labels | None = Field(None, description="Score these candidate tokens only.")


class FillMaskRequest(_Request):
    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [
                {"inputs": "The weather is [MASK] today."},
                {
                    "inputs": ["Paris is the [MASK] of France."],
                    "parameters": {"top_k": 3, "targets": ["capital", "city"]},
                },
            ]
        },
    )
    inputs: Inputs
    model: ModelName = None
    parameters: FillMaskParameters = Field(default_factory=FillMaskParameters)
    timeout_s: Timeout = None


class FillCandidate(BaseModel):
    score: float
    token: int = Field(description="The token's id in the model's vocabulary.")
    token_str: str
    sequence: str = Field(description="The input with this token in place of the mask.")


class FillMaskResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "distilbert-fill",
                    "results": [
                        [
                            [
                                {
                                    "score": 0.41,
                                    "token": 3835,
                                    "token_str": "nice",
                                    "sequence": "the weather is nice today.",
                                }
                            ]
                        ]
                    ],
                    "truncated": [False],
                }
            ]
        }
    )
    model: str
    results: list[list[list[FillCandidate]]] = Field(
        description="Per input, per mask token in it (in order), the candidates, best first."
    )
    truncated: list[bool]


# -- token classification ---------------------------------------------------------------

Aggregation = Literal["none", "simple", "first", "average", "max"]
AGGREGATION = Field(
    None,
    description="How tokens become entities, as in transformers' TokenClassificationPipeline: none (one result "
    "per token), simple, first, average, max (words whole). Omitted: the model's catalog default.",
)
IGNORE_LABELS = Field(None, description="Labels to leave out. Omitted: the model's catalog default (usually O).")
STRIDE = Field(
    None,
    description="Read a text longer than the model's maximum in windows sharing this many tokens (capped at "
    "the window less one), joining their entities; needs an aggregation_strategy other than none. Omitted: "
    "a long text is truncated.",
)


class TokenClassificationParameters(_Request):
    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        strict=True,
        json_schema_extra={
            # stride joins windows into entities: it needs an aggregation (as the validator checks).
            "if": {"required": ["stride"], "properties": {"stride": {"not": {"type": "null"}}}},
            "then": {
                "required": ["aggregation_strategy"],
                "properties": {"aggregation_strategy": {"enum": ["simple", "first", "average", "max"]}},
            },
        },
    )
    aggregation_strategy: Aggregation | None = AGGREGATION
    ignore_labels: Annotated[list[Label], Field(max_length=100)] | None = IGNORE_LABELS
    stride: NonNegativeInt | None = STRIDE

    @model_validator(mode="after")
    def _stride_aggregates(self) -> TokenClassificationParameters:
        if self.stride is not None and self.aggregation_strategy in (None, "none"):
            raise ValueError("stride needs an aggregation_strategy other than none (simple, first, average, max)")
        return self


class TokenClassificationRequest(_Request):
    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [
                {"inputs": "My name is Clara and I live in Berkeley, California."},
                {"inputs": ["Angela Merkel visited Paris."], "parameters": {"aggregation_strategy": "first"}},
            ]
        },
    )
    inputs: Inputs
    model: ModelName = None
    parameters: TokenClassificationParameters = Field(default_factory=TokenClassificationParameters)
    timeout_s: Timeout = None


class Entity(BaseModel):
    entity_group: str | None = Field(None, description="The entity's label (aggregated strategies).")
    entity: str | None = Field(None, description="The token's label (aggregation_strategy none).")
    score: float
    word: str = Field(description="The entity's text as the tokenizer decodes it; start and end give the input's.")
    start: int = Field(description="Offset of its first character in the input (Unicode code points).")
    end: int = Field(description="Offset just past its last character.")
    index: int | None = Field(None, description="aggregation_strategy none: the token's position.")


class TokenClassificationResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "bert-base-ner",
                    "results": [
                        [
                            {"entity_group": "PER", "score": 0.998, "word": "Clara", "start": 11, "end": 16},
                            {"entity_group": "LOC", "score": 0.999, "word": "Berkeley", "start": 31, "end": 39},
                        ]
                    ],
                    "truncated": [False],
                }
            ]
        }
    )
    model: str
    results: list[list[Entity]] = Field(description="Per input, its entities in text order.")
    truncated: list[bool]
