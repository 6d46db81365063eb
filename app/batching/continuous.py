"""Iteration-level scheduling (continuous batching) for models that generate in steps
(encoder-decoder translation and summarization): the batch is re-formed between decoder
steps, not between batches.

The queue, admission (429 with Retry-After, the request token limit), tokenizing,
cancellation and fairness are DynamicBatcher's (app/batching/batcher.py); only the lane
differs. One lane drives the model's running batch (app/runners/decoding.py): before each
step it drops the sequences whose clients left or whose deadline passed, then lets waiting
inputs join, in fair order (the smallest start tag first, app/batching/fairness.py), while
the running inputs stay within ``max_batch_size`` and their rows (beams) times input tokens
within ``max_batch_tokens``; then one step runs, new text goes to streaming clients, and
finished inputs answer at once and leave. A request that arrives mid-generation starts at
the next step instead of waiting for the longest output of a batch, and a finished
sequence costs nothing more.

Traced (app/tracing.py), an input of a sampled request records its wait in the queue when it
joins, and its generation when it finishes: one span from join to finish, with the steps it
ran and the running batch's size as it joined as attributes (a span per step would cost
more than the step's bookkeeping).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

from app import tracing
from app.batching.batcher import DynamicBatcher
from app.batching.forming import PendingInput
from app.batching.running import BatchRecord, describe_failure, post_deltas, post_results
from app.errors import ModelUnavailable

log = logging.getLogger(__name__)


class SteppedRunner(Protocol):
    """What a runner that generates in steps gives the scheduler (app/runners/seq2seq.py)."""

    def encode(self, payloads: Sequence[Any]) -> Sequence[Any]: ...

    def running_batch(self) -> Any:
        """A new, empty running batch (app/runners/decoding.py: RunningBatch)."""
        ...

    def start(self, batch: Any, payload: Any, encoded: Any, streaming: bool) -> Any:
        """One input's sequence, ready to join ``batch``; raises InvalidInput for settings
        the model refuses."""
        ...

    def rows_of(self, payload: Any) -> int:
        """The rows (beams) one input will hold."""
        ...


class ContinuousBatcher(DynamicBatcher):
    """DynamicBatcher whose one lane runs a continuous batch (see the module docstring)."""

    def __init__(self, runner: Any, **options: Any) -> None:
        options.update(lanes=1, express_lane=False)
        self._last_finish = 0.0  # when inputs last finished: Retry-After's rate
        super().__init__(runner, **options)

    def _serve(self, lane: int) -> None:
        runner: SteppedRunner = self._runner  # type: ignore[assignment]
        batch = runner.running_batch()
        running: dict[Any, PendingInput] = {}  # each running sequence (hashed by identity) -> its input
        while True:
            with self._lock:
                self._idle.discard(lane)
                while not self._closed and not running and not self._incoming and not self._pool:
                    self._sleep(lane)
                if self._closed:
                    leftover = self._incoming + self._pool + list(running.values())
                    self._incoming, self._pool = [], []
                    break
                new, self._incoming = self._incoming, []
                self._running[lane] = [*running.values(), *new]
            if new:
                self._admit(new)
            # Clients that left, and deadlines that passed, free their rows before this step.
            gone = [sequence for sequence, item in running.items() if self._drop_if_done(item)]
            if gone:
                batch.remove(gone)
                for sequence in gone:
                    del running[sequence]
            with self._lock:
                joining = self._joiners(running, batch)
                self._running[lane] = [*running.values(), *joining]
            started = time.monotonic()
            entering = []
            for item in joining:
                streams = bool(getattr(item.future, "streams", False))  # the engine's outcome says
                try:
                    sequence = runner.start(batch, item.payload, item.encoded, streams)
                except Exception as exc:  # settings the model refuses (422), or a fault: this input alone
                    self._fail(item, describe_failure(self.name, exc))
                    continue
                running[sequence] = item
                entering.append(sequence)
                item.ticket.batch_sizes.append(len(running))
                if tracing.enabled and item.ticket.trace is not None:
                    self._joined(item, started, len(running))
            if not running:
                continue
            share = self._thread_share
            try:
                with share.running(True, False) if share else contextlib.nullcontext():
                    progress = batch.step(entering)
            except Exception as exc:  # the step failed: its inputs fail, the batch starts afresh
                log.warning("a decoding step failed on %s (%s); failing its %d inputs", self.name, exc, len(running))
                for item in running.values():
                    self._fail(item, describe_failure(self.name, exc))
                running.clear()
                batch = runner.running_batch()
                continue
            self._posted(progress, running, entering, started)
        for item in leftover:
            self._fail(item, ModelUnavailable(f"model '{self.name}' was unloaded before this input ran"))

    def _joiners(self, running: dict[Any, PendingInput], batch: Any) -> list[PendingInput]:
        """Waiting inputs that join the running batch at this step, in fair order (called
        holding ``_lock``)."""
        self._pool = [item for item in self._pool if not self._drop_if_done(item)]
        if not self._pool or (running and not batch.joins_mid_flight):
            return []
        runner: SteppedRunner = self._runner  # type: ignore[assignment]
        slots = self.max_batch_size - len(running)
        tokens = sum(item.cost * runner.rows_of(item.payload) for item in running.values())
        chosen: list[PendingInput] = []
        for item in sorted(self._pool, key=lambda i: (i.start, i.seq)):
            if len(chosen) >= slots:
                break
            cost = item.cost * runner.rows_of(item.payload)
            if (running or chosen) and tokens + cost > self.max_batch_tokens:
                break  # in fair order: a later, smaller input does not overtake it
            chosen.append(item)
            tokens += cost
        if chosen:
            self._shares.served(chosen)
            picked = set(map(id, chosen))
            self._pool = [item for item in self._pool if id(item) not in picked]
        return chosen

    def _posted(
        self,
        progress: Sequence[Any],
        running: dict[Any, PendingInput],
        entering: Sequence[Any],
        started: float,
    ) -> None:
        """One step's deltas and results posted; the finished inputs released."""
        elapsed = time.monotonic() - started
        self.batches += 1  # a step
        deltas = [(running[p.sequence], p.delta) for p in progress if p.delta is not None]
        done = [(running[p.sequence], p.result) for p in progress if p.result is not None]
        if self._observer is not None:
            items = list(running.values())
            self._observer(
                BatchRecord(
                    size=len(items),
                    tokens=sum(i.cost for i in items),
                    padded_tokens=sum(i.cost for i in items),
                    queue_wait_s=max((started - running[s].enqueued for s in entering), default=0.0),
                    infer_s=elapsed,
                    queue_depth=self._depth,
                )
            )
        if deltas:
            post_deltas([item for item, _ in deltas], [delta for _, delta in deltas])
        if not done:
            return
        finished = [item for item, _ in done]
        if tracing.enabled:
            for item in finished:
                if item.began is not None:
                    self._generated(item)
        for p in progress:
            if p.result is not None:
                del running[p.sequence]
        now = time.monotonic()
        rate = len(finished) / max(now - (self._last_finish or started), 1e-6)
        self._last_finish = now
        self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate
        with self._lock:
            for item in finished:
                self._release_locked(item)
            self.items += len(finished)
        post_results(finished, [result for _, result in done])

    def _joined(self, item: PendingInput, at: float, running: int) -> None:
        """A traced input joins the running batch: its request's wait in the queue is recorded."""
        item.began = (at, self.batches)
        ticket = item.ticket
        if not ticket.queued_span:
            ticket.queued_span = True
            attributes = {"tessera.model": self.name, "tessera.batch.size": running}
            tracing.record(
                "tessera.queue", ticket.trace, tracing.epoch_ns(item.enqueued), tracing.epoch_ns(at), attributes
            )

    def _generated(self, item: PendingInput) -> None:
        """A traced input finished: its generation, from joining to now, with the steps it ran."""
        assert item.began is not None
        at, step = item.began
        attributes = {"tessera.model": self.name, "tessera.input": item.index, "tessera.steps": self.batches - step}
        tracing.record("tessera.generate", item.ticket.trace, tracing.epoch_ns(at), time.time_ns(), attributes)
