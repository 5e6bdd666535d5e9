"""Exceptions raised by bluesky-zarr.

Each subclasses the builtin that fits, so callers may catch either the
specific class or the builtin.
"""

from __future__ import annotations

from typing import Any


class BlueskyZarrError(Exception):
    """Base class of every exception raised by this package."""


class DocumentError(BlueskyZarrError, ValueError):
    """A document is malformed, out of order or inconsistent with its run."""


class DocumentOrderError(DocumentError):
    """A document refers to a run or descriptor that this writer has not seen."""


class DataShapeError(DocumentError):
    """An event's value does not match the shape declared by its descriptor."""


class DataTypeError(DocumentError, TypeError):
    """An event's value cannot be stored with the dtype declared by its descriptor."""


class ScanIndexError(DocumentError, IndexError):
    """An event's ``seq_num`` does not fit the scan shape of its run."""


class OptionError(BlueskyZarrError, ValueError):
    """An option given to the writer is invalid."""


class StoreExistsError(BlueskyZarrError, FileExistsError):
    """The store a run would be written to already exists."""


class StoreLockedError(BlueskyZarrError, RuntimeError):
    """Another writer is writing the same store."""


class UnsafeNameError(BlueskyZarrError, ValueError):
    """A store name built from metadata would leave the root directory."""


class StorageError(BlueskyZarrError, OSError):
    """The storage a store lives in (a bucket, a directory) cannot be used."""


class NotAStoreError(StorageError):
    """A path or URL is not a bluesky-zarr store (a plain Zarr node, a directory of stores)."""


class ReplayError(BlueskyZarrError, ValueError):
    """A recorded document file is unreadable, malformed or truncated."""

    def __init__(self, message: str, *, path: str = "", location: str = "") -> None:
        super().__init__(message)
        #: The file, and where in it (``line 12`` or ``byte 3456``).
        self.path = path
        self.location = location
        #: For :func:`~bluesky_zarr.feeds._replay.replay`: what was written before the error.
        self.report: Any = None


class ReplayInterrupted(KeyboardInterrupt):
    """A replay stopped by SIGINT (Ctrl-C) or SIGTERM, after finishing the
    stores of the runs it had open (kept, marked incomplete)."""

    def __init__(self, signal_name: str, report: Any = None) -> None:
        super().__init__(f"the replay was interrupted by {signal_name}")
        #: ``SIGINT`` or ``SIGTERM``.
        self.signal_name = signal_name
        #: What was written before (a :class:`~bluesky_zarr.feeds._replay.ReplayReport`).
        self.report = report


class ServeError(BlueskyZarrError, RuntimeError):
    """The document service cannot start (a bad address, an unreachable proxy)."""


class WriteError(BlueskyZarrError, OSError):
    """Writing to the store failed (in the background writer or at stop)."""


class MissingDependencyError(BlueskyZarrError, ImportError):
    """An optional dependency needed for the data at hand is not installed."""


class ExternalDataError(BlueskyZarrError):
    """Base class of the errors met while reading data that events point to."""


class ExternalFileError(ExternalDataError, OSError):
    """A file that external data lives in cannot be read from where the writer runs."""


class UnknownSpecError(ExternalDataError, LookupError):
    """No handler is registered for a resource's ``spec`` (or stream resource's mimetype)."""


class ExternalIndexError(ExternalDataError, DocumentError, IndexError):
    """A datum or stream_datum points outside the data its file holds."""


class HandlerError(ExternalDataError, RuntimeError):
    """A handler failed to read a datum for a reason other than a file error."""


class TiledError(BlueskyZarrError, RuntimeError):
    """Registering a store with a Tiled server failed."""
