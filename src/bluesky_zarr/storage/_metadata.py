"""The Zarr metadata of a run's store: made, kept and consolidated in memory.

zarr-python creates a node by checking the store for nodes already there,
then writing its ``zarr.json``; it consolidates by listing the store and
reading every node back. Each step is a round trip to its event-loop thread,
and a run's descriptor, with its half-dozen arrays, paid tens of them. A run's
writer knows every node it makes, so :class:`StoreMetadata` keeps their
metadata in memory, writes each ``zarr.json`` itself when it changes, and
writes the root's consolidated metadata from memory in the same step.

The documents are the Zarr V3 specification's (:mod:`._spec`); the nodes
handed out (:class:`ArrayNode`, :class:`GroupNode`) are this package's own,
and give a zarr-python array over the same metadata only where zarr-python
writes (:mod:`._zarr`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import DataTypeError
from . import _spec, _zarr

logger = logging.getLogger(__name__)

def check_storable(key: str, dtype: np.dtype, fill_value: Any) -> None:
    """Refuse a data key's dtype that no Zarr V3 array holds with
    ``fill_value`` (e.g. ``float128``, which no Zarr data type holds), as
    zarr-python tells. Text (numpy kinds ``O`` and ``U``) is stored as Zarr
    strings whatever its numpy dtype, so it is always accepted."""
    if dtype.kind in "OU":
        return
    try:
        _zarr.check_data_type(dtype, fill_value)
    except (TypeError, ValueError) as err:
        raise DataTypeError(
            f"data key {key!r}: dtype_numpy {dtype.str!r} ({dtype}) cannot be stored "
            f"in a Zarr V3 array: {err}"
        ) from None


def _compressor_templates(compressors: Any) -> tuple[Any, ...]:
    """The compressors as a tuple: JSON templates (dicts) and zarr codecs."""
    if compressors is None:
        return ()
    if isinstance(compressors, Mapping) or not isinstance(compressors, Sequence):
        return (compressors,)
    return tuple(compressors)


def array_metadata(
    *,
    shape: Sequence[int],
    dtype: Any,
    chunks: Sequence[int],
    shards: Sequence[int] | None,
    fill_value: Any,
    dimension_names: Sequence[str] | None,
    attributes: Mapping[str, Any],
    compressors: Any,
    serializer: Mapping[str, Any] | None = None,
    separator: str = ".",
) -> _spec.ArrayMetadata:
    """The Zarr V3 metadata of an array: ``dtype`` a numpy dtype (or ``str``
    for variable-length strings), ``compressors`` a sequence of compressor
    templates (:data:`._spec.DEFAULT_COMPRESSOR`) or zarr codecs (or one of
    them, or ``None``), ``shards`` ``None`` for an array that is not sharded,
    ``serializer`` the ``bytes`` codec when it is not the default one (a
    detector file's byte order, for virtual chunks).

    Core data types with this package's compressors are spelt by
    :mod:`._spec`; other data types and a user's codecs as zarr-python
    describes them (:func:`._zarr.described_by_zarr`).
    """
    templates = _compressor_templates(compressors)
    numpy_dtype = np.dtype(object) if dtype is str else np.dtype(dtype)
    data_type = None if dtype is str else _spec.core_data_type(numpy_dtype)
    if data_type is not None and all(isinstance(c, Mapping) for c in templates):
        fill = _spec.fill_value_json(fill_value, numpy_dtype)
        serializers: tuple[dict[str, Any], ...] = (
            (dict(serializer),) if serializer is not None else (_spec.bytes_codec(numpy_dtype),)
        )
        codecs = tuple(_spec.codec_for(c, numpy_dtype) for c in templates)
    else:
        data_type, fill, described = _zarr.described_by_zarr(dtype, fill_value, templates)
        # zarr-python lists the serializer (after any array-to-array codecs)
        # and then the compressors it was given.
        if serializer is not None:
            raise ValueError("a serializer is given only for a core data type")
        serializers = described[: len(described) - len(templates)]
        codecs = described[len(described) - len(templates) :]
    return _spec.array_metadata(
        shape=shape,
        dtype=numpy_dtype,
        data_type=data_type,
        fill_value=fill,
        serializer=serializers,
        compressors=codecs,
        chunks=chunks,
        shards=shards,
        dimension_names=dimension_names,
        attributes=attributes,
        separator=separator,
    )


class GroupNode:
    """A group of a run's store: its path and attributes."""

    def __init__(self, store: Any, path: str, attributes: Mapping[str, Any]) -> None:
        self.store = store
        self.path = path
        self.attrs: Mapping[str, Any] = dict(attributes)


class ArrayNode:
    """An array of a run's store, as its metadata says: the writer's own
    description (path, shape, dtype, chunks, shards, fill value), and a
    zarr-python array over it for the writes that go through zarr-python
    (indexing an :class:`ArrayNode` reads and writes through that array)."""

    def __init__(self, store: Any, path: str, metadata: _spec.ArrayMetadata) -> None:
        self.store = store
        self.path = path
        self.metadata = metadata
        self._zarr_array: Any = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.metadata.shape

    @property
    def dtype(self) -> np.dtype:
        return self.metadata.dtype

    @property
    def chunks(self) -> tuple[int, ...]:
        return self.metadata.chunks

    @property
    def shards(self) -> tuple[int, ...] | None:
        return self.metadata.shards

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def attrs(self) -> Mapping[str, Any]:
        return self.metadata.attributes

    @property
    def local_files(self) -> Any:
        """The package's file writer of a local store (None for any other
        store: object storage, an Icechunk session, a user's wrapper)."""
        return getattr(self.store, "files", None) if _zarr.is_local_files(self.store) else None

    def zarr_array(self) -> Any:
        """A zarr-python array over this metadata (made once, without reading)."""
        if self._zarr_array is None:
            self._zarr_array = _zarr.array_over(self.store, self.path, self.metadata.to_dict())
        return self._zarr_array

    def __getitem__(self, region: Any) -> Any:
        return self.zarr_array()[region]

    def __setitem__(self, region: Any, values: Any) -> None:
        self.zarr_array()[region] = values


class StoreMetadata:
    """Every node's metadata of one run's store, and the writes that keep the
    store's ``zarr.json`` files equal to it.

    A change writes the node's own ``zarr.json`` at once; :meth:`consolidate`,
    called once after a batch of changes (a descriptor's arrays, a growth),
    then writes the root's, which holds the consolidated metadata of every
    node (what xarray reads): the root never lists a node before its own
    ``zarr.json`` is written. Changes are made one at a time (a lock); the
    nodes handed out describe the new metadata, and the caller keeps the
    newest one.
    """

    def __init__(self, store: Any, attributes: Mapping[str, Any]) -> None:
        self.store = store
        self.attributes: dict[str, Any] = dict(attributes)
        self.lock = threading.RLock()
        self._nodes: dict[str, dict[str, Any]] = {}
        #: Each node's JSON as the root's consolidated metadata holds it.
        self._member_texts: dict[str, str] = {}
        self._arrays: dict[str, _spec.ArrayMetadata] = {}
        self.root = GroupNode(store, "", self.attributes)
        #: The chunk keys' separator: ``.`` (a shard is a file in its array's
        #: folder), but ``/`` in a store that parses keys itself and knows
        #: no other (an Icechunk session, which also keeps no consolidated
        #: metadata).
        self.separator = "." if store.supports_consolidated_metadata else "/"

    # ------------------------------------------------------------------ nodes
    def add_group(self, path: str, attributes: Mapping[str, Any]) -> GroupNode:
        """Create a group below the root (not consolidated until :meth:`consolidate`)."""
        with self.lock:
            self._save(path, _spec.group_metadata(attributes))
            return GroupNode(self.store, path, attributes)

    def add_array(self, path: str, **arguments: Any) -> ArrayNode:
        """Create an array (see :func:`array_metadata` for the arguments), or
        make one anew that holds no chunk yet."""
        metadata = array_metadata(**{"separator": self.separator, **arguments})
        with self.lock:
            self._save(path, metadata.to_dict())
            self._arrays[path] = metadata
            return ArrayNode(self.store, path, metadata)

    def set_attributes(self, path: str, attributes: Mapping[str, Any]) -> GroupNode:
        """Update attributes of the group at ``path``; returns the group."""
        with self.lock:
            document = self._nodes[path]
            if document.get("node_type") != "group":
                raise TypeError(f"{path!r} is not a group")
            merged = {**document["attributes"], **attributes}
            self._save(path, _spec.group_metadata(merged))
            return GroupNode(self.store, path, merged)

    def set_array_attributes(self, array: ArrayNode, attributes: Mapping[str, Any]) -> ArrayNode:
        """Update attributes of ``array``; returns the array over the new metadata."""
        with self.lock:
            current = self._arrays[array.path]
            metadata = dataclasses.replace(
                current, attributes={**current.attributes, **attributes}
            )
            self._save(array.path, metadata.to_dict())
            self._arrays[array.path] = metadata
            return ArrayNode(self.store, array.path, metadata)

    def resize(self, array: ArrayNode, shape: tuple[int, ...]) -> ArrayNode:
        """Give ``array`` a new shape (growing only: no chunk is deleted)."""
        with self.lock:
            metadata = self._arrays[array.path].with_shape(shape)
            self._save(array.path, metadata.to_dict())
            self._arrays[array.path] = metadata
            return ArrayNode(self.store, array.path, metadata)

    def discard(self, path: str) -> None:
        """Forget the node at ``path`` and every node below it, and delete
        them from the store: what a stream whose making failed had made. The
        deletion is best effort (the caller raises why the stream failed)."""
        with self.lock:
            for key in [k for k in self._nodes if k == path or k.startswith(path + "/")]:
                del self._nodes[key]
                del self._member_texts[key]
                self._arrays.pop(key, None)
            try:
                if _zarr.is_local_files(self.store):
                    shutil.rmtree(Path(self.store.files.root) / path, ignore_errors=True)
                else:
                    _zarr.delete_dir(self.store, path)
            except Exception as err:  # noqa: BLE001 - logged; the cause is raised
                logger.warning("bluesky-zarr: cannot delete %s from the store: %r", path, err)

    def consolidate(self, attributes: Mapping[str, Any] | None = None) -> None:
        """Write the root ``zarr.json``: its attributes (updated with
        ``attributes``) and the consolidated metadata of every node."""
        with self.lock:
            self.attributes.update(attributes or {})
            self.root = GroupNode(self.store, "", self.attributes)
            indent = _zarr.json_indent()
            if not self.store.supports_consolidated_metadata:
                # Such a store (an Icechunk session) serves every node's
                # metadata itself: the root holds its attributes only.
                text = _spec.dumps(_spec.group_metadata(self.attributes), indent)
            else:
                # Without indentation: the root lists every node (hundreds of
                # kilobytes for a run with a large baseline) and is written
                # again at each consolidation; only programs read it. Each
                # node's own zarr.json stays as zarr-python writes it.
                text = _spec.consolidated_root(self.attributes, self._member_texts, "compact")
            self._put("zarr.json", text.encode())

    def consolidated_root(self) -> dict[str, Any]:
        """The root's metadata with every node's, as a JSON document."""
        import json

        return dict(
            json.loads(_spec.consolidated_root(self.attributes, self._member_texts, "compact"))
        )

    # -------------------------------------------------------------- internals
    def _save(self, path: str, document: dict[str, Any]) -> None:
        indent = _zarr.json_indent()
        own = _spec.dumps(document, indent)
        self._put(f"{path}/zarr.json", own.encode())
        self._nodes[path] = document
        # How the node reads inside the root's consolidated metadata (a group
        # says that it holds nothing further: its children are listed too).
        self._member_texts[path] = _spec.compact(
            _spec.group_metadata(document["attributes"], consolidated=True)
            if document.get("node_type") == "group"
            else document
        )

    def _put(self, key: str, value: bytes) -> None:
        if _zarr.is_local_files(self.store):
            # No event loop: one file written and renamed into place.
            self.store.files.write_parts(key, [value])
        else:
            _zarr.put(self.store, key, value)


def root_metadata(attributes: dict[str, Any]) -> bytes:
    """A root group's ``zarr.json`` with ``attributes`` and (empty) consolidated metadata."""
    document = _spec.group_metadata(attributes, consolidated=True)
    return _spec.dumps(document, _zarr.json_indent()).encode()
