"""The background writer: worker threads and error capture.

The RunEngine waits while a callback runs, so the callback only copies a
frame into memory (see ``_buffer``); the worker threads here do the I/O.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._errors import WriteError
from ..storage import limit_staging

if TYPE_CHECKING:
    from ._memory import MemoryBudget

logger = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[], object]:
    """glibc's ``malloc_trim(0)``, or a no-op where there is none."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


#: Gives the C allocator's free memory back to the system. glibc keeps what a
#: thread freed in that thread's arena, and after the first large blocks are
#: freed it stops handing large blocks back: the buffers a worker encodes
#: (and, merging, reads) would stay resident after its write, past the
#: memory bound.
release_free_memory = _malloc_trim()


#: The workers give freed memory back to the system each time this part of
#: the memory bound has been freed (see Workers._release).
TRIM_PARTS = 40

#: Each worker's buffer for writes around the page cache is this part of the
#: memory bound (see _storage.write_around_cache).
STAGING_PARTS = 64

#: How much lower the workers' scheduling priority is than the process's
#: (``nice`` steps).
WORKER_NICENESS = 10


def yield_to_the_run_engine() -> None:
    """Lower this thread's scheduling priority (Linux: threads have their
    own ``nice`` value), so that the RunEngine's thread is not preempted by
    the workers for a scheduler time slice (several milliseconds) whenever
    there are more busy threads than cores. The workers still take every
    cycle the RunEngine leaves; where the call is not available, nothing
    changes."""
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(current + WORKER_NICENESS, 19))
    except (AttributeError, OSError):
        pass


#: Seconds between looks, while waiting for the workers, at whether the
#: interpreter is shutting down (see refuse_while_finalizing).
FINALIZING_POLL = 0.1


def refuse_while_finalizing(what: str) -> None:
    """Raise :class:`WriteError` if the interpreter is shutting down: no
    thread starts then (``Thread.start`` waits forever), and the workers,
    daemon threads, never run again. The writer finishes its runs before
    that, at exit (see ``_writer``); this refuses what comes later (a stop
    document sent while a RunEngine's task is destroyed) instead of hanging."""
    if sys.is_finalizing():
        raise WriteError(f"cannot {what}: the Python interpreter is shutting down")


@dataclass
class Failure:
    """An exception raised in a worker, and what it was doing."""

    error: BaseException
    what: str


