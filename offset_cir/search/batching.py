"""Micro-batching of model calls: requests from several threads that reach the model within a few milliseconds
of each other run as one batch call (``MicroBatcher``), on one thread.

Concurrent searches then share one model call instead of each running the model (and each its own pool of
intra-op threads) at the same time. A request announces itself before it prepares its input (``slot()``), so
the batcher waits for the ones on their way -- at most ``max_wait`` seconds, at most ``max_batch`` of them --
and a lone request never waits.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Iterator, Sequence

log = logging.getLogger(__name__)

#: most requests in one batch call
MAX_BATCH = 8
#: seconds the batcher waits for announced requests to join a batch
MAX_WAIT = 0.005


class MicroBatcher:
    """Runs ``run_batch(items) -> results`` (one result per item, in order) on a thread of its own for the items
    that callers hand in through :meth:`slot`; ``on_batch(size)`` is told each batch's size.

    An item whose batch fails is run again alone, so one bad request fails only itself. After :meth:`close`
    items run in the caller's thread, one at a time."""

    def __init__(self, run_batch: Callable[[list], Sequence], max_batch: int = MAX_BATCH, max_wait: float = MAX_WAIT,
                 on_batch: Callable[[int], None] | None = None, name: str = "micro-batcher"):
        self.run_batch = run_batch
        self.max_batch = max(1, int(max_batch))
        self.max_wait = max(0.0, float(max_wait))
        self.on_batch = on_batch
        self.name = name
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._announced = 0  # slots open whose item is not queued yet
        self._closed = False
        self._thread: threading.Thread | None = None
        self._direct = threading.Lock()  # after close: one call at a time

    @contextlib.contextmanager
    def slot(self) -> Iterator["_Slot"]:
        """Announce a request, prepare its item inside the block, then ``slot.run(item)`` (blocks for the
        result)."""
        with self._cond:
            self._announced += 1
        s = _Slot(self)
        try:
            yield s
        finally:
            if not s.queued:  # left without an item (its preparation failed)
                with self._cond:
                    self._announced -= 1
                    self._cond.notify_all()

    def run(self, item) -> Any:
        """The result of one item (announced and queued at once)."""
        with self.slot() as s:
            return s.run(item)

    def _put(self, item) -> Future:
        fut: Future = Future()
        with self._cond:
            self._announced -= 1
            direct = self._closed
            if not direct:
                self._queue.append((item, fut))
                self._start()
                self._cond.notify_all()
        if direct:
            with self._direct:
                self._settle([(item, fut)])
        return fut

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def _next_batch(self) -> list | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            deadline = time.monotonic() + self.max_wait
            while len(self._queue) < self.max_batch and self._announced > 0 and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._settle(batch)

    def _settle(self, batch: list) -> None:
        """Run ``batch`` and hand each future its result; a failed batch of several is run again item by item."""
        try:
            results = list(self.run_batch([item for item, _ in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: {len(results)} results for {len(batch)} items")
        except BaseException as exc:  # noqa: BLE001 - every waiting caller must hear of it
            if len(batch) > 1:
                for one in batch:
                    self._settle([one])
                return
            batch[0][1].set_exception(exc)
            return
        if self.on_batch is not None:
            self.on_batch(len(batch))
        for (_, fut), result in zip(batch, results):
            fut.set_result(result)

    def close(self) -> None:
        """Stop the thread once the queued items have run; later items run in the caller's thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()


class _Slot:
    """A request announced to a :class:`MicroBatcher` (made by ``MicroBatcher.slot``)."""

    def __init__(self, batcher: MicroBatcher):
        self.batcher = batcher
        self.queued = False

    def run(self, item) -> Any:
        if self.queued:
            raise RuntimeError("a batcher slot runs one item")
        self.queued = True
        return self.batcher._put(item).result()
