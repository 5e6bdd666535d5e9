"""The lock that gives a local store to one writer at a time.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .._errors import (
    StorageError,
    StoreLockedError,
)


class StoreLock:
    """An exclusive lock on a store path, held while a run writes it.

    ``flock`` on a hidden file beside the store: the kernel releases it if the
    process dies, so a killed writer leaves no stale lock behind. The holder
    unlinks the file before it unlocks, and a writer that locked a file checks
    that the file is still the one at the lock path (else it locked a file
    that a holder has just given up, and tries again): so at most one writer
    ever holds the lock of a path.
    """

    def __init__(self, store: Path) -> None:
        self.path = store.with_name(f".{store.name}.lock")
        self._fd: int | None = None
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            except OSError as err:
                raise StorageError(f"cannot lock {store}: {err}") from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise StoreLockedError(
                    f"{store} is being written by another writer; two writers cannot "
                    f"write one store"
                ) from None
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            locked = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (
                locked.st_dev,
                locked.st_ino,
            ):
                self._fd = fd
                return
            os.close(fd)

    def release(self) -> None:
        """Give the lock up (unlinking its file first); never raises."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only or vanished directory: the unlock below still frees it
        finally:
            os.close(self._fd)
            self._fd = None
