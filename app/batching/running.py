"""What a lane does with inputs: tokenize them (one that a tokenizer cannot read fails
alone, with a 422 naming it), run a formed batch (a failing batch is halved until the
failing input is alone, so one bad input never fails its neighbours; an out-of-memory error
shrinks the batch the same way), and post results and errors back to each request's event
loop, one wake-up per loop. DynamicBatcher (app/batching/batcher.py) owns the queue and the
lanes; this is the work it gives them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from app.batching.fairness import FairShares
from app.batching.forming import Outcome, PendingInput, Tokenized
from app.errors import (
    DeadlineExceeded,
    InferenceFailed,
    InputTooLarge,
    InvalidInput,
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


class BatchWork:
    """The lanes' share of DynamicBatcher: admitting, running and failing inputs. Every
    attribute below is the batcher's; those it guards are read and written holding ``_lock``."""

    name: str
    max_request_tokens: int | None
    batches: int
    items: int
    _runner: BatchRunner
    _observer: Callable[[BatchRecord], None] | None
    _lock: threading.RLock
    _pool: list[PendingInput]
    _depth: int
    _shares: FairShares
    _idle: set[int]
    _express: int
    _rate: float
    _batch_s: float
    _closed: bool
    _incoming: list[PendingInput]
    _running: dict[int, list[PendingInput]]
    _wakes: list[threading.Condition]
    _on_crash: Callable[[BaseException], object] | None

    def _crash(self, exc: BaseException) -> None:
        """A lane died: every input this batcher holds fails now (503, retry), the other lanes
        stop, and ``on_crash`` tells the owner, which reloads the model."""
        with self._lock:
            self._closed = True
            held = self._incoming + self._pool + [item for batch in self._running.values() for item in batch]
            self._incoming, self._pool, self._running = [], [], {}
            for wake in self._wakes:
                wake.notify()
        error = ModelUnavailable(
            f"model '{self.name}' stopped serving ({type(exc).__name__}: {exc}) and is being reloaded; retry",
            retry_after=5,
        )
        for item in held:
            self._fail(item, error)
        if self._on_crash is not None:
            self._on_crash(exc)

    def _admit(self, new: list[PendingInput]) -> None:
        live = [item for item in new if not self._drop_if_done(item)]
        if not live:
            return
        try:
            encoded: list[Any] = list(self._runner.encode([item.payload for item in live]))
        except Exception:
            # One undecodable input must not fail the others: encode each on its own.
            encoded = [self._encode_one(item) for item in live]
        admitted = []
        for item, enc in zip(live, encoded, strict=True):
            if enc is not None:
                item.encoded = enc
                item.ticket.tokens += enc.rows * enc.length
                admitted.append(item)
        # A request's items all arrive in one submit, so they are all encoded by now.
        pooled = []
        for item in admitted:
            limit = self.max_request_tokens
            if limit is not None and item.ticket.tokens > limit:
                self._fail(
                    item,
                    InputTooLarge(
                        f"this request has {item.ticket.tokens} tokens after truncation; the limit is "
                        f"{limit} (TESSERA_MAX_TOKENS_PER_REQUEST): send fewer or shorter inputs"
                    ),
                )
            else:
                pooled.append(item)
        with self._lock:
            for item in pooled:
                self._shares.tag(item)
            self._pool.extend(pooled)

    def _encode_one(self, item: PendingInput) -> Any:
        try:
            return self._runner.encode([item.payload])[0]
        except ServiceError as exc:  # the runner's own word on what is wrong with the text
            self._fail(item, type(exc)(f"input {item.index}: {exc.message}", retry_after=exc.retry_after))
            return None
        except Exception as exc:
            # What a tokenizer cannot read is the client's text: a 422 that names it.
            log.info("model %s could not tokenize input %d: %s: %s", self.name, item.index, type(exc).__name__, exc)
            self._fail(
                item,
                InvalidInput(
                    f"input {item.index} could not be tokenized by model '{self.name}' ({type(exc).__name__}: "
                    f"{exc}); send plain UTF-8 text"
                ),
            )
            return None

    def _drop_if_done(self, item: PendingInput) -> bool:
        if item.future.done():  # the client went away or its deadline passed
            self._release(item)
            return True
        if item.deadline <= time.monotonic():
            self._fail(item, DeadlineExceeded("the request's deadline passed while it was queued"))
            return True
        return False

    def _execute(self, batch: list[PendingInput], lane: int) -> float:
        """Run ``batch`` on ``lane`` and resolve its futures; the seconds it took."""
        started = time.monotonic()
        try:
            results = self._runner.infer([i.payload for i in batch], [i.encoded for i in batch])
        except Exception as exc:
            if len(batch) > 1:
                # Halve until the failing input is alone; an OOM shrinks the batch that way too.
                log.warning("batch of %d failed on %s (%s); splitting", len(batch), self.name, exc)
                middle = len(batch) // 2
                return self._execute(batch[:middle], lane) + self._execute(batch[middle:], lane)
            self._fail(batch[0], self._describe_failure(exc))
            return time.monotonic() - started
        elapsed = time.monotonic() - started
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Outcome, Any]]] = {}
        for item, result in zip(batch, results, strict=True):
            item.ticket.batch_sizes.append(len(batch))
            by_loop.setdefault(item.loop, []).append((item.future, result))
        with self._lock:
            # Its clients answer at once; their next inputs should find this lane, which is
            # about to look for work, rather than wake another one.
            if lane != self._express:
                self._idle.add(lane)
            for item in batch:
                self._release_locked(item)
            self.batches += 1
            self.items += len(batch)
        for loop, outcomes in by_loop.items():  # one wake-up per event loop, not one per item
            with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown); nobody waits
                loop.call_soon_threadsafe(_resolve_all, outcomes)
        rate = len(batch) / max(elapsed, 1e-6)
        self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate
        self._batch_s = elapsed if self._batch_s == 0 else 0.8 * self._batch_s + 0.2 * elapsed
        if self._observer is not None:
            self._observer(
                BatchRecord(
                    size=len(batch),
                    tokens=sum(i.cost for i in batch),
                    padded_tokens=sum(i.encoded.rows for i in batch) * max(i.encoded.length for i in batch),
                    queue_wait_s=started - min(i.enqueued for i in batch),
                    infer_s=elapsed,
                    queue_depth=self._depth,
                )
            )
        return elapsed

    def _describe_failure(self, exc: Exception) -> ServiceError:
        if isinstance(exc, ServiceError):
            return exc
        if is_out_of_memory(exc):
            return ModelUnavailable(
                f"model '{self.name}' ran out of memory on this input alone; send a shorter input",
                retry_after=5,
            )
        log.error("inference failed on model %s", self.name, exc_info=exc)
        return InferenceFailed(f"inference failed on model '{self.name}': {type(exc).__name__}: {exc}")

    def _fail(self, item: PendingInput, error: ServiceError) -> None:
        _post(item, _reject, error)
        self._release(item)

    def _release(self, item: PendingInput) -> None:
        with self._lock:
            self._release_locked(item)

    def _release_locked(self, item: PendingInput) -> None:
        self._depth -= 1
        self._shares.left(item.tenant)


def _post(item: PendingInput, callback: Callable[[Outcome, Any], None], value: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown); nobody waits any more
        item.loop.call_soon_threadsafe(callback, item.future, value)


def _resolve_all(outcomes: list[tuple[Outcome, Any]]) -> None:
    for future, result in outcomes:
        if not future.done():
            future.set_result(result)


def _reject(future: Outcome, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
