"""The dynamic batcher: one queue and one or more worker threads ("lanes") per loaded model.

Requests enqueue items and await futures. A free lane tokenizes new items (runners guard
their tokenizer with a lock, so two lanes never use it at once), adds them to a shared
pool, and forms a batch from the group of the oldest waiting item, sorted by token length
so that padding stays small, within ``max_batch_size`` items and ``max_batch_tokens``
padded tokens (app/batching/forming.py). No lane waits for a batch to fill: when idle, an
item goes straight through, and whatever arrives during a forward pass forms the next
batch. A failing batch is split in halves until the failing input is alone, so one bad
input never fails its neighbours.

With several lanes, one lane tokenizes and forms the next batch while another runs its
forward pass, and on a CPU each busy lane gets an equal share of torch's threads (a lane
alone gets them all, so a lone request is as fast as with one lane). Independent lanes
keep the cores busy when the event loop takes a core for a moment: threads of one
forward pass wait on each other at every operation, lanes do not.

Between tenants (API keys), the first input in fair order seeds each batch
(app/batching/fairness.py), and an express lane runs a tenant with nothing running at once
while the regular lanes are all busy with others. A lane that fails (a bug, not an input)
fails every input the batcher holds with 503 and tells its owner, which reloads the model.

This module is longer than the project's ~350 lines on purpose: the queue, the lanes and
the express lane share one lock and one set of state (pool, depth, fair shares, who runs
what), and each method reads what the others write under that lock; split over files, that
state would be declared in one place and used in another. What needs none of it lives
beside it: batch formation (forming.py), fairness (fairness.py), thread shares
(threads.py), and posting results (running.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from app import tracing
from app.batching.fairness import FairShares
from app.batching.forming import Outcome, PendingInput, Ticket, form_batch
from app.batching.running import BatchRecord, BatchRunner, describe_failure, post_results, reject
from app.batching.threads import ThreadShare
from app.errors import (
    DeadlineExceeded,
    InputTooLarge,
    InvalidInput,
    ModelUnavailable,
    Overloaded,
    ServiceError,
)

log = logging.getLogger(__name__)

# How long (at most, and as a fraction of the last forward pass) a lane waits for
# returning clients after a batch.
MAX_LINGER_S = 0.05
LINGER_FRACTION = 0.05

# Batches longer than this (smoothed) are spread over every lane at once (see _leave_to_others).
SPREAD_ABOVE_S = 0.05

# Inputs in one batch of the express lane (see DynamicBatcher._serve_express).
EXPRESS_BATCH = 4


def batch_span(model: str, batch: Sequence[PendingInput], lane: int, started: float) -> Any:
    """With tracing on, the span of one batch (None if none of its requests is sampled),
    linked to each of its requests' spans (a batch serves many; it is no one's child), and
    each request's wait in the queue, recorded at its first batch."""
    tickets = [t for t in dict.fromkeys(item.ticket for item in batch) if t.trace is not None]
    if not tickets:
        return None
    now = tracing.epoch_ns(started)
    for ticket in tickets:
        if not ticket.queued_span:
            ticket.queued_span = True
            enqueued = min(item.enqueued for item in batch if item.ticket is ticket)
            tracing.record("tessera.queue", ticket.trace, tracing.epoch_ns(enqueued), now, {"tessera.model": model})
    attributes = {
        "tessera.model": model,
        "tessera.batch.size": len(batch),
        "tessera.batch.requests": len(dict.fromkeys(item.ticket for item in batch)),
        "tessera.batch.tokens": sum(item.cost for item in batch),
        "tessera.batch.padded_tokens": sum(i.encoded.rows for i in batch) * max(i.encoded.length for i in batch),
        "tessera.batch.lane": lane,
    }
    return tracing.start("tessera.batch", attributes=attributes, links=[t.trace for t in tickets], start_ns=now)


def past_deadline(model: str) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"the request did not finish within its deadline on model '{model}'; raise timeout_s or send fewer inputs"
    )


