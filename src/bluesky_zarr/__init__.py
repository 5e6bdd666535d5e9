"""bluesky-zarr: write Bluesky runs, live, into Zarr V3 stores shaped like the scan.

>>> RE.subscribe(ZarrWriter("data/"))  # doctest: +SKIP
"""

from ._errors import (
    BlueskyZarrError,
    DataShapeError,
    DataTypeError,
    DocumentError,
    DocumentOrderError,
    ExternalDataError,
    ExternalFileError,
    ExternalIndexError,
    HandlerError,
    MissingDependencyError,
    NotAStoreError,
    OptionError,
    ReplayError,
    ReplayInterrupted,
    ScanIndexError,
    ServeError,
    StorageError,
    StoreExistsError,
    StoreLockedError,
    TiledError,
    UnknownSpecError,
    UnsafeNameError,
    WriteError,
)
from ._version import __version__
from .catalog._virtual import open_virtual
from .external._data import NpySequenceHandler
from .feeds._export import export
from .storage._icechunk import virtual_store
from .write._writer import ZarrWriter

__all__ = [
    "BlueskyZarrError",
    "DataShapeError",
    "DataTypeError",
    "DocumentError",
    "DocumentOrderError",
    "ExternalDataError",
    "ExternalFileError",
    "ExternalIndexError",
    "HandlerError",
    "MissingDependencyError",
    "NotAStoreError",
    "NpySequenceHandler",
    "OptionError",
    "ReplayError",
    "ReplayInterrupted",
    "ScanIndexError",
    "ServeError",
    "StorageError",
    "StoreExistsError",
    "StoreLockedError",
    "TiledError",
    "UnknownSpecError",
    "UnsafeNameError",
    "WriteError",
    "ZarrWriter",
    "__version__",
    "export",
    "open_virtual",
    "virtual_store",
]
