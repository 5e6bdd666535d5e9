"""The catalog floor: reading finished or live stores.

Listing the runs of a directory or bucket (``_ls``), describing one
(``_inspect``), registering runs with Tiled (``_tiled``), opening a run
written as an Icechunk repository (``_virtual``).
"""

from ._inspect import describe_store, format_description
from ._ls import (
    DEFAULT_FIELDS,
    count_written_points,
    format_listing,
    list_stores,
    run_attributes,
    summarise_root,
)
from ._tiled import (
    DEFAULT_TILED_TIMEOUT,
    TiledRegistrar,
    check_tiled_option,
    connect,
    register_store,
)
from ._virtual import open_virtual

__all__ = [
    "DEFAULT_FIELDS",
    "DEFAULT_TILED_TIMEOUT",
    "TiledRegistrar",
    "check_tiled_option",
    "connect",
    "count_written_points",
    "describe_store",
    "format_description",
    "format_listing",
    "list_stores",
    "open_virtual",
    "register_store",
    "run_attributes",
    "summarise_root",
]
