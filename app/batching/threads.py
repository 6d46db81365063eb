"""Who may run torch on several threads: one lane of the process, and only while it runs alone."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator


class ThreadShare:
    """Who may run torch on several threads: one thread in the process, when it runs alone.

    Each thread that runs torch on more than one thread keeps an OpenMP thread pool of
    its own, and once a second such pool exists, pools stop spinning between operations
    and a multi-threaded forward pass takes almost twice as long (measured on 2 cores:
    one text through MiniLM, 8.1 ms becomes 15.1 ms). So the first lane that runs becomes
    the lead and is the only thread that ever runs on the whole budget: when it is the
    only thread running torch and nothing has shared the cores for ``QUIET_S`` (no other
    lane busy, no inputs waiting behind its batch). Everything else (other lanes, other
    models, model loads) runs on one thread. Under steady load the lead stays on one
    thread too: flipping would leave its pool's threads spinning beside the other lanes.

    ``torch.set_num_threads`` is applied by each thread for itself as it starts a batch:
    a thread that has an OpenMP pool keeps its own count, which another thread's call
    does not change.
    """

    QUIET_S = 0.2

    def __init__(self, budget: int, set_threads: Callable[[int], None]) -> None:
        self.budget = budget
        self._set_threads = set_threads
        self._lock = threading.Lock()
        self._lead: int | None = None
        self._busy: set[int] = set()  # idents of the threads running torch now
        self._shared_until = 0.0  # the last moment anything shared the cores with the lead

    @contextlib.contextmanager
    def running(self, may_lead: bool = True, backlog: bool = False) -> Iterator[None]:
        """Run the ``with`` block on this thread's share of torch's threads.

        ``backlog``: inputs wait behind this batch for another lane, which is load like a
        busy lane: the lead stays on one thread, and the quiet period starts again.
        """
        me = threading.get_ident()
        with self._lock:
            now = time.monotonic()
            if may_lead and self._lead is None:
                self._lead = me
            if backlog:
                self._shared_until = now
            self._busy.add(me)
            alone = self._busy == {self._lead} and now - self._shared_until > self.QUIET_S
            threads = self.budget if me == self._lead and alone else 1
        self._set_threads(threads)
        try:
            yield
        finally:
            with self._lock:
                self._busy.discard(me)
                if me != self._lead:
                    self._shared_until = time.monotonic()

    def retire(self) -> None:
        """The calling thread ends; if it led, the next lane to run may lead."""
        with self._lock:
            if self._lead == threading.get_ident():
                self._lead = None
