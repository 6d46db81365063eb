"""Who may run torch on several threads: one lane of the process, and only while it runs alone."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator


class ThreadShare:
    """Who may run torch on several threads: one thread in the process, when it runs alone.

    ``torch.set_num_threads`` sets one count for every thread of the process, and each
    thread that runs torch on more than one thread keeps an OpenMP thread pool of its
    own. Once a second such pool exists, pools stop spinning between operations and a
    multi-threaded forward pass takes almost twice as long (measured on 2 cores: one text
    through MiniLM, 8.1 ms becomes 15.1 ms). So the first lane that runs becomes the
    lead: it gets the whole budget while it is the only thread running torch, and
    everything else (other lanes, other models, model loads) runs on one thread, as does
    the lead whenever anything else runs too or ran within ``QUIET_S``: under steady
    load the lead stays on one thread instead of flipping, since its pool's threads spin
    for a while after each multi-threaded pass, taking CPU from the other lanes (measured:
    c=64 throughput fell by a third without the quiet period). The lead's role ends with
    its thread.
    """

    QUIET_S = 0.2

    def __init__(self, budget: int, set_threads: Callable[[int], None]) -> None:
        self.budget = budget
        self._set_threads = set_threads
        self._lock = threading.Lock()
        self._lead: int | None = None
        self._busy: set[int] = set()  # thread idents running torch now
        self._shared_until = 0.0  # when a thread other than the lead last stopped running torch
        self._current = 0

    @contextlib.contextmanager
    def running(self, may_lead: bool = True) -> Iterator[None]:
        """Count the calling thread as running torch for the ``with`` block."""
        me = threading.get_ident()
        with self._lock:
            if may_lead and self._lead is None:
                self._lead = me
            self._busy.add(me)
            self._apply()
        try:
            yield
        finally:
            with self._lock:
                self._busy.discard(me)
                if me != self._lead:
                    self._shared_until = time.monotonic()
                self._apply()

    def retire(self) -> None:
        """The calling thread ends; if it led, the next lane to run may lead."""
        with self._lock:
            if self._lead == threading.get_ident():
                self._lead = None

    def _apply(self) -> None:
        alone = self._busy == {self._lead} and time.monotonic() - self._shared_until > self.QUIET_S
        threads = self.budget if alone else 1
        if threads != self._current:
            self._set_threads(threads)
            self._current = threads
