"""Work items claimed in order and prepared ahead by background threads (bounded).

A scheduler's view: ``claim()`` returns the next item (None when none is left) and
``prepare(item)`` turns it into what the consumer needs; neither knows about the other's
contents. :meth:`Prefetch.next` hands out ``(item, prepared)`` in claim order. With
``depth`` >= 1, up to ``depth`` items are claimed and being prepared (one thread each) while
the consumer works, so a consumer that needs a new item every ``t`` seconds never waits
when preparing one takes less than ``depth * t``; with ``depth`` 0 each item is claimed and
prepared in :meth:`next` itself (the caller's thread).

An item is always claimed before it is prepared, in the caller's thread; an item claimed but
not yet handed out when the consumer stops (an error, a kill) is simply never run, like one
claimed by a process that died. An exception raised by ``prepare`` is raised again, the same
exception object, by the :meth:`next` call that would have returned that item.

``wait_seconds`` is the time :meth:`next` blocked (the consumer waiting for its input, all
of the preparation when ``depth`` is 0); ``prepare_seconds`` sums the preparation times.
The work should release the GIL (NumPy, SciPy, native kernels, file reads do) for the
threads to overlap with a consumer running Python.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, TypeVar

from ..boxes import ParameterError

T = TypeVar("T")
R = TypeVar("R")


class Prefetch(Generic[T, R]):
    """``(item, prepare(item))`` for each ``claim()``ed item, ``depth`` items prepared ahead."""

    def __init__(self, claim: Callable[[], T | None], prepare: Callable[[T], R], depth: int,
                 name: str = "prefetch"):
        if int(depth) < 0:
            raise ParameterError("prefetch", depth, f"prefetch={depth}: must be >= 0")
        self._claim, self._prepare, self.depth = claim, prepare, int(depth)
        self._pool = (ThreadPoolExecutor(max_workers=self.depth, thread_name_prefix=name)
                      if self.depth else None)
        self._queue: deque[tuple[T, Future]] = deque()
        self._exhausted = False
        self._lock = threading.Lock()
        self.wait_seconds = 0.0
        self.prepare_seconds = 0.0
        self.items = 0

    def _timed(self, item: T) -> R:
        t0 = time.perf_counter()
        try:
            return self._prepare(item)
        finally:
            with self._lock:
                self.prepare_seconds += time.perf_counter() - t0

    def _fill(self) -> None:
        while not self._exhausted and len(self._queue) < self.depth:
            item = self._claim()
            if item is None:
                self._exhausted = True
                break
            self._queue.append((item, self._pool.submit(self._timed, item)))

    def next(self) -> tuple[T, R] | None:
        """The next item and its preparation (waiting for it if needed); None when none is left."""
        t0 = time.perf_counter()
        try:
            if self._pool is None:
                item = None if self._exhausted else self._claim()
                if item is None:
                    self._exhausted = True
                    return None
                self.items += 1
                return item, self._timed(item)
            self._fill()
            if not self._queue:
                return None
            item, fut = self._queue.popleft()
            self._fill()  # the next ones start while this one is finished and consumed
            self.items += 1
            return item, fut.result()
        finally:
            self.wait_seconds += time.perf_counter() - t0

    def close(self) -> None:
        """Cancels preparations not started and waits for running ones (their items stay
        claimed and unrun); idempotent."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._queue.clear()
        self._exhausted = True

    def __enter__(self) -> "Prefetch[T, R]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
