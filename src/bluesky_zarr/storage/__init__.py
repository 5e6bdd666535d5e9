"""The storage floor: where bytes go.

Roots behind one interface (``_roots``: a local directory, an ``s3://``
bucket; ``_icechunk``: an Icechunk repository) that make each run's store
(:class:`RunStore`) and lock it (``_lock``); a local store's files written
whole, around the page cache (``_files``); shards assembled and written as
the Zarr V3 sharding codec specifies (``_shards``); metadata written from the
V3 specification (``_spec``, ``_metadata``); what a finished store records
(``_records``, ``_amend``); nodes moved as a whole (``_nodes``); and the one
module that uses zarr-python (``_zarr``).
"""

from ._blosc import allow_pool
from ._files import aligned_empty, limit_staging
from ._icechunk import is_repository, load_icechunk, metadata_store, read_root, virtual_store
from ._lock import StoreLock
from ._metadata import ArrayNode, GroupNode, StoreMetadata, check_storable, root_metadata
from ._nodes import delete_node, move_node, reader_of
from ._records import is_repository_listing, run_finished
from ._resolve import resolve_root
from ._roots import REMOTE_SCHEMES, Root, RunStore, is_url, open_store
from ._shards import UnitIO
from ._spec import DEFAULT_COMPRESSOR
from ._zarr import (
    array_over,
    chunk_key,
    delete_key,
    is_array,
    is_bytes_codec,
    local_store,
    open_array,
    open_group,
)

__all__ = [
    "ArrayNode",
    "DEFAULT_COMPRESSOR",
    "GroupNode",
    "REMOTE_SCHEMES",
    "Root",
    "RunStore",
    "StoreLock",
    "StoreMetadata",
    "UnitIO",
    "load_icechunk",
    "aligned_empty",
    "array_over",
    "check_storable",
    "chunk_key",
    "delete_key",
    "delete_node",
    "is_array",
    "is_bytes_codec",
    "is_repository",
    "is_repository_listing",
    "is_url",
    "limit_staging",
    "allow_pool",
    "local_store",
    "metadata_store",
    "move_node",
    "open_array",
    "open_group",
    "open_store",
    "read_root",
    "reader_of",
    "resolve_root",
    "root_metadata",
    "run_finished",
    "virtual_store",
]
