"""The memory budget of a writer's buffered blocks, and of the copies the
workers make while they write them."""

from __future__ import annotations

import threading


class MemoryBudget:
    """Bytes held by buffered blocks, bounded by ``limit``.

    ``reserved`` counts every block from allocation until its write is done;
    ``in_flight`` the part already handed to the workers; ``active`` the
    copies the workers make of the blocks they are writing right now (zarr
    copies a block while encoding it; a merge reads the block's chunks back
    too). The bound covers all of it: blocks plus those copies.
    """

    def __init__(self, limit: int, workers: int = 1) -> None:
        self.limit = int(limit)
        self.workers = workers
        self.reserved = 0
        self.in_flight = 0
        self.active = 0
        self.peak = 0
        #: Room kept for the copies of the blocks being written (the most
        #: any block reserved so far needs).
        self.headroom = 0
        self._cond = threading.Condition()

    @property
    def used(self) -> int:
        return self.reserved + self.active

    def _note_peak(self) -> None:
        self.peak = max(self.peak, self.used)

    def try_reserve(
        self, nbytes: int, copies: tuple[int, int] = (1, 1), held: int = 0
    ) -> bool:
        """Reserve a block of ``nbytes`` whose writing makes ``copies``
        (encoding, merging) of it, if the bound allows; ``held``: bytes of the
        same block reserved already."""
        with self._cond:
            # Keep room for the copies the workers will make when they write:
            # each worker encoding a block, or one merging a block (a second
            # worker waits when a merge leaves no room, see activate).
            encode, merge = copies
            headroom = max(self.headroom, max(merge, encode * self.workers) * nbytes)
            # A block larger than the whole budget is still allowed alone,
            # otherwise it could never be written.
            if self.reserved + nbytes + headroom > self.limit and self.reserved > held:
                return False
            self.headroom = headroom
            self.reserved += nbytes
            self._note_peak()
            return True

    def activate(self, nbytes: int) -> None:
        """A worker starts writing, making ``nbytes`` of copies: it waits while
        that would pass the bound and another worker is writing (one worker
        always may, so writes go on and free room)."""
        with self._cond:
            while self.active and self.reserved + self.active + nbytes > self.limit:
                self._cond.wait()
            self.active += nbytes
            self._note_peak()

    def hand_over(self, nbytes: int) -> None:
        with self._cond:
            self.in_flight += nbytes

    def finish(self, nbytes: int, copies: int) -> None:
        """A write is done: its block is no longer in flight nor being encoded."""
        with self._cond:
            self.in_flight -= nbytes
            self.active -= copies * nbytes
            self._cond.notify_all()

    def free(self, nbytes: int) -> None:
        """A block's memory is given up."""
        with self._cond:
            self.reserved -= nbytes
            self._cond.notify_all()

    def wait(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait(timeout)
