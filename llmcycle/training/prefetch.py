"""The next micro-batches prepared while the model computes on the current one.

Collating a batch (Python lists to padded tensors) and, on a GPU, pinning it for an asynchronous copy
is host work that would otherwise sit between two steps while the device waits. A single background
thread does it `depth` batches ahead, in order; torch's kernels release the GIL, so on a CPU the thread
overlaps with the forward and backward passes too. Written here rather than with torch's DataLoader:
the batches are a replayable function of (seed, epoch, position) that resume depends on, and a
DataLoader with workers would fork processes holding the model for a few microseconds of work each.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable

_DONE = object()


class Prefetcher:
    """make(i) for i in range(count), computed ahead in a thread and handed out in order by next()."""

    def __init__(self, make: Callable[[int], object], count: int, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(make, count), daemon=True)
        self._thread.start()

    def _work(self, make, count: int) -> None:
        for i in range(count):
            if self._stop.is_set():
                return
            try:
                item = (make(i), None)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
                item = (None, exc)
            if not self._put(item) or item[1] is not None:
                return
        self._put((_DONE, None))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self):
        value, error = self._queue.get()
        if error is not None:
            raise error
        if value is _DONE:
            raise StopIteration("the prefetcher has no more batches")
        return value

    def close(self) -> None:
        """Stop the thread (an early stop or an error leaves batches unconsumed)."""
        self._stop.set()
        self._thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
