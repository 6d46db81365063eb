"""Runners, one module per task family, and the table that picks one for a catalog entry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.runners.base import Runner, resolve_device, resolve_dtype
from app.runners.classification import ClassificationRunner, NliZeroShotRunner
from app.runners.embedding import EmbeddingRunner, ExtractiveSummaryRunner, SimilarityZeroShotRunner
from app.runners.seq2seq import Seq2SeqRunner

# (task, engine) -> runner class. A lookup table, so adding a task family is one line.
RUNNERS: dict[tuple[str, str | None], type[Runner]] = {
    ("text-classification", None): ClassificationRunner,
    ("zero-shot-classification", "nli"): NliZeroShotRunner,
    ("zero-shot-classification", "similarity"): SimilarityZeroShotRunner,
    ("translation", None): Seq2SeqRunner,
    ("summarization", "abstractive"): Seq2SeqRunner,
    ("summarization", "extractive"): ExtractiveSummaryRunner,
    ("embedding", None): EmbeddingRunner,
}


def build_runner(entry: Any, path: Path) -> Runner:
    """Load ``entry``'s weights from the local directory ``path`` onto its device. Blocking."""
    device = resolve_device(entry.device)
    dtype = resolve_dtype(entry.dtype, device)
    runner_class = RUNNERS[(entry.task, getattr(entry, "engine", None))]
    return runner_class(entry, path, device, dtype)  # type: ignore[call-arg]
