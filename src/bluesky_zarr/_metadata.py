"""The Zarr metadata of a run's store: made, kept and consolidated in memory.

zarr-python creates a node by checking the store for nodes already there,
then writing its ``zarr.json``; it consolidates by listing the store and
reading every node back. Each step is a round trip to its event-loop thread,
and a run's descriptor, with its half-dozen arrays, paid tens of them. A run's
writer knows every node it makes, so :class:`StoreMetadata` keeps their
metadata in memory, writes each ``zarr.json`` itself when it changes, and
writes the root's consolidated metadata from memory in the same step.

zarr-python still builds the metadata (the same functions ``create_array``
uses, so the documents are the ones it writes: the tests compare them), and
opens and reads the store.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import secrets
import shutil
import threading
import unicodedata
from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.codecs.sharding import ShardingCodec, ShardingCodecIndexLocation
from zarr.core.array import (
    AsyncArray,
    _parse_chunk_encoding_v3,
    _parse_chunk_key_encoding,
)
from zarr.core.array_spec import ArrayConfigParams, parse_array_config
from zarr.core.buffer import default_buffer_prototype
from zarr.core.chunk_grids import RegularChunkGrid, _auto_partition
from zarr.core.dtype import parse_dtype
from zarr.core.dtype.common import HasItemSize
from zarr.core.group import AsyncGroup, ConsolidatedMetadata, GroupMetadata
from zarr.core.metadata import ArrayV3Metadata
from zarr.core.sync import sync
from zarr.storage._common import StorePath

from ._storage import GuardedLocalStore

logger = logging.getLogger(__name__)

#: Largest array (elements) that metadata attributes hold in full.
MAX_ATTR_ARRAY = 10_000

#: How every array of a run is configured when opened for writing.
ARRAY_CONFIG: ArrayConfigParams = {"write_empty_chunks": True}


def json_safe(value: Any) -> Any:
    """A copy of ``value`` that JSON (and so Zarr attributes) can hold."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        if value.size > MAX_ATTR_ARRAY:
            # Metadata, not data: a frame that a device reports in its
            # configuration would bloat every metadata read of the store.
            return f"<array shape={value.shape} dtype={value.dtype} not stored in metadata>"
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        item = value.item()
        # float128 and the like have no Python equivalent: item() returns them as is.
        return repr(value) if isinstance(item, np.generic) else json_safe(item)
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if value is None or isinstance(value, (str, bool, int)):
        return value
    return repr(value)


def array_metadata(
    *,
    shape: tuple[int, ...],
    dtype: Any,
    chunks: tuple[int, ...],
    shards: tuple[int, ...] | None,
    fill_value: Any,
    dimension_names: list[str],
    attributes: dict[str, Any],
    compressors: Any,
    serializer: Any = "auto",
) -> ArrayV3Metadata:
    """The metadata ``zarr.create_array`` writes for these arguments (Zarr V3),
    made without touching a store."""
    zdtype = _zarr_dtype(dtype)
    shard_shape, chunk_shape = _auto_partition(
        array_shape=shape,
        shard_shape=shards,
        chunk_shape=chunks,
        item_size=zdtype.item_size if isinstance(zdtype, HasItemSize) else 1,
    )
    array_array, array_bytes, bytes_bytes = _parse_chunk_encoding_v3(
        compressors=compressors, filters="auto", serializer=serializer, dtype=zdtype
    )
    codecs: tuple[Any, ...] = (*array_array, array_bytes, *bytes_bytes)
    if shard_shape is not None:
        sharding = ShardingCodec(
            chunk_shape=chunk_shape, codecs=codecs, index_location=ShardingCodecIndexLocation.end
        )
        sharding.validate(
            shape=chunk_shape, dtype=zdtype, chunk_grid=RegularChunkGrid(chunk_shape=shard_shape)
        )
        codecs, chunk_shape = (sharding,), shard_shape
    return AsyncArray._create_metadata_v3(
        shape=shape,
        dtype=zdtype,
        fill_value=fill_value,
        chunk_shape=chunk_shape,
        chunk_key_encoding=_parse_chunk_key_encoding(None, zarr_format=3),
        codecs=codecs,
        dimension_names=dimension_names,
        attributes=attributes,
    )


