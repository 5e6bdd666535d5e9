"""The background writer: worker threads, a memory budget and error capture.

The RunEngine waits while a callback runs, so the callback only copies a
frame into memory; the worker threads here do the I/O. Memory held by blocks
(filling, queued or being written) is counted against a budget; when the
budget is spent the callback blocks until a write finishes (backpressure).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


#: Transient copies zarr makes of a block while it encodes and writes it
#: (chunk buffers, then the assembled shard), measured with the benchmark.
ENCODE_COPIES = 2


class MemoryBudget:
    """Bytes held by buffered blocks, bounded by ``limit``.

    ``reserved`` counts every block from allocation until its write is done;
    ``in_flight`` the part already handed to the workers; ``active`` the part
    a worker is writing right now, which zarr copies while encoding it. The
    bound covers all of it: blocks plus the encoding copies.
    """

    def __init__(self, limit: int, workers: int = 1) -> None:
        self.limit = int(limit)
        self.workers = workers
        self.reserved = 0
        self.in_flight = 0
        self.active = 0
        self.peak = 0
        self.largest = 0
        self._cond = threading.Condition()

    @property
    def used(self) -> int:
        return self.reserved + ENCODE_COPIES * self.active

    def _note_peak(self) -> None:
        self.peak = max(self.peak, self.used)

    def try_reserve(self, nbytes: int) -> bool:
        with self._cond:
            # A block larger than the whole budget is still allowed alone,
            # otherwise it could never be written.
            largest = max(self.largest, nbytes)
            # Keep room for the copies the workers will make when they write.
            headroom = ENCODE_COPIES * self.workers * largest
            if self.reserved + nbytes + headroom > self.limit and self.reserved > 0:
                return False
            self.largest = largest
            self.reserved += nbytes
            self._note_peak()
            return True

    def activate(self, nbytes: int) -> None:
        with self._cond:
            self.active += nbytes
            self._note_peak()

    def hand_over(self, nbytes: int) -> None:
        with self._cond:
            self.in_flight += nbytes

    def finish(self, nbytes: int) -> None:
        """A write is done: its block is no longer in flight nor being encoded."""
        with self._cond:
            self.in_flight -= nbytes
            self.active -= nbytes
            self._cond.notify_all()

    def free(self, nbytes: int) -> None:
        """A block's memory is given up."""
        with self._cond:
            self.reserved -= nbytes
            self._cond.notify_all()

    def wait(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait(timeout)


class BufferPool:
    """Block buffers kept for reuse, their memory still counted as reserved.

    Fresh memory costs the RunEngine's thread a page fault (and the kernel a
    page of zeros) for every 4 KiB it first writes: about as much as copying
    the frame itself. A reused buffer is already mapped.
    """

    def __init__(self, budget: MemoryBudget, per_shape: int = 4) -> None:
        self.budget = budget
        self.per_shape = per_shape
        self._free: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
        with self._lock:
            free = self._free.get((shape, dtype.str))
            return free.pop() if free else None

    def give(self, array: np.ndarray) -> None:
        """Keep ``array`` for a later block, or give its memory up."""
        if array.dtype.kind != "O":
            with self._lock:
                free = self._free.setdefault((array.shape, array.dtype.str), [])
                if len(free) < self.per_shape:
                    free.append(array)
                    return
        self.budget.free(array.nbytes)

    def drop(self) -> bool:
        """Give up every kept buffer; whether there were any."""
        with self._lock:
            arrays = [a for free in self._free.values() for a in free]
            self._free.clear()
        for array in arrays:
            self.budget.free(array.nbytes)
        return bool(arrays)


@dataclass
class Failure:
    """An exception raised in a worker, and what it was doing."""

    error: BaseException
    what: str


class BackgroundWriter:
    """Worker threads, each with its own FIFO queue.

    Jobs with the same ``lane`` run on the same worker, in order: a partial
    block written early and the same block completed later are never
    reordered.
    """

    def __init__(self, budget: MemoryBudget, workers: int = 2, name: str = "") -> None:
        self.budget = budget
        self._queues: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(workers)]
        self._pending = 0
        self._cond = threading.Condition()
        self.failures: list[Failure] = []
        self._reported = 0
        self._threads = [
            threading.Thread(
                target=self._work, args=(q,), name=f"bluesky-zarr-{name}-{n}", daemon=True
            )
            for n, q in enumerate(self._queues)
        ]
        for thread in self._threads:
            thread.start()

    def submit(
        self,
        lane: int,
        job: Callable[[], None],
        nbytes: int,
        what: str,
        done: Callable[[], None],
    ) -> None:
        """Queue ``job``; ``done`` runs after it (even if it fails) to hand
        back the block's memory."""
        with self._cond:
            self._pending += 1
        self.budget.hand_over(nbytes)
        self._queues[lane % len(self._queues)].put((job, nbytes, what, done))

    def _work(self, jobs: queue.SimpleQueue) -> None:
        while True:
            item = jobs.get()
            if item is None:
                return
            job, nbytes, what, done = item
            self.budget.activate(nbytes)
            try:
                job()
            except BaseException as err:  # noqa: BLE001 - recorded, re-raised to the caller
                logger.error("bluesky-zarr: writing %s failed: %r", what, err)
                with self._cond:
                    self.failures.append(Failure(err, what))
            finally:
                self.budget.finish(nbytes)
                done()
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()

    def drain(self) -> None:
        """Wait until every submitted job has finished."""
        with self._cond:
            while self._pending:
                self._cond.wait()

    def new_failures(self) -> list[Failure]:
        """Failures not yet reported to the caller."""
        with self._cond:
            new = self.failures[self._reported :]
            self._reported = len(self.failures)
            return new

    def close(self) -> None:
        self.drain()
        for q in self._queues:
            q.put(None)
        for thread in self._threads:
            thread.join()
