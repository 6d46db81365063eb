"""What the batcher's lanes need around a forward pass: the runner's two steps (a protocol),
the record of a batch its observers get, what a client is told of an input that failed,
and posting results and errors back to each request's event loop, one wake-up per loop.
DynamicBatcher (app/batching/batcher.py) owns the queue, the lanes and their state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from app.batching.forming import Outcome, PendingInput, Tokenized
from app.errors import (
    InferenceFailed,
    ModelUnavailable,
    ServiceError,
)

log = logging.getLogger(__name__)


class BatchRunner(Protocol):
    """The two steps a runner exposes to the batcher; both run on its lanes."""

    def encode(self, payloads: Sequence[Any]) -> Sequence[Tokenized]: ...

    def infer(self, payloads: Sequence[Any], encoded: Sequence[Any]) -> list[Any]: ...


@dataclass
class BatchRecord:
    """One formed batch, as reported to observers (logs, metrics, the benchmark)."""

    size: int
    tokens: int  # the inputs' own: each input's rows at its longest row's length
    padded_tokens: int  # what a padded batch of them holds: rows x the longest row
    queue_wait_s: float
    infer_s: float
    queue_depth: int


def is_out_of_memory(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name in {"OutOfMemoryError", "MemoryError"} or "out of memory" in str(exc).lower()


def describe_failure(model: str, exc: Exception) -> ServiceError:
    """What a client is told of an input that failed alone."""
    if isinstance(exc, ServiceError):
        return exc
    if is_out_of_memory(exc):
        return ModelUnavailable(
            f"model '{model}' ran out of memory on this input alone; send a shorter input",
            retry_after=5,
        )
    log.error("inference failed on model %s", model, exc_info=exc)
    return InferenceFailed(f"inference failed on model '{model}': {type(exc).__name__}: {exc}")


def post_results(batch: Sequence[PendingInput], results: Sequence[Any]) -> None:
    """Each input's result set on its outcome, on its event loop: one wake-up per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Outcome, Any]]] = {}
    for item, result in zip(batch, results, strict=True):
        by_loop.setdefault(item.loop, []).append((item.future, result))
    for loop, outcomes in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown); nobody waits
            loop.call_soon_threadsafe(_resolve_all, outcomes)


def post_deltas(items: Sequence[PendingInput], deltas: Sequence[Any]) -> None:
    """Each input's partial result (new generated text) handed to its outcome's ``delta``,
    on its event loop, in order: one wake-up per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any]]] = {}
    for item, delta in zip(items, deltas, strict=True):
        by_loop.setdefault(item.loop, []).append((item.future, delta))
    for loop, outcomes in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown); nobody waits
            loop.call_soon_threadsafe(_stream_all, outcomes)


def reject(item: PendingInput, error: BaseException) -> None:
    """``error`` set on the input's outcome, on its event loop."""
    with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown); nobody waits any more
        item.loop.call_soon_threadsafe(_reject, item.future, error)


def _resolve_all(outcomes: list[tuple[Outcome, Any]]) -> None:
    for future, result in outcomes:
        if not future.done():
            future.set_result(result)


def _stream_all(outcomes: list[tuple[Any, Any]]) -> None:
    for outcome, delta in outcomes:
        if not outcome.done():
            outcome.delta(delta)


def _reject(future: Outcome, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