@functools.lru_cache(maxsize=256)
def _zarr_dtype(dtype: Any) -> Any:
    """zarr-python's data type for ``dtype`` (its lookup is slow; the
    result is immutable, so it is looked up once per dtype)."""
    return parse_dtype(dtype, zarr_format=3)


class StoreMetadata:
    """Every node's metadata of one run's store, and the writes that keep the
    store's ``zarr.json`` files equal to it.

    A change writes the node's own ``zarr.json`` at once; :meth:`consolidate`,
    called once after a batch of changes (a descriptor's arrays, a growth),
    then writes the root's, which holds the consolidated metadata of every
    node (what xarray reads): the root never lists a node before its own
    ``zarr.json`` is written. Changes are made one at a time (a lock); the
    nodes handed out are zarr-python objects over the new metadata, and the
    caller keeps the newest one.
    """

    def __init__(self, store: Store, attributes: Mapping[str, Any]) -> None:
        self.store = store
        self.attributes: dict[str, Any] = dict(attributes)
        self.lock = threading.RLock()
        self._nodes: dict[str, ArrayV3Metadata | GroupMetadata] = {}
        #: Each node's JSON as the root's consolidated metadata holds it.
        self._member_texts: dict[str, str] = {}
        self.root = self._group("", GroupMetadata(attributes=self.attributes))

    # ------------------------------------------------------------------ nodes
    def add_group(self, path: str, attributes: Mapping[str, Any]) -> zarr.Group:
        """Create a group below the root (not consolidated until :meth:`consolidate`)."""
        metadata = GroupMetadata(attributes=dict(attributes))
        with self.lock:
            self._save(path, metadata)
            return self._group(path, metadata)

    def add_array(self, path: str, **arguments: Any) -> zarr.Array:
        """Create an array (see :func:`array_metadata` for the arguments), or
        make one anew that holds no chunk yet."""
        metadata = array_metadata(**arguments)
        with self.lock:
            self._save(path, metadata)
            return self._array(path, metadata)

    def set_attributes(self, path: str, attributes: Mapping[str, Any]) -> zarr.Group:
        """Update attributes of the group at ``path``; returns the group."""
        with self.lock:
            metadata = self._nodes[path]
            assert isinstance(metadata, GroupMetadata)
            metadata = dataclasses.replace(
                metadata, attributes={**metadata.attributes, **attributes}
            )
            self._save(path, metadata)
            return self._group(path, metadata)

    def resize(self, array: zarr.Array, shape: tuple[int, ...]) -> zarr.Array:
        """Give ``array`` a new shape (growing only: no chunk is deleted)."""
        with self.lock:
            metadata = self._nodes[array.path]
            assert isinstance(metadata, ArrayV3Metadata)
            metadata = metadata.update_shape(shape)
            self._save(array.path, metadata)
            return self._array(array.path, metadata)

    def discard(self, path: str) -> None:
        """Forget the node at ``path`` and every node below it, and delete
        them from the store: what a stream whose making failed had made. The
        deletion is best effort (the caller raises why the stream failed)."""
        with self.lock:
            for key in [k for k in self._nodes if k == path or k.startswith(path + "/")]:
                del self._nodes[key]
                del self._member_texts[key]
            try:
                if isinstance(self.store, GuardedLocalStore):
                    shutil.rmtree(self.store.root / path, ignore_errors=True)
                else:
                    sync(self.store.delete_dir(path))
            except Exception as err:  # noqa: BLE001 - logged; the cause is raised
                logger.warning("bluesky-zarr: cannot delete %s from the store: %r", path, err)

    def consolidate(self, attributes: Mapping[str, Any] | None = None) -> None:
        """Write the root ``zarr.json``: its attributes (updated with
        ``attributes``) and the consolidated metadata of every node."""
        with self.lock:
            self.attributes.update(attributes or {})
            if not self.store.supports_consolidated_metadata:
                # Such a store (an Icechunk session) serves every node's
                # metadata itself: the root holds its attributes only.
                self._write("zarr.json", GroupMetadata(attributes=self.attributes))
                return
            indent = zarr.config.get("json_indent")
            if indent is not None and not isinstance(indent, int):
                self._write("zarr.json", self.consolidated_root())
                return
            self._put("zarr.json", self._root_text(indent).encode())

    def consolidated_root(self) -> GroupMetadata:
        """The root's metadata as zarr-python builds it (nested consolidated metadata)."""
        members: dict[str, Any] = {
            path: _as_member(metadata) for path, metadata in self._nodes.items()
        }
        ConsolidatedMetadata._flat_to_nested(members)
        return GroupMetadata(
            attributes=self.attributes,
            consolidated_metadata=ConsolidatedMetadata(metadata=members),
        )

    def _root_text(self, indent: int | None) -> str:
        """The text zarr-python writes for :meth:`consolidated_root`, from each
        node's text kept when it was saved: only the root's own attributes
        are encoded again. (JSON's indentation of a value nested at a depth is
        its text with that depth's indent after each line break.)"""
        mark = secrets.token_hex(8)
        paths = sorted(
            self._nodes,
            key=lambda p: (p.count("/"), unicodedata.normalize("NFKC", p).casefold()),
        )
        frame = {
            "attributes": self.attributes,
            "zarr_format": 3,
            "consolidated_metadata": {
                "kind": "inline",
                "must_understand": False,
                "metadata": {path: f"{mark}{n}" for n, path in enumerate(paths)},
            },
            "node_type": "group",
        }
        text = json.dumps(frame, indent=indent, allow_nan=True)
        # Node values sit at depth 3: root, consolidated_metadata, metadata.
        newline = "\n" + " " * (3 * indent) if indent is not None else None
        for n, path in enumerate(paths):
            member = self._member_texts[path]
            if newline is not None:
                member = member.replace("\n", newline)
            text = text.replace(f'"{mark}{n}"', member, 1)
        return text

    # -------------------------------------------------------------- internals
    def _save(self, path: str, metadata: ArrayV3Metadata | GroupMetadata) -> None:
        indent = zarr.config.get("json_indent")
        own = json.dumps(metadata.to_dict(), indent=indent, allow_nan=True)
        self._put(f"{path}/zarr.json", own.encode())
        self._nodes[path] = metadata
        # How the node reads inside the root's consolidated metadata (a group
        # says that it holds nothing further: its children are listed too).
        self._member_texts[path] = (
            json.dumps(_as_member(metadata).to_dict(), indent=indent, allow_nan=True)
            if isinstance(metadata, GroupMetadata)
            else own
        )

    def _write(self, key: str, metadata: ArrayV3Metadata | GroupMetadata) -> None:
        self._put(key, metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes())

    def _put(self, key: str, value: bytes) -> None:
        if isinstance(self.store, GuardedLocalStore):
            # No event loop: one file written and renamed into place.
            self.store.write_parts(key, [value])
        else:
            sync(self.store.set(key, default_buffer_prototype().buffer.from_bytes(value)))

    def _group(self, path: str, metadata: GroupMetadata) -> zarr.Group:
        return zarr.Group(AsyncGroup(metadata=metadata, store_path=StorePath(self.store, path)))

    def _array(self, path: str, metadata: ArrayV3Metadata) -> zarr.Array:
        return zarr.Array(
            AsyncArray(
                metadata=metadata,
                store_path=StorePath(self.store, path),
                config=parse_array_config(ARRAY_CONFIG),
            )
        )


def _as_member(metadata: ArrayV3Metadata | GroupMetadata) -> ArrayV3Metadata | GroupMetadata:
    """A node as consolidated metadata lists it: a group with (empty)
    consolidated metadata of its own."""
    if isinstance(metadata, GroupMetadata):
        return dataclasses.replace(
            metadata, consolidated_metadata=ConsolidatedMetadata(metadata={})
        )
    return metadata


def root_metadata(attributes: dict[str, Any]) -> bytes:
    """A root group's ``zarr.json`` with ``attributes`` and (empty) consolidated metadata."""
    metadata = GroupMetadata(
        attributes=attributes, consolidated_metadata=ConsolidatedMetadata(metadata={})
    )
    return metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()
