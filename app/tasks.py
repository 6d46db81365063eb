"""The tasks Tessera serves, in one table: for each catalog task (and engine), the runner
that loads it, the routes it answers and the Hugging Face Inference API task it speaks.

Adding a task is a row here, a runner (app/runners), a catalog entry type
(app/catalog.py), a service method (app/service/service.py) and its routes; the
README's development section lists the steps. Runners are named, not imported: this table
is read by the API layer, which never imports torch through it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from app.payloads import (
    Classification,
    ClassifyInput,
    Embedding,
    EmbedInput,
    Entities,
    ExtractInput,
    FillMaskInput,
    Generation,
    MaskFills,
    Relevance,
    RerankInput,
    Seq2SeqInput,
    TokenClassifyInput,
    ZeroShotInput,
)


class Endpoint(StrEnum):
    """The task routes; catalog defaults are chosen per endpoint."""

    classify = "classify"
    zero_shot = "zero-shot"
    translate = "translate"  # type: ignore[assignment]  # shadows str.translate, harmlessly
    summarize = "summarize"
    embed = "embed"
    fill_mask = "fill-mask"
    rerank = "rerank"
    token_classification = "token-classification"


@dataclass(frozen=True)
class Task:
    task: str  # the catalog entry's `task`
    engine: str | None  # its `engine`, for tasks with several
    runner: str  # "module:Class" in app.runners, imported when a model of this kind loads
    endpoints: tuple[Endpoint, ...]
    hf_task: str  # the HF Inference API task that POST /models/<name> speaks
    payload: type  # what the service sends its runner per input (app/payloads.py)
    result: type  # what the runner answers per input; both travel to the engine (app/engine/wire.py)


TASKS: tuple[Task, ...] = (
    Task(
        "text-classification",
        None,
        "classification:ClassificationRunner",
        (Endpoint.classify,),
        "text-classification",
        ClassifyInput,
        Classification,
    ),
    # /classify takes a zero-shot model only with labels of its own (can_serve).
    Task(
        "zero-shot-classification",
        "nli",
        "classification:NliZeroShotRunner",
        (Endpoint.zero_shot, Endpoint.classify),
        "zero-shot-classification",
        ZeroShotInput,
        Classification,
    ),
    Task(
        "zero-shot-classification",
        "similarity",
        "embedding:SimilarityZeroShotRunner",
        (Endpoint.zero_shot, Endpoint.classify),
        "zero-shot-classification",
        ZeroShotInput,
        Classification,
    ),
    Task("translation", None, "seq2seq:Seq2SeqRunner", (Endpoint.translate,), "translation", Seq2SeqInput, Generation),
    Task(
        "summarization",
        "abstractive",
        "seq2seq:Seq2SeqRunner",
        (Endpoint.summarize,),
        "summarization",
        Seq2SeqInput,
        Generation,
    ),
    Task(
        "summarization",
        "extractive",
        "embedding:ExtractiveSummaryRunner",
        (Endpoint.summarize,),
        "summarization",
        ExtractInput,
        Generation,
    ),
    Task(
        "embedding", None, "embedding:EmbeddingRunner", (Endpoint.embed,), "feature-extraction", EmbedInput, Embedding
    ),
    Task("fill-mask", None, "fill_mask:FillMaskRunner", (Endpoint.fill_mask,), "fill-mask", FillMaskInput, MaskFills),
    # A reranker speaks the HF API's sentence-similarity: one score per sentence against the source.
    Task(
        "rerank",
        "cross-encoder",
        "rerank:CrossEncoderRunner",
        (Endpoint.rerank,),
        "sentence-similarity",
        RerankInput,
        Relevance,
    ),
    Task(
        "rerank",
        "similarity",
        "rerank:SimilarityRerankRunner",
        (Endpoint.rerank,),
        "sentence-similarity",
        RerankInput,
        Relevance,
    ),
    Task(
        "token-classification",
        None,
        "token_classification:TokenClassificationRunner",
        (Endpoint.token_classification,),
        "token-classification",
        TokenClassifyInput,
        Entities,
    ),
)
_BY_KIND = {(t.task, t.engine): t for t in TASKS}


def check_template(template: str) -> str:
    """A hypothesis template (zero-shot) holds its label's slot, ``{}``, exactly once: the one
    rule, for the catalog and for a request alike."""
    if template.count("{}") != 1:
        raise ValueError("hypothesis_template must contain '{}' exactly once, e.g. 'This text is about {}.'")
    return template


def task_of(entry: Any) -> Task:
    """The row of a catalog entry (by its task and engine)."""
    return _BY_KIND[(entry.task, getattr(entry, "engine", None))]


def can_serve(entry: Any, endpoint: Endpoint) -> bool:
    """Whether an entry answers an endpoint; /classify takes zero-shot entries with fixed labels."""
    if endpoint not in task_of(entry).endpoints:
        return False
    if endpoint is Endpoint.classify and entry.task == "zero-shot-classification":
        return bool(entry.labels)
    return True


def runner_class(entry: Any) -> type[Any]:
    """The runner class of a catalog entry, imported now (this imports torch)."""
    module, name = task_of(entry).runner.split(":")
    runner: type[Any] = getattr(importlib.import_module(f"app.runners.{module}"), name)
    return runner
