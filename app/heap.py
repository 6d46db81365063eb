"""Keeping Python's garbage collector off the long-lived heap.

A loaded server holds hundreds of thousands of Python objects that live as long as the
process (transformers' modules, tokenizers, TorchScript wrappers, FastAPI's routes).
CPython's full collection walks all of them, and under load it runs often: the objects of
the requests in flight outlive the young collections, and once enough of them reach the
old generation (a quarter of its size) a full collection starts. Measured on the 2-core
machine at concurrency 64 (MiniLM classifier, 450,000 tracked objects): a full collection
every 0.65 s, 0.2 s each, holding the GIL: about a third of the event loop's CPU, and a
200 ms stall for every request and every lane at once. Freezing what exists once the
server and a model are loaded (``gc.freeze``) takes it out of every later collection; full
collections then take about 1 ms.

Unloading a model must still free it: ``collect_all`` unfreezes, collects, and freezes
what is left again.
"""

from __future__ import annotations

import gc
import threading

_lock = threading.Lock()


def freeze_survivors() -> None:
    """Collect what is garbage now, then leave everything else out of future collections."""
    with _lock:
        gc.collect()
        gc.freeze()


def collect_all() -> None:
    """A full collection, frozen objects included (a model was dropped); then freeze again."""
    with _lock:
        gc.unfreeze()
        gc.collect()
        gc.freeze()