class _Queue:
    """One worker thread's jobs, and the bytes they cover (its load)."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.load = 0


class Workers:
    """The worker threads of one writer, shared by all its runs, each with its
    own FIFO queue (started with the first job).

    A job goes to the worker with the least work queued, except that jobs of
    one ``lane`` go to the same worker, in order, while any of them is
    queued: a partial block written early and the same block completed later
    are never reordered. Sharing the threads keeps what interleaved runs
    write, and the memory they write it with, to one set of workers.
    """

    def __init__(self, budget: MemoryBudget, count: int = 2, name: str = "bluesky-zarr") -> None:
        self.budget = budget
        self.count = count
        self.name = name
        self._queues: list[_Queue] = []
        self._threads: list[threading.Thread] = []
        #: Stopped threads that may still be doing their last jobs.
        self._retiring: list[threading.Thread] = []
        #: Lanes with queued jobs: their worker's queue, and how many.
        self._lanes: dict[Hashable, tuple[_Queue, int]] = {}
        self._lock = threading.Lock()
        #: Bytes of jobs finished since the allocator last gave memory back.
        self._untrimmed = 0

    def put(self, lane: Hashable | None, cost: int, item: tuple[Any, ...]) -> None:
        """Queue ``item``, a job covering ``cost`` bytes, in ``lane`` (or none).

        Where no thread can start (Python 3.12 refuses new threads in
        ``atexit`` handlers, where the writer finishes interrupted runs), the
        job runs here, on the calling thread, after the jobs already queued.
        """
        refuse_while_finalizing("queue a job on the worker threads")
        with self._lock:
            if not self._queues:
                self._start()
            if self._queues:
                held = self._lanes.get(lane) if lane is not None else None
                if held is not None:
                    jobs, count = held
                else:
                    jobs, count = min(self._queues, key=lambda q: q.load), 0
                if lane is not None:
                    self._lanes[lane] = (jobs, count + 1)
                jobs.load += cost
                jobs.jobs.put((lane, cost, item))
                return
            retiring, self._retiring = self._retiring, []
        # Jobs queued before the threads were stopped come first (a block's
        # partial write before its completion).
        for thread in retiring:
            if thread is not threading.current_thread():
                thread.join()
        self._run(None, (lane, cost, item))

    def _start(self) -> None:
        """Start the threads (under the lock); those that cannot start are
        left out, all of them where no thread can start."""
        for n in range(self.count):
            jobs = _Queue()
            thread = threading.Thread(
                target=self._work, args=(jobs,), name=f"{self.name}-{n}", daemon=True
            )
            try:
                thread.start()
            except RuntimeError as err:  # "can't create new thread at interpreter shutdown"
                logger.debug("bluesky-zarr: %s: no worker thread: %s", self.name, err)
                break
            self._queues.append(jobs)
            self._threads.append(thread)

    def stop(self, join: bool = False) -> None:
        """Let the threads end once the jobs queued so far are done (a later
        job starts new ones); with ``join``, wait until they have ended."""
        with self._lock:
            queues, self._queues = self._queues, []
            threads, self._threads = self._threads, []
            self._lanes.clear()
            for jobs in queues:
                jobs.jobs.put(None)
            # Threads still busy with their queues: a job run on the caller's
            # thread (see put) waits for them.
            self._retiring = [t for t in self._retiring if t.is_alive()] + threads
        if join and not sys.is_finalizing():
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()

    def _done(self, jobs: _Queue, lane: Hashable | None, cost: int) -> None:
        with self._lock:
            jobs.load -= cost
            held = self._lanes.get(lane) if lane is not None else None
            if held is not None and held[0] is jobs:
                if held[1] == 1:
                    del self._lanes[lane]
                else:
                    self._lanes[lane] = (jobs, held[1] - 1)

    def _release(self, nbytes: int) -> None:
        """Give what jobs freed back to the system (see release_free_memory)
        each time it adds up to a part of the budget (``TRIM_PARTS``): the
        process holds at most that much more than the budget counts, and the
        memory the next jobs take is mostly still mapped (each trim costs
        page faults after it)."""
        with self._lock:
            self._untrimmed += nbytes
            if self._untrimmed < self.budget.limit // TRIM_PARTS:
                return
            self._untrimmed = 0
        release_free_memory()

    def _work(self, jobs: _Queue) -> None:
        # The buffer each worker writes shards from: a 64th of the budget.
        limit_staging(self.budget.limit // STAGING_PARTS)
        yield_to_the_run_engine()
        while True:
            queued = jobs.jobs.get()
            if queued is None:
                return
            self._run(jobs, queued)

    def _run(self, jobs: _Queue | None, queued: tuple[Any, ...]) -> None:
        """Do one job (of queue ``jobs``, or of none: run on the caller's thread)."""
        lane, cost, (owner, job, nbytes, copies, what, done) = queued
        if nbytes:  # a write (an encoding job holds no memory of its own)
            self.budget.activate(copies * nbytes)
        failure = None
        try:
            job()
        except BaseException as err:  # noqa: BLE001 - recorded, re-raised to the caller
            logger.error("bluesky-zarr: %s failed: %r", what, err)
            failure = Failure(err, what)
        finally:
            done()
            if nbytes:
                self._release(nbytes * (1 + copies))
                self.budget.finish(nbytes, copies)
            if jobs is not None:
                self._done(jobs, lane, cost)
            owner.finished(failure)


class BackgroundWriter:
    """One run's jobs on the writer's :class:`Workers`: what is pending, and
    what failed."""

    def __init__(self, workers: Workers) -> None:
        self.workers = workers
        self._pending = 0
        self._cond = threading.Condition()
        self.failures: list[Failure] = []
        self._reported = 0

    def submit(
        self,
        lane: Hashable | None,
        job: Callable[[], None],
        nbytes: int,
        what: str,
        done: Callable[[], None],
        copies: int = 1,
        cost: int | None = None,
    ) -> None:
        """Queue ``job``, which writes a block of ``nbytes`` and makes
        ``copies`` copies of it meanwhile; ``done`` runs after it (even if it
        fails) to hand back the block's memory. Jobs of one ``lane`` run in
        order; ``cost``: the bytes the job covers (``nbytes`` if not given),
        to spread the work over the workers."""
        refuse_while_finalizing(what)
        with self._cond:
            self._pending += 1
        self.workers.budget.hand_over(nbytes)
        try:
            self.workers.put(
                lane, nbytes if cost is None else cost, (self, job, nbytes, copies, what, done)
            )
        except BaseException:
            # Never queued: nothing to wait for, the block's memory given back.
            self.workers.budget.finish(nbytes, 0)
            with self._cond:
                self._pending -= 1
                self._cond.notify_all()
            done()
            raise

    def finished(self, failure: Failure | None) -> None:
        """A job of this run is done (``failure`` if it failed)."""
        with self._cond:
            if failure is not None:
                self.failures.append(failure)
            self._pending -= 1
            self._cond.notify_all()

    def drain(self) -> None:
        """Wait until every submitted job has finished."""
        with self._cond:
            while self._pending:
                refuse_while_finalizing(f"wait for {self._pending} job(s) of the worker threads")
                self._cond.wait(FINALIZING_POLL)

    def new_failures(self) -> list[Failure]:
        """Failures not yet reported to the caller."""
        with self._cond:
            new = self.failures[self._reported :]
            self._reported = len(self.failures)
            return new
