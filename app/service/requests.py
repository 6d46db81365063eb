"""What the service is asked and what it answers, whatever route (native, Hugging Face,
OpenAI) the request came through: plain typed values, nothing HTTP-shaped; and the
``Progress`` a caller that streams gives the service to hear a request as it goes, with the
engine client's listeners that feed it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

from app.payloads import Generation, GenerationDelta, GenerationSettings

T = TypeVar("T")

FILL_MASK_TOP_K = 5  # candidates per mask token when a request does not say


@dataclass(frozen=True)
class Classify:
    texts: list[str]
    model: str | None = None
    top_k: int | None = 1  # None: every label
    function_to_apply: str | None = None
    candidate_labels: list[str] | None = None  # zero-shot: these, else the model's own labels
    hypothesis_template: str | None = None
    multi_label: bool = False
    timeout_s: float | None = None


@dataclass(frozen=True)
class Translate:
    texts: list[str]
    model: str | None = None
    source_lang: str | None = None
    target_lang: str | None = None
    generation: GenerationSettings = ()
    timeout_s: float | None = None
    must_fit: bool = False  # an input over the model's maximum: 413, not truncated
    long_input: Literal["truncate", "chunk"] = "truncate"


@dataclass(frozen=True)
class Summarize:
    texts: list[str]
    model: str | None = None
    generation: GenerationSettings = ()
    long_input: Literal["truncate", "chunk"] = "truncate"
    max_sentences: int | None = None  # extractive models; None: the entry's own
    timeout_s: float | None = None
    must_fit: bool = False


@dataclass(frozen=True)
class Embed:
    texts: list[str]
    model: str | None = None
    normalize: bool = True
    dimensions: int | None = None  # accepted when equal to the model's vector size
    timeout_s: float | None = None
    must_fit: bool = False


@dataclass(frozen=True)
class FillMask:
    texts: list[str]
    model: str | None = None
    top_k: int = FILL_MASK_TOP_K
    targets: list[str] | None = None
    timeout_s: float | None = None
    must_fit: bool = False


@dataclass(frozen=True)
class Rerank:
    query: str
    documents: list[str]
    model: str | None = None
    top_n: int | None = None  # None: every document
    raw_scores: bool = False  # the model's raw scores (a cross-encoder's logits)
    timeout_s: float | None = None
    must_fit: bool = False


@dataclass(frozen=True)
class TokenClassify:
    texts: list[str]
    model: str | None = None
    aggregation_strategy: str | None = None  # None: the entry's own
    ignore_labels: list[str] | None = None  # None: the entry's own
    stride: int | None = None
    timeout_s: float | None = None
    must_fit: bool = False


@dataclass
class Ranked:
    """A document's place in a rerank answer: its index in the request, and its score."""

    index: int
    score: float
    truncated: bool = False


@dataclass
class Translation:
    text: str
    truncated: bool = False
    chunks: int = 1  # pieces the input was translated in (long_input: chunk)


@dataclass
class Summary:
    text: str
    truncated: bool = False
    chunks: int = 1  # pieces the input was summarized in (long_input: chunk)


class Progress(Protocol):
    """Where a streamed request's news goes as it happens, on the event loop: input
    ``index``'s new text as it is generated, and its result once final (each input's at most
    once, before the service answers; an input without one gets its result from the answer)."""

    def delta(self, index: int, piece: GenerationDelta) -> None: ...

    def final(self, index: int, result: Translation | Summary) -> None: ...


@dataclass
class Answer(Generic[T]):
    """Results in input order, the model that produced them, and the accounting the access
    log and metrics read: inputs, and the largest batch they ran in."""

    model: str
    results: list[T]
    batch_size: int = 0
    inputs: int = field(init=False)

    def __post_init__(self) -> None:
        self.inputs = len(self.results)


def listeners(
    progress: Progress | None,
    must_fit: bool,
    shape: Callable[[Generation], Translation | Summary],
    index: int | None = None,
) -> dict[str, Any]:
    """The engine client's listeners (``on_delta``, ``on_result``) that tell ``progress`` of a
    streamed request's inputs (all of them under ``index``, where given); none without one.
    A result waits for the answer where truncation is refused (it may yet be a 413)."""
    if progress is None:
        return {}

    def on_delta(i: int, piece: GenerationDelta) -> None:
        progress.delta(i if index is None else index, piece)

    def on_result(i: int, result: Generation) -> None:
        progress.final(i if index is None else index, shape(result))

    return {"on_delta": on_delta, "on_result": None if must_fit else on_result}
