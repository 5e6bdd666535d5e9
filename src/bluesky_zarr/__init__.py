"""bluesky-zarr: write Bluesky runs, live, into Zarr V3 stores shaped like the scan.

>>> RE.subscribe(ZarrWriter("data/"))  # doctest: +SKIP
"""

from ._errors import (
    BlueskyZarrError,
    DataShapeError,
    DataTypeError,
    DocumentError,
    DocumentOrderError,
    OptionError,
    ReplayError,
    ScanIndexError,
    ServeError,
    StorageError,
    StoreExistsError,
    StoreLockedError,
    UnsafeNameError,
    WriteError,
)
from ._export import export
from ._version import __version__
from ._writer import ZarrWriter

__all__ = [
    "BlueskyZarrError",
    "DataShapeError",
    "DataTypeError",
    "DocumentError",
    "DocumentOrderError",
    "OptionError",
    "ReplayError",
    "ScanIndexError",
    "ServeError",
    "StorageError",
    "StoreExistsError",
    "StoreLockedError",
    "UnsafeNameError",
    "WriteError",
    "ZarrWriter",
    "__version__",
    "export",
]
