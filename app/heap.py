"""Keeping Python's garbage collector off the long-lived heap (``gc.freeze``) and out of
the request path (young collections spaced out), and glibc's malloc from keeping what
tensors of varied shapes leave behind (trimmed when the process goes quiet). Process-wide knobs: only the
serve entry point (app/serving.py) turns them; an app embedded in another process leaves
them alone.

A loaded server holds some 450,000 objects that live as long as the process or the model
(transformers' modules, tokenizers, traces, FastAPI's routes), and under load CPython's
full collection walks them all, often: the objects of requests in flight outlive the young
collections and soon make up the quarter of the old generation that starts a full one.
Young collections cost too, at CPython's default of one per 700 new objects: one every
eight requests or so at concurrency 64, each walking the objects of every request in flight.
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()

# New container objects between young collections (CPython's default: 700).
YOUNG_THRESHOLD = 10_000

# When a process that runs models hands malloc's free pages back (see ``trim_when_quiet``):
# once it has used under QUIET_CPU of a core for TRIM_QUIET_S, and every TRIM_BUSY_S under load.
TRIM_QUIET_S = 0.5
QUIET_CPU = 0.1
TRIM_BUSY_S = 10.0
_trimming = False


def freeze_survivors() -> None:
    """Collect what is garbage now, then leave everything else out of future collections.

    Measured on 2 cores at concurrency 64 (MiniLM): a full collection every 0.65 s taking
    0.2 s with the GIL held (a third of the event loop's CPU, and a stall for every lane);
    frozen, full collections take about 1 ms.
    """
    with _lock:
        gc.collect()
        gc.freeze()


def collect_all() -> None:
    """A full collection, frozen objects included (a model was loaded or dropped: its cycles
    must go with it); then freeze again what survives."""
    with _lock:
        gc.unfreeze()
        gc.collect()
        gc.freeze()


@contextmanager
def young_collections_spaced_out() -> Iterator[None]:
    """Within: young collections once per ``YOUNG_THRESHOLD`` new objects; the process's
    thresholds come back after.

    Measured at concurrency 64 (MiniLM, 2 cores): with the default, young and middle
    collections took about 12 ms of every second under load (some 800 and 75 of them over
    a 27-second run); at 10,000, 10 collections took 0.02 s in all. A server whose forward
    pass was stubbed out spent 0.25-0.29 instead of 0.33-0.37 ms of event-loop CPU per
    request. Cyclic garbage waits longer: 10,000 new objects at most.
    """
    previous = gc.get_threshold()
    gc.set_threshold(max(previous[0], YOUNG_THRESHOLD), *previous[1:])
    try:
        yield
    finally:
        gc.set_threshold(*previous)


def trim_when_quiet(quiet_s: float = TRIM_QUIET_S, busy_s: float = TRIM_BUSY_S) -> bool:
    """A daemon thread that gives glibc malloc's free pages back to the kernel
    (``malloc_trim(0)``) once the process has run and gone quiet (used under
    ``QUIET_CPU`` of a core over ``quiet_s``), and every ``busy_s`` under sustained load;
    whether it started (False: not glibc). Once per process.

    A forward pass's activations (a batch of 16 texts of 256 tokens: 6-50 MB each) come
    from the heap and the lanes' arenas once glibc's mmap threshold has risen to their size
    (it rises to each large block freed, up to 32 MB). With one request shape the freed
    blocks are reused; with varied shapes (batch size x padded length) each batch wants
    other sizes, the freed ones lie in pieces that fit nothing, and the heap only grows:
    five storms of mixed /classify requests (bench/mixed_soak.py, MiniLM) took the engine
    from 535 to 918 MB. Nothing leaked: trimmed, those pages go back.

    Each page handed back is faulted in again by the next batch that uses it, so when
    matters (MiniLM forward passes on mixed batches, one thread, in a loop: 250 minor
    faults and 0.15 s of system time per 337 texts untrimmed; a fixed 1 MB mmap threshold,
    which keeps RSS flat too, 9,000 faults per text and 5.2 s, +40 % CPU per text; a trim
    every second 1,300 faults per text and 0.8 s). Quiet moments cost nothing, and under
    load a trim every ``busy_s`` costs about one batch's faults.
    """
    global _trimming
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): its malloc is its own business
        return False
    with _lock:
        if _trimming:
            return True
        _trimming = True

    def trimming() -> None:
        seen = trimmed = time.process_time()  # CPU seconds: when last looked at, after the last trim
        last_trim = time.monotonic()
        while True:
            time.sleep(quiet_s)
            cpu = time.process_time()
            quiet = cpu - seen < QUIET_CPU * quiet_s
            seen = cpu
            if cpu > trimmed and (quiet or time.monotonic() - last_trim >= busy_s):
                trim(0)  # ctypes lets go of the GIL meanwhile
                seen = trimmed = time.process_time()
                last_trim = time.monotonic()

    threading.Thread(target=trimming, name="malloc-trim", daemon=True).start()
    return True
