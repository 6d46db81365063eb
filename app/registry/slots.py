"""A catalog entry's slot and what the service and the routes use of the models (``Models``):
the registry's own slots in the engine or the one process (app/registry/registry.py), or a
front's mirror of the engine's (app/engine/client.py). Nothing here imports torch, so that a
front process does not either.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from app.batching.running import BatchRecord
from app.catalog import Catalog, Entry
from app.errors import ModelNotFound
from app.payloads import GenerationDelta

if TYPE_CHECKING:
    from app.batching.batcher import DynamicBatcher
    from app.runners.base import Runner


# A streamed request's listeners (app/engine/client.py: EngineClient.infer): input i's new
# text as it is generated, and its result once it has one.
OnDelta = Callable[[int, GenerationDelta], None]
OnResult = Callable[[int, Any], None]


class ModelState(StrEnum):
    not_loaded = "not_loaded"
    loading = "loading"
    loaded = "loaded"
    failed = "failed"


@dataclass(eq=False)
class ModelSlot:
    """One catalog entry and, once loaded, its runner and batcher."""

    entry: Entry
    state: ModelState = ModelState.not_loaded
    runner: Runner | None = None
    batcher: DynamicBatcher | None = None
    error: str | None = None
    failed_at: float = 0.0
    loading: asyncio.Task[None] | None = None
    in_flight: int = 0
    waiting: int = 0  # requests waiting for this model's load to finish
    last_used: float = 0.0
    load_seconds: float | None = None
    memory_bytes: int = 0
    device: str | None = None
    loads: int = 0
    backend: str | None = None  # what runs the forward pass: torch, onnx, onnx-int8
    backend_note: str | None = None  # why it is not what the entry asked for
    reported_depth: int = 0  # in a front (app/engine/client.py): the engine's queue depth

    def hold(self) -> None:
        """A request uses the model: it is not evicted until ``let_go``."""
        self.in_flight += 1
        self.last_used = time.monotonic()

    def let_go(self) -> None:
        self.in_flight -= 1
        self.last_used = time.monotonic()

    @property
    def queue_depth(self) -> int:
        """Inputs queued for this model."""
        return self.batcher.queue_depth if self.batcher is not None else self.reported_depth

    @property
    def busy(self) -> bool:
        # Waiters count too: a model must not be evicted between its load and their first use.
        queued = self.batcher is not None and self.batcher.queue_depth > 0
        return self.in_flight > 0 or self.waiting > 0 or queued


@runtime_checkable
class Chunking(Protocol):
    """A runner that splits a long document into pieces its model reads whole (seq2seq)."""

    def split_into_chunks(self, text: str) -> list[str]: ...

    def split_keeping_lines(self, text: str) -> tuple[list[str], list[str]]: ...


class Models(Protocol):
    """What the service and the routes use of the models: the engine's client, in-process or
    over ZeroMQ (app/engine/client.py)."""

    catalog: Catalog
    hub_online: bool

    @property
    def connected(self) -> bool: ...

    async def refresh(self) -> None: ...

    def slot(self, name: str) -> ModelSlot: ...

    def slots(self) -> list[ModelSlot]: ...

    def has(self, name: str) -> bool: ...

    async def get_or_load(self, name: str) -> ModelSlot: ...

    async def unload(self, name: str) -> bool: ...

    async def infer(
        self,
        name: str,
        payloads: Sequence[Any],
        *,
        timeout_s: float,
        group: Hashable = None,
        tenant: Hashable = None,
        sizes: list[int] | None = None,
        on_delta: OnDelta | None = None,
        on_result: OnResult | None = None,
    ) -> list[Any]: ...

    async def split_into_chunks(self, name: str, text: str) -> list[str]: ...

    async def split_keeping_lines(self, name: str, text: str) -> tuple[list[str], list[str]]: ...

    async def take(self, tenant: str, inputs: int) -> None: ...


@dataclass
class RegistryHooks:
    """Observers the metrics layer plugs in; the registry works without them."""

    on_batch: Callable[[str, BatchRecord], None] | None = None
    on_load: Callable[[str, float, bool], None] | None = None
    # After a model is loaded or unloaded, on a worker thread (the serve entry point's heap).
    on_change: Callable[[], None] | None = None


class CatalogSlots:
    """One slot per catalog entry, by name: the registry's own, or a front's mirror of the
    engine's (app/engine/client.py)."""

    _slots: dict[str, ModelSlot]

    def slot(self, name: str) -> ModelSlot:
        try:
            return self._slots[name]
        except KeyError:
            raise ModelNotFound(f"unknown model '{name}'; the catalog has: {', '.join(self._slots)}") from None

    def slots(self) -> list[ModelSlot]:
        return list(self._slots.values())

    def has(self, name: str) -> bool:
        return name in self._slots
