"""Batch formation: the inputs waiting for a model, and which of them run together next.

The batcher (app/batching/batcher.py) keeps a pool of tokenized inputs; ``form_batch``
picks the next batch from it: the first input in fair order (app/batching/fairness.py;
for a lone tenant, the oldest), plus its nearest neighbours by token
length within the same group (generation settings), as long as the batch stays within a
padding ratio of its shortest member (or a slack of a few tokens), a number of inputs and
a budget of padded tokens. On a CPU padded tokens cost as much as real ones, so two
well-sorted batches beat one ragged batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class Tokenized(Protocol):
    """What a runner's ``encode`` returns per input: its token length and model rows."""

    @property
    def length(self) -> int: ...

    @property
    def rows(self) -> int: ...


class Outcome(Protocol):
    """Where a lane sets one input's result or error: an asyncio future, or the engine's
    per-input slot (app/engine/core.py). Read from the lanes (``done``), set on its loop."""

    def done(self) -> bool: ...

    def set_result(self, result: Any, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


@dataclass(eq=False)
class Ticket:
    """What the inputs of one request share: their token total, checked against the limit,
    the sizes of the batches they ran in, and with tracing on the context of the request's
    span (a sampled one) that its queue span goes below and its batches link to."""

    tokens: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    trace: Any = None  # an OpenTelemetry SpanContext
    queued_span: bool = False  # whether its wait in the queue is recorded (at its first batch)


@dataclass(eq=False)
class PendingInput:
    """One input of a request, from ``submit`` until its result is posted back."""

    ticket: Ticket
    payload: Any
    group: Hashable
    future: Outcome
    loop: asyncio.AbstractEventLoop
    deadline: float
    seq: int
    index: int = 0  # its position among the request's inputs, for error messages
    tenant: Hashable = None  # whom it counts against (app/batching/fairness.py)
    enqueued: float = field(default_factory=time.monotonic)
    encoded: Any = None  # a Tokenized, once a lane has tokenized it
    start: float = 0.0  # its fair-queueing start tag, once tokenized
    released: bool = False  # no longer counted in the queue's depth and its tenant's share
    began: tuple[float, int] | None = None  # traced, in a continuous batch: when it joined, at which step

    @property
    def cost(self) -> int:
        return int(self.encoded.rows) * int(self.encoded.length)


def form_batch(
    pool: Sequence[PendingInput],
    *,
    max_items: int,
    max_tokens: int,
    padding_ratio: float,
    padding_slack: int,
) -> list[PendingInput]:
    """The first input of ``pool`` in fair order (smallest start tag, then arrival; for one
    tenant, simply the oldest) and its nearest neighbours by length, sorted by length.

    A neighbour joins only while the batch's longest input stays within ``padding_ratio``
    of its shortest (or ``padding_slack`` tokens past it) and its rows x longest length
    within ``max_tokens``; at most ``max_items`` inputs.
    """
    if not pool:
        return []
    oldest = min(pool, key=lambda item: (item.start, item.seq))
    # By length for padding; among equal lengths, in fair order, so that ties go to the first.
    group = sorted((i for i in pool if i.group == oldest.group), key=lambda i: (i.encoded.length, i.start, i.seq))
    lo = hi = group.index(oldest)
    rows = oldest.encoded.rows
    while hi - lo + 1 < max_items:
        fits = []
        for j in (lo - 1, hi + 1):
            if not 0 <= j < len(group):
                continue
            shortest = min(group[lo].encoded.length, group[j].encoded.length)
            width = max(group[hi].encoded.length, group[j].encoded.length)
            within_padding = width <= max(shortest * padding_ratio, shortest + padding_slack)
            within_budget = (rows + group[j].encoded.rows) * width <= max_tokens
            if within_padding and within_budget:
                fits.append(j)
        if not fits:
            break
        # The neighbour closest in length to the oldest input keeps the batch tight.
        j = min(fits, key=lambda k: abs(group[k].encoded.length - oldest.encoded.length))
        lo, hi = min(lo, j), max(hi, j)
        rows += group[j].encoded.rows
    return group[lo : hi + 1]
