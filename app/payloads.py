"""What runners take and give, per input: the typed contract between the service and the
runners (app/runners), so that neither imports the other's modules for a dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# (name, value) pairs for generate(); hashable, so they double as a batching group.
GenerationSettings = tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class ClassifyInput:
    text: str
    top_k: int | None = 1
    function_to_apply: str | None = None


@dataclass(frozen=True)
class ZeroShotInput:
    text: str
    labels: tuple[str, ...]
    hypotheses: tuple[str, ...]  # one per label: what the NLI model or the embedder reads
    multi_label: bool = False


@dataclass(frozen=True)
class EmbedInput:
    text: str
    normalize: bool = True


@dataclass(frozen=True)
class ExtractInput:
    text: str
    max_sentences: int


@dataclass(frozen=True)
class Seq2SeqInput:
    text: str
    generation: GenerationSettings = ()


@dataclass(frozen=True)
class FillMaskInput:
    text: str  # holding the model's mask token at least once
    top_k: int = 5
    targets: tuple[str, ...] | None = None  # score these candidates only


@dataclass(frozen=True)
class RerankInput:
    """One (query, document) pair; a request's documents are inputs of their own."""

    query: str
    document: str
    raw: bool = False  # the model's raw score (a cross-encoder's logit), not its activation


@dataclass(frozen=True)
class TokenClassifyInput:
    text: str
    aggregation_strategy: str = "simple"  # none | simple | first | average | max
    ignore_labels: tuple[str, ...] = ("O",)
    stride: int | None = None  # tokens shared by windows over a long text; None: truncate it


@dataclass
class Classification:
    labels: list[dict[str, Any]]  # [{label, score}], best first
    truncated: bool = False


@dataclass
class Embedding:
    vector: list[float]
    tokens: int
    truncated: bool = False


@dataclass
class Generation:
    text: str
    truncated: bool = False


@dataclass(frozen=True)
class GenerationDelta:
    """What a generating input produced since its last delta, while it runs: the new text,
    and the tokens generated so far for it. Its final Generation's text is authoritative
    (the deltas, joined, may differ from it by the whitespace that text strips)."""

    text: str
    tokens: int


@dataclass
class Relevance:
    """How relevant a document is to its query."""

    score: float
    truncated: bool = False


@dataclass
class Entities:
    """The entities (or, unaggregated, the tokens) of an input that are not ignored, in
    text order: [{entity_group or entity, score, word, start, end (, index)}], with
    character offsets into the input."""

    entities: list[dict[str, Any]]
    truncated: bool = False


@dataclass
class MaskFills:
    """Per mask token of an input, in order: the candidates for it, best first."""

    masks: list[list[dict[str, Any]]]  # [{token, token_str, score, sequence}]
    truncated: bool = False