class DynamicBatcher:
    """Batches concurrent requests for one model: ``enqueue`` queues a request's inputs (their
    results are set on the caller's outcomes), ``cancel`` drops them."""

    def __init__(
        self,
        runner: BatchRunner,
        *,
        name: str,
        max_batch_size: int,
        max_batch_tokens: int,
        max_queue_items: int,
        max_request_tokens: int | None = None,
        max_padding_ratio: float = 1.2,
        padding_slack: int,
        observer: Callable[[BatchRecord], None] | None = None,
        lanes: int = 1,
        threads: ThreadShare | None = None,
        on_crash: Callable[[BaseException], object] | None = None,
        express_lane: bool = True,
    ) -> None:
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_queue_items = max_queue_items
        self.max_request_tokens = max_request_tokens
        self.max_padding_ratio = max_padding_ratio
        self.padding_slack = padding_slack
        self._runner = runner
        self._observer = observer
        self._lock = threading.RLock()
        # Each lane sleeps on its own condition, and the idle lane with the lowest index is
        # woken first: at low load, lane 0 alone does the work, on all of torch's threads.
        # One more lane, the express lane, serves only tenants none of whose inputs is
        # running (see _serve_express).
        self._lanes = lanes
        self._express = lanes
        self._wakes = [threading.Condition(self._lock) for _ in range(lanes + 1)]
        self._idle: set[int] = set()  # regular lanes only
        self._express_idle = False
        self._running_tenants: Counter[Hashable] = Counter()  # tenants in batches on regular lanes
        self._incoming: list[PendingInput] = []
        self._pool: list[PendingInput] = []  # encoded, waiting for a batch; guarded by _lock
        self._depth = 0  # items queued or pooled, guarded by _lock
        self._closed = False
        self._seq = itertools.count()
        self._rate = 0.0  # items per second, smoothed; for Retry-After
        self._batch_s = 0.0  # seconds per batch, smoothed
        self._thread_share = threads
        self._shares = FairShares()  # guarded by _lock
        self._on_crash = on_crash
        self._running: dict[int, list[PendingInput]] = {}  # per lane: the inputs it has taken
        self._started: dict[int, float] = {}  # per regular lane running a batch: when it began
        self.batches = 0
        self.items = 0
        self._threads = [
            threading.Thread(target=self._lane, args=(n,), name=f"batcher-{name}-{n}", daemon=True)
            for n in range(lanes + (1 if express_lane else 0))
        ]
        for thread in self._threads:
            thread.start()

    @property
    def queue_depth(self) -> int:
        return self._depth

    @property
    def closed(self) -> bool:
        return self._closed

    def enqueue(
        self,
        payloads: Sequence[Any],
        outcomes: Sequence[Outcome],
        *,
        loop: asyncio.AbstractEventLoop,
        group: Hashable = None,
        deadline: float,
        tenant: Hashable = None,
        trace: Any = None,
    ) -> Ticket:
        """Queue one request's inputs and return at once: each input's result or error is set
        on its entry of ``outcomes`` (anything with an asyncio future's ``done``, ``set_result``
        and ``set_exception``: the engine's per-input slots, app/engine/core.py), on ``loop``'s
        thread. An outcome that is done before its input runs drops the input; inputs still
        queued at ``deadline`` fail when a lane reaches them (the engine answers 504 at the
        instant itself). ``trace``: the context of the request's span, with tracing on (its
        batches' spans link to it). Raises ModelUnavailable (closing), InputTooLarge, Overloaded."""
        ticket = Ticket(trace=trace)
        items = [
            PendingInput(ticket, p, group, outcome, loop, deadline, next(self._seq), index, tenant)
            for index, (p, outcome) in enumerate(zip(payloads, outcomes, strict=True))
        ]
        with self._lock:
            if self._closed:
                raise ModelUnavailable(f"model '{self.name}' is being unloaded; retry the request")
            if len(items) > self.max_queue_items:
                raise InputTooLarge(
                    f"this request needs {len(items)} inputs on model '{self.name}' but at most "
                    f"{self.max_queue_items} can queue (TESSERA_MAX_QUEUE_ITEMS): send fewer or shorter inputs"
                )
            if not self._shares.admits(tenant, len(items), self._depth, self.max_queue_items):
                raise Overloaded(
                    f"model '{self.name}' has {self._depth} inputs queued (limit {self.max_queue_items}), "
                    f"{self._shares.depth[tenant]} of them yours; retry later or send fewer inputs at once",
                    retry_after=self._retry_after(),
                )
            self._incoming.extend(items)
            self._depth += len(items)
            self._shares.queued(tenant, len(items))
            if not self._wake_one() and tenant not in self._running_tenants:
                self._wake_express()
        return ticket

    def cancel(self, ticket: Ticket) -> int:
        """Drop the request's inputs that wait (queued or tokenized) at once; those a lane holds
        are dropped or discarded by it, since their outcomes are done. The inputs dropped here."""
        with self._lock:
            gone = [item for item in (*self._incoming, *self._pool) if item.ticket is ticket]
            if gone:
                self._incoming = [item for item in self._incoming if item.ticket is not ticket]
                self._pool = [item for item in self._pool if item.ticket is not ticket]
                for item in gone:
                    self._release_locked(item)
        return len(gone)

    def close(self, timeout: float = 60) -> bool:
        """Stop the lanes; queued requests fail with 503 rather than hang. True once they stopped."""
        with self._lock:
            self._closed = True
            for wake in self._wakes:
                wake.notify()
        stop_by = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(timeout=max(0.0, stop_by - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    # -- lanes ---------------------------------------------------------------------------

    def _retry_after(self) -> float:
        return float(max(1, math.ceil(self._depth / self._rate))) if self._rate > 0 else 1.0

    def _wake_one(self) -> bool:
        """Wake the idle lane with the lowest index, if any lane is idle (called holding ``_lock``)."""
        if self._idle:
            lane = min(self._idle)
            self._idle.discard(lane)
            self._wakes[lane].notify()
            return True
        return False

    def _wake_express(self) -> None:
        if self._express_idle:  # False without an express lane: nothing sleeps there
            self._express_idle = False
            self._wakes[self._express].notify()

    def _sleep(self, lane: int, timeout: float | None = None) -> None:
        self._idle.add(lane)
        try:
            self._wakes[lane].wait(timeout)
        finally:
            self._idle.discard(lane)  # still there if the timeout, not _wake_one, woke it

    def _lane(self, lane: int) -> None:
        try:
            self._serve_express() if lane == self._express else self._serve(lane)
        except BaseException as exc:  # a bug, not an input: stop serving rather than leave requests hanging
            log.critical("lane %d of model %s failed; the model stops serving", lane, self.name, exc_info=exc)
            self._crash(exc)
        finally:
            if self._thread_share is not None:
                self._thread_share.retire()

    def _serve(self, lane: int) -> None:
        linger_until, linger_target = 0.0, 0
        while True:
            with self._lock:
                self._idle.discard(lane)  # marked free while posting results; now it looks for itself
                while not self._closed:
                    if not self._incoming and not self._pool:
                        self._sleep(lane)
                    elif (wait := self._leave_to_others(lane)) > 0:
                        self._sleep(lane, wait)
                    else:
                        break
                # Clients whose results just went out are about to send their next inputs; a
                # moment's wait lets them join this batch instead of forming a half-size one.
                # Only after a batch: an idle batcher (concurrency 1) never waits.
                while (
                    not self._closed
                    and len(self._incoming) + len(self._pool) < linger_target
                    and time.monotonic() < linger_until
                ):
                    self._sleep(lane, max(0.0, linger_until - time.monotonic()))
                if self._closed:
                    leftover = self._incoming + self._pool
                    self._incoming, self._pool = [], []
                    break
                new, self._incoming = self._incoming, []
                self._running[lane] = new  # while it tokenizes them, they are this lane's
            if new:
                self._admit(new)
            with self._lock:
                batch = self._next_batch()
                self._running[lane] = batch
                tenants = {item.tenant for item in batch}
                self._running_tenants.update(tenants)
                if batch:
                    self._started[lane] = time.monotonic()
                if self._pool:
                    self._wake_one()  # another lane may take what this batch left (see _leave_to_others)
                if not batch:
                    continue
                backlog = self._lanes > 1 and bool(self._pool or self._incoming)
            # Lane 0 is the one woken at low load, so it is the one that may lead.
            share = self._thread_share
            with share.running(lane == 0, backlog) if share else contextlib.nullcontext():
                elapsed = self._execute(batch, lane)
            with self._lock:
                self._running[lane] = []
                self._started.pop(lane, None)
                self._running_tenants.subtract(tenants)
                self._running_tenants = +self._running_tenants  # drop the zeros
                linger_target = min(self.max_batch_size, len(self._pool) + len(self._incoming) + len(batch))
            linger_until = time.monotonic() + min(MAX_LINGER_S, LINGER_FRACTION * elapsed)
        for item in leftover:
            self._fail(item, ModelUnavailable(f"model '{self.name}' was unloaded before this input ran"))

    def _leave_to_others(self, lane: int) -> float:
        """How long ``lane`` should leave the waiting inputs to a lane that is running a batch
        (which takes them next, in one larger batch), in seconds; 0: take them now. Called
        holding ``_lock``.

        Two lanes halve every batch and run two forward passes side by side, each slower:
        on 2 cores with single texts and a near-free model (bench/ceiling.py), 8.0 inputs per
        batch in 3.1 ms on two lanes, 10.7 in 1.9 ms on one, and 0.7x the engine's CPU per
        request. So a second lane joins only where waiting costs more than it saves: when a
        full batch waits, when a tenant with nothing running waits (fairness: it never waits
        behind another tenant's batch), when batches take long (over ``SPREAD_ABOVE_S``,
        smoothed), or once the running batch has run that long.
        """
        started = [at for other, at in self._started.items() if other != lane]
        if (
            not started
            or len(self._incoming) + len(self._pool) >= self.max_batch_size
            or any(tenant not in self._running_tenants for tenant in self._shares.depth)
            or self._batch_s > SPREAD_ABOVE_S
        ):
            return 0.0
        return min(started) + SPREAD_ABOVE_S - time.monotonic()

    def _serve_express(self) -> None:
        """The express lane: while every regular lane is busy, a tenant none of whose inputs
        is running (one request at a time beside another tenant's flood, say) would wait for
        a lane behind a full batch, then run in one; here it runs at once, in a batch of
        such tenants' inputs only (at most ``EXPRESS_BATCH``), on one torch thread. A lone
        tenant never comes here: its inputs are always the ones running."""
        lane = self._express
        while True:
            with self._lock:
                while not self._closed and not self._express_work():
                    self._express_idle = True
                    self._wakes[lane].wait()
                    self._express_idle = False
                if self._closed:
                    return
                # Only the waiting tenants' inputs: tokenizing a flood's would delay theirs.
                new = [item for item in self._incoming if item.tenant not in self._running_tenants]
                self._incoming = [item for item in self._incoming if item.tenant in self._running_tenants]
                self._running[lane] = new
            if new:
                self._admit(new)
            with self._lock:
                batch = self._next_batch(express=True)
                self._running[lane] = batch
                if self._pool:
                    self._wake_one()
            if not batch:
                continue
            share = self._thread_share
            with share.running(may_lead=False, backlog=True) if share else contextlib.nullcontext():
                self._execute(batch, lane)
            with self._lock:
                self._running[lane] = []

    def _express_work(self) -> bool:
        """Whether the express lane has something to do (called holding ``_lock``): every
        regular lane busy, and an input waiting whose tenant has none running."""
        if self._idle or not self._running_tenants:
            return False
        waiting = [*self._incoming, *self._pool]
        return any(item.tenant not in self._running_tenants for item in waiting)

    def _next_batch(self, express: bool = False) -> list[PendingInput]:
        """The next batch from the pool (app/batching/forming.py), called holding ``_lock``.

        A batch whose first input (in fair order) belongs to a tenant with nothing running,
        while other tenants' inputs run, holds such tenants' inputs only: a light tenant's
        request runs in a batch of its own size, not inside a flooder's full one. The express
        lane takes only such batches.
        """
        self._pool = [item for item in self._pool if not self._drop_if_done(item)]
        candidates = self._pool
        if self._running_tenants and self._pool:
            idle_tenants = [i for i in self._pool if i.tenant not in self._running_tenants]
            first = min(self._pool, key=lambda item: (item.start, item.seq))
            if express or first.tenant not in self._running_tenants:
                candidates = idle_tenants
        elif express:
            candidates = []
        batch = form_batch(
            candidates,
            max_items=EXPRESS_BATCH if express else self.max_batch_size,
            max_tokens=self.max_batch_tokens,
            padding_ratio=self.max_padding_ratio,
            padding_slack=self.padding_slack,
        )
        if batch:
            self._shares.served(batch)
        chosen = set(batch)
        self._pool = [item for item in self._pool if item not in chosen]
        return batch

    # -- what a lane does with inputs ------------------------------------------------------

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
        """Tokenize ``new`` (one input a tokenizer cannot read fails alone, with a 422 naming
        it) and pool the inputs within their request's token limit."""
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
        # A request's items all arrive in one enqueue, so they are all encoded by now.
        pooled = []
        limit = self.max_request_tokens
        for item in admitted:
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
                if not item.released:  # not cancelled while it was tokenized
                    self._shares.tag(item)
                    self._pool.append(item)

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
        """Run ``batch`` on ``lane`` and post its results; the seconds it took. A failing batch
        is halved until the failing input is alone (an out-of-memory error shrinks it so too)."""
        started = time.monotonic()
        span = batch_span(self.name, batch, lane, started) if tracing.enabled else None
        try:
            if span is None:
                results = self._runner.infer([i.payload for i in batch], [i.encoded for i in batch])
            else:
                forward: dict[str, Any] = {"tessera.model": self.name, "tessera.batch.size": len(batch)}
                with tracing.tracer.start_as_current_span(
                    "tessera.forward", context=tracing.context_of(span.get_span_context()), attributes=forward
                ):
                    results = self._runner.infer([i.payload for i in batch], [i.encoded for i in batch])
        except Exception as exc:
            if span is not None:
                tracing.failed(span, f"{type(exc).__name__}: {exc}")
                span.end()
            if len(batch) > 1:
                log.warning("batch of %d failed on %s (%s); splitting", len(batch), self.name, exc)
                middle = len(batch) // 2
                return self._execute(batch[:middle], lane) + self._execute(batch[middle:], lane)
            self._fail(batch[0], describe_failure(self.name, exc))
            return time.monotonic() - started
        elapsed = time.monotonic() - started
        for item in batch:
            item.ticket.batch_sizes.append(len(batch))
        rate = len(batch) / max(elapsed, 1e-6)
        self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate
        self._batch_s = elapsed if self._batch_s == 0 else 0.8 * self._batch_s + 0.2 * elapsed
        if self._observer is not None:  # before the answers: a client that has one sees its batch counted
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
        with self._lock:
            # Its clients answer at once; their next inputs should find this lane, which is
            # about to look for work, rather than wake another one.
            if lane != self._express:
                self._idle.add(lane)
            for item in batch:
                self._release_locked(item)
            self.batches += 1
            self.items += len(batch)
        post_results(batch, results)
        if span is not None:
            span.end()
        return elapsed

    def _fail(self, item: PendingInput, error: ServiceError) -> None:
        reject(item, error)
        self._release(item)

    def _release(self, item: PendingInput) -> None:
        with self._lock:
            self._release_locked(item)

    def _release_locked(self, item: PendingInput) -> None:
        if not item.released:
            item.released = True
            self._depth -= 1
            self._shares.left(item.tenant)
