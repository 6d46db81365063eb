"""The model registry: each catalog entry's lifecycle (which entry answers a request is the
service's choice, app/service/choice.py).

Models load lazily on first use, off the event loop, exactly once however many
requests arrive together (single flight). A failed load answers 503 with its reason
and is retried by a request after ``load_retry_after_s``, not by every request in a
storm. Each loaded model owns a DynamicBatcher. Under a per-device memory budget the
least recently used idle model is unloaded to make room; a model with requests in
flight or queued, or a pinned one, never is.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app import tracing
from app.batching.batcher import DynamicBatcher
from app.batching.continuous import ContinuousBatcher
from app.batching.running import BatchRecord
from app.batching.threads import ThreadShare
from app.catalog import Catalog, Entry
from app.config import Settings
from app.errors import InvalidInput, ModelUnavailable, ServiceError, WrongTask
from app.registry.slots import CatalogSlots, Chunking, ModelSlot, ModelState, RegistryHooks
from app.registry.sources import locate, verify_weights
from app.runners import onnx_runtime
from app.runners.base import Runner, resolve_device, resolve_dtype
from app.tasks import runner_class

log = logging.getLogger(__name__)

GIB = 1024**3
# torch's intra-op threads as the process started (or TESSERA_TORCH_THREADS); read once,
# because lanes change the count that threads started later inherit.
STARTUP_TORCH_THREADS = torch.get_num_threads()


@dataclass
class ModelRegistry(CatalogSlots):
    settings: Settings
    catalog: Catalog
    hub_online: bool = False
    hooks: RegistryHooks = field(default_factory=RegistryHooks)

    def __post_init__(self) -> None:
        self._slots = {entry.name: ModelSlot(entry) for entry in self.catalog.models}
        self._budget_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        budget = self.settings.torch_threads or STARTUP_TORCH_THREADS
        self._cpu_threads = ThreadShare(budget, torch.set_num_threads)
        onnx_runtime.configure(self.settings.onnx_cache, budget)

    # -- lifecycle ----------------------------------------------------------------------

    async def get_or_load(self, name: str) -> ModelSlot:
        """The loaded model, loading it first (once, whoever asks) if needed."""
        slot = self.slot(name)
        while slot.state is not ModelState.loaded:
            if slot.loading is None:
                waited = time.monotonic() - slot.failed_at
                if slot.state is ModelState.failed and waited < self.settings.load_retry_after_s:
                    raise ModelUnavailable(
                        f"model '{name}' failed to load: {slot.error}",
                        retry_after=max(1.0, self.settings.load_retry_after_s - waited),
                    )
                slot.loading = asyncio.create_task(self._load(slot))
            slot.waiting += 1
            try:
                await asyncio.shield(slot.loading)
            finally:
                slot.waiting -= 1
            if slot.state is ModelState.failed:
                raise ModelUnavailable(
                    f"model '{name}' failed to load: {slot.error}",
                    retry_after=self.settings.load_retry_after_s,
                )
        return slot

    @asynccontextmanager
    async def use(self, name: str) -> AsyncIterator[ModelSlot]:
        """A loaded model that cannot be evicted while the caller holds it."""
        slot = await self.get_or_load(name)
        slot.hold()
        try:
            yield slot
        finally:
            slot.let_go()

    async def split_into_chunks(self, name: str, text: str) -> list[str]:
        """``text`` in pieces the model reads whole (a seq2seq model's, for chunked
        summaries); InvalidInput if its tokenizer cannot read it."""
        chunks: list[str] = await self._split(name, lambda runner: runner.split_into_chunks(text))
        return chunks

    async def split_keeping_lines(self, name: str, text: str) -> tuple[list[str], list[str]]:
        """``text`` in pieces the model reads whole, cut at its line breaks first, and the
        separators that rejoin their outputs (chunked translations)."""
        split: tuple[list[str], list[str]] = await self._split(name, lambda runner: runner.split_keeping_lines(text))
        return split

    async def _split(self, name: str, split: Callable[[Chunking], Any]) -> Any:
        async with self.use(name) as slot:
            runner = slot.runner
            if not isinstance(runner, Chunking):
                raise WrongTask(f"model '{name}' cannot split long inputs into chunks; drop long_input")
            try:
                return await asyncio.to_thread(split, runner)
            except Exception as exc:  # the tokenizer could not read the client's text
                raise InvalidInput(f"could not be split into chunks ({type(exc).__name__}: {exc})") from exc

    async def _load(self, slot: ModelSlot) -> None:
        """Load ``slot``'s model; traced, a span below whoever asked first (app/tracing.py)."""
        if not tracing.enabled:
            await self._load_model(slot)
            return
        span = tracing.start_here("tessera.model.load", attributes={"tessera.model": slot.entry.name})
        try:
            await self._load_model(slot)
        finally:
            span.set_attributes({"tessera.model.state": slot.state.value, "tessera.device": slot.device or ""})
            if slot.state is ModelState.failed:
                tracing.failed(span, slot.error or "failed")
            span.end()

    async def _load_model(self, slot: ModelSlot) -> None:
        entry = slot.entry
        slot.state, slot.error = ModelState.loading, None
        started = time.monotonic()
        try:
            path = await asyncio.to_thread(self._locate, entry)
            budgeted = _device_key(entry.device) in self.settings.memory_budget_gib
            # Under a budget, loads run one at a time: each sees the memory the last one took.
            async with self._budget_lock if budgeted else contextlib.nullcontext():
                await self._make_room(slot, _weights_bytes(path))
                log.info("loading model %s from %s", entry.name, entry.source.describe())
                runner = await asyncio.to_thread(self._build_on_one_thread, entry, path)
        except Exception as exc:
            slot.state, slot.failed_at = ModelState.failed, time.monotonic()
            slot.error = exc.message if isinstance(exc, ModelUnavailable) else f"{type(exc).__name__}: {exc}"
            log.error("model %s failed to load: %s", entry.name, slot.error)
            self._notify_load(entry.name, time.monotonic() - started, ok=False)
            return
        finally:
            slot.loading = None
        slot.runner = runner
        on_cpu = runner.device.type == "cpu"
        loop = asyncio.get_running_loop()
        # A runner that generates in steps gets the continuous batcher (iteration-level).
        batching = ContinuousBatcher if runner.steps else DynamicBatcher
        batcher: DynamicBatcher
        slot.batcher = batcher = batching(
            runner,
            name=entry.name,
            max_batch_size=self.settings.max_batch_size,
            max_batch_tokens=self.settings.max_batch_tokens,
            max_queue_items=self.settings.max_queue_items,
            max_request_tokens=self.settings.max_tokens_per_request,
            max_padding_ratio=float("inf") if runner.pads_cheaply else self.settings.batch_padding_ratio,
            padding_slack=runner.padding_slack,
            observer=self._batch_observer(entry.name),
            lanes=self.settings.lanes_per_model or (min(runner.cpu_lanes, self._cpu_threads.budget) if on_cpu else 1),
            threads=self._cpu_threads if on_cpu else None,
            on_crash=lambda exc: loop.call_soon_threadsafe(self._crashed, slot, batcher, exc),
        )
        slot.memory_bytes = runner.memory_bytes()
        slot.device = str(runner.device)
        slot.backend, slot.backend_note = runner.backend, runner.backend_note
        slot.load_seconds = time.monotonic() - started
        slot.state, slot.loads, slot.last_used = ModelState.loaded, slot.loads + 1, time.monotonic()
        log.info("model %s loaded on %s in %.1fs", entry.name, slot.device, slot.load_seconds)
        self._notify_load(entry.name, slot.load_seconds, ok=True)

    def _locate(self, entry: Entry) -> Path:
        path = locate(entry, online=self.hub_online, timeout=self.settings.download_timeout_s)
        verify_weights(entry, path)
        return path

    def _build_on_one_thread(self, entry: Entry, path: Path) -> Runner:
        # A load (and its trace) on several threads would leave this thread an OpenMP pool
        # of its own, which slows the lanes' forward passes (see ThreadShare).
        with self._cpu_threads.running(may_lead=False):
            runner = build_runner(entry, path)
        if self.hooks.on_change is not None:
            self.hooks.on_change()
        return runner

    def _crashed(self, slot: ModelSlot, batcher: DynamicBatcher, exc: BaseException) -> None:
        """A lane of this model died (its requests have failed with 503): mark it failed and
        load it again at once, since a load did not fail, so no retry window applies."""
        if slot.batcher is not batcher:
            return
        runner = slot.runner
        slot.state, slot.runner, slot.batcher, slot.memory_bytes = ModelState.failed, None, None, 0
        slot.error = f"a worker failed ({type(exc).__name__}: {exc}); reloading"
        slot.failed_at = 0.0

        async def reload() -> None:
            await asyncio.to_thread(batcher.close)
            if runner is not None:
                await asyncio.to_thread(runner.close)
            with contextlib.suppress(ServiceError):  # a failed reload is reported by its state
                await self.get_or_load(slot.entry.name)

        task = asyncio.get_running_loop().create_task(reload())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def unload(self, name: str) -> bool:
        """Unload a model; its queued requests fail with 503. False if it was not loaded."""
        slot = self.slot(name)
        if slot.loading is not None:
            await asyncio.shield(slot.loading)
        if slot.state is not ModelState.loaded:
            return False
        batcher, runner = slot.batcher, slot.runner
        slot.state, slot.runner, slot.batcher, slot.memory_bytes = ModelState.not_loaded, None, None, 0
        slot.backend = slot.backend_note = None
        stopped = True
        if batcher is not None:
            stopped = await asyncio.to_thread(batcher.close)
        if runner is not None and stopped:
            # Only the weights go; a request still splitting text with the tokenizer finishes.
            device = runner.device
            await asyncio.to_thread(runner.close)
            await asyncio.to_thread(self._collect, device)
        elif runner is not None:
            log.warning("model %s: a forward pass outlived unload; its memory is freed when it ends", name)
        log.info("model %s unloaded", name)
        return True

    def _collect(self, device: torch.device) -> None:
        """After an unload: a model's reference cycles go now (the entry point's collector,
        which knows what it froze, or a plain collection), then CUDA's cache of its blocks."""
        if self.hooks.on_change is not None:
            self.hooks.on_change()
        else:
            gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        for slot in self._slots.values():
            if slot.loading is not None:
                await asyncio.shield(slot.loading)
        for name in list(self._slots):
            await self.unload(name)

    # -- memory budget ------------------------------------------------------------------

    async def _make_room(self, slot: ModelSlot, needed: int) -> None:
        budget_gib = self.settings.memory_budget_gib.get(_device_key(slot.entry.device))
        if budget_gib is None:
            return
        budget = int(budget_gib * GIB)
        # The caller holds _budget_lock.
        device = _device_key(slot.entry.device)
        while True:
            resident = [
                s
                for s in self._slots.values()
                if s.state is ModelState.loaded and _device_key(s.entry.device) == device
            ]
            used = sum(s.memory_bytes for s in resident)
            if used + needed <= budget:
                return
            idle = [s for s in resident if not s.busy and not s.entry.pinned]
            if not idle:
                raise ModelUnavailable(
                    f"loading '{slot.entry.name}' needs about {needed / GIB:.2f} GiB but {device} has "
                    f"{(budget - used) / GIB:.2f} GiB left of its {budget_gib} GiB budget and every loaded "
                    "model is busy or pinned; retry later or raise the memory budget",
                    retry_after=5,
                )
            victim = min(idle, key=lambda s: s.last_used)
            log.info("evicting idle model %s to make room for %s", victim.entry.name, slot.entry.name)
            await self.unload(victim.entry.name)

    def _batch_observer(self, name: str) -> Callable[[BatchRecord], None] | None:
        hook = self.hooks.on_batch
        if hook is None:
            return None
        return lambda record: hook(name, record)

    def _notify_load(self, name: str, seconds: float, *, ok: bool) -> None:
        if self.hooks.on_load:
            self.hooks.on_load(name, seconds, ok)


# transformers' from_pretrained patches process-wide state while it builds a model (a meta
# device context, torch.linspace, torch.nn.init's functions): two loads on two threads at once
# break each other ("Cannot copy out of meta tensor", weights left uninitialized). One at a time.
_BUILDING = threading.Lock()


def build_runner(entry: Any, path: Path) -> Runner:
    """Load ``entry``'s weights from the local directory ``path`` onto its device. Blocking;
    loads in one process run one after another."""
    device = resolve_device(entry.device)
    dtype = resolve_dtype(entry.dtype, device)
    with _BUILDING:
        runner: Runner = runner_class(entry)(entry, path, device, dtype)
    return runner


def _device_key(spec: str) -> str:
    """Budget key of a device spec: 'cpu', 'cuda:0', 'mps'."""
    try:
        device = resolve_device(spec)
    except RuntimeError:
        return spec
    if device.type == "cuda":
        return f"cuda:{device.index or 0}"
    return device.type


def _weights_bytes(path: Path) -> int:
    """Size of the weights on disk: the estimate of what loading will take."""
    files = list(path.glob("*.safetensors")) or list(path.glob("*.bin"))
    return sum(f.stat().st_size for f in files)
