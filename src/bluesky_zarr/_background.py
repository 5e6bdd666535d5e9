"""The background writer: worker threads and error capture.

The RunEngine waits while a callback runs, so the callback only copies a
frame into memory (see ``_buffer``); the worker threads here do the I/O.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ._buffer import MemoryBudget, release_free_memory

logger = logging.getLogger(__name__)


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
        copies: int = 1,
    ) -> None:
        """Queue ``job``, which writes a block of ``nbytes`` and makes
        ``copies`` copies of it meanwhile; ``done`` runs after it (even if it
        fails) to hand back the block's memory."""
        with self._cond:
            self._pending += 1
        self.budget.hand_over(nbytes)
        self._queues[lane % len(self._queues)].put((job, nbytes, copies, what, done))

    def _work(self, jobs: queue.SimpleQueue) -> None:
        while True:
            item = jobs.get()
            if item is None:
                return
            job, nbytes, copies, what, done = item
            self.budget.activate(copies * nbytes)
            try:
                job()
            except BaseException as err:  # noqa: BLE001 - recorded, re-raised to the caller
                logger.error("bluesky-zarr: writing %s failed: %r", what, err)
                with self._cond:
                    self.failures.append(Failure(err, what))
            finally:
                done()
                # What the job freed leaves the process before the budget
                # counts it free (see release_free_memory).
                release_free_memory()
                self.budget.finish(nbytes, copies)
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
