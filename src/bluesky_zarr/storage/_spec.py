"""Zarr V3 metadata as the specification defines it, written by this package.

The Zarr V3 core specification (and its sharding codec) is the contract
between this writer and every reader: an array's ``zarr.json`` names its
shape, data type, chunk grid, chunk key encoding, fill value and codec
chain; a group's holds its attributes. This module builds those documents
from numpy dtypes and shapes, with no zarr-python object in between, so
the writer does not depend on how one zarr-python release represents them
internally. The text is laid out as zarr-python lays it out (the same keys
in the same order, the same JSON encoder), so the files are byte for byte
the ones zarr-python writes for the same arrays (the tests compare them).

Only the core data types (``bool``, integers, floats, complex numbers) are
spelt here. The extension types (strings, raw bytes, structured records,
dates) and codecs given by users are described by zarr-python through its
public API (:mod:`bluesky_zarr.storage._zarr`).

Consolidated metadata (the root group listing every node, which xarray
reads) is not part of the V3 specification; it is written in the form
zarr-python writes and reads, ``consolidated_metadata`` with ``kind:
"inline"``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import secrets
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: numpy dtype kinds and sizes of the V3 core data types, by name.
_CORE_TYPES: dict[tuple[str, int], str] = {
    ("b", 1): "bool",
    **{("i", n): f"int{8 * n}" for n in (1, 2, 4, 8)},
    **{("u", n): f"uint{8 * n}" for n in (1, 2, 4, 8)},
    **{("f", n): f"float{8 * n}" for n in (2, 4, 8)},
    **{("c", n): f"complex{8 * n}" for n in (8, 16)},
}

#: The sharding codec's index: offsets and lengths as little-endian uint64,
#: then their CRC32C.
INDEX_CODECS: tuple[dict[str, Any], ...] = (
    {"name": "bytes", "configuration": {"endian": "little"}},
    {"name": "crc32c"},
)

#: The default compressor: Blosc LZ4 with bit-shuffle (its ``typesize`` is
#: the item size of the array it compresses; see :func:`codec_for`).
DEFAULT_COMPRESSOR: dict[str, Any] = {
    "name": "blosc",
    "configuration": {"cname": "lz4", "clevel": 5, "shuffle": "bitshuffle", "blocksize": 0},
}


def core_data_type(dtype: np.dtype) -> str | None:
    """The V3 core data type of ``dtype``, or ``None`` for an extension type."""
    if dtype.fields is not None or dtype.subdtype is not None:
        return None
    return _CORE_TYPES.get((dtype.kind, dtype.itemsize))


def _float_json(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return float(value)


def fill_value_json(value: Any, dtype: np.dtype) -> Any:
    """The fill value of a core data type, as the specification encodes it
    (floats: a number, or ``"NaN"``, ``"Infinity"``, ``"-Infinity"``;
    complex numbers: a pair of those)."""
    scalar = np.asarray(value if value is not None else 0).astype(dtype).item()
    if dtype.kind == "b":
        return bool(scalar)
    if dtype.kind in "iu":
        return int(scalar)
    if dtype.kind == "f":
        return _float_json(float(scalar))
    return [_float_json(scalar.real), _float_json(scalar.imag)]


def bytes_codec(dtype: np.dtype) -> dict[str, Any]:
    """The ``bytes`` codec of a core data type: little-endian where the byte
    order matters (zarr-python stores every such array little-endian)."""
    if dtype.itemsize == 1 or dtype.kind == "b":
        return {"name": "bytes"}
    return {"name": "bytes", "configuration": {"endian": "little"}}


def codec_for(template: Mapping[str, Any], dtype: np.dtype) -> dict[str, Any]:
    """A compressor template completed for arrays of ``dtype``: Blosc learns
    its ``typesize`` (the item size, as the sharding of bytes into planes
    needs it), and its keys are ordered as the specification lists them."""
    codec = {key: value for key, value in template.items()}
    if codec.get("name") == "blosc":
        config = dict(codec.get("configuration", {}))
        shuffle = config.get("shuffle")
        if shuffle is None:
            shuffle = "bitshuffle" if dtype.itemsize == 1 else "shuffle"
        codec["configuration"] = {
            "typesize": int(config.get("typesize") or dtype.itemsize),
            "cname": config.get("cname", "zstd"),
            "clevel": int(config.get("clevel", 5)),
            "shuffle": shuffle,
            "blocksize": int(config.get("blocksize", 0)),
        }
    return codec


def sharding_codec(
    chunk_shape: Sequence[int], codecs: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """The ``sharding_indexed`` codec: inner chunks of ``chunk_shape``
    encoded with ``codecs``, the index at the end of the shard."""
    return {
        "name": "sharding_indexed",
        "configuration": {
            "chunk_shape": [int(c) for c in chunk_shape],
            "codecs": [dict(c) for c in codecs],
            "index_codecs": [dict(c) for c in INDEX_CODECS],
            "index_location": "end",
        },
    }


@dataclasses.dataclass(frozen=True)
class ArrayMetadata:
    """One array's ``zarr.json``: the fields of the V3 array metadata.

    ``data_type``, ``fill_value`` and ``codecs`` are in their JSON form;
    ``dtype`` is the numpy dtype values are held in while they are written
    (``object`` for an extension type numpy does not hold directly).
    """

    shape: tuple[int, ...]
    data_type: Any
    chunk_grid: tuple[int, ...]
    fill_value: Any
    codecs: tuple[dict[str, Any], ...]
    attributes: Mapping[str, Any]
    dimension_names: tuple[str, ...] | None
    dtype: np.dtype
    #: The chunk key encoding's separator. This package writes ``.``: each
    #: shard a file in its array's folder (``c.3.0.0.0``), not a folder per
    #: scan index (``c/3/0/0/0``), whose making cost the writer as much as
    #: a third of its time with 512x512 frames on ext4.
    separator: str = "."

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> ArrayMetadata:
        """The metadata an array's ``zarr.json`` holds (V3, regular chunk
        grid, default chunk key encoding); ``ValueError`` for anything else."""
        try:
            if document.get("zarr_format") != 3 or document.get("node_type") != "array":
                raise ValueError("not a Zarr V3 array")
            grid = document["chunk_grid"]
            encoding = document["chunk_key_encoding"]
            if grid.get("name") != "regular" or encoding.get("name") != "default":
                raise ValueError(f"chunk grid {grid!r}, chunk key encoding {encoding!r}")
            data_type = document["data_type"]
            dtype = (
                np.dtype(data_type)
                if isinstance(data_type, str) and data_type in _CORE_TYPES.values()
                else np.dtype(object)
            )
            names = document.get("dimension_names")
            return cls(
                shape=tuple(int(n) for n in document["shape"]),
                data_type=data_type,
                chunk_grid=tuple(int(c) for c in grid["configuration"]["chunk_shape"]),
                fill_value=document["fill_value"],
                codecs=tuple(dict(c) for c in document["codecs"]),
                attributes=dict(document.get("attributes") or {}),
                dimension_names=tuple(names) if names is not None else None,
                dtype=dtype,
                separator=str(encoding.get("configuration", {}).get("separator", "/")),
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"not the metadata of a Zarr V3 array: {err!r}") from None

    def to_dict(self) -> dict[str, Any]:
        """The JSON document, keys in the order zarr-python writes them."""
        document: dict[str, Any] = {
            "shape": list(self.shape),
            "data_type": self.data_type,
            "chunk_grid": {
                "name": "regular",
                "configuration": {"chunk_shape": list(self.chunk_grid)},
            },
            "chunk_key_encoding": {
                "name": "default",
                "configuration": {"separator": self.separator},
            },
            "fill_value": self.fill_value,
            "codecs": [dict(c) for c in self.codecs],
            "attributes": dict(self.attributes),
        }
        if self.dimension_names is not None:
            document["dimension_names"] = list(self.dimension_names)
        document.update(zarr_format=3, node_type="array", storage_transformers=[])
        return document

    def with_shape(self, shape: Sequence[int]) -> ArrayMetadata:
        """The same array with another shape (its chunks unchanged)."""
        return dataclasses.replace(self, shape=tuple(int(n) for n in shape))

    @property
    def sharding(self) -> dict[str, Any] | None:
        """The sharding codec's configuration, if the array is sharded."""
        if len(self.codecs) == 1 and self.codecs[0].get("name") == "sharding_indexed":
            return dict(self.codecs[0]["configuration"])
        return None

    @property
    def chunks(self) -> tuple[int, ...]:
        """The shape of a chunk: the inner chunk of a sharded array."""
        sharding = self.sharding
        if sharding is not None:
            return tuple(int(c) for c in sharding["chunk_shape"])
        return self.chunk_grid

    @property
    def shards(self) -> tuple[int, ...] | None:
        """The shape of a shard, or ``None`` if the array is not sharded."""
        return self.chunk_grid if self.sharding is not None else None


def array_metadata(
    *,
    shape: Sequence[int],
    dtype: np.dtype,
    data_type: Any,
    fill_value: Any,
    serializer: Sequence[Mapping[str, Any]],
    compressors: Sequence[Mapping[str, Any]],
    chunks: Sequence[int],
    shards: Sequence[int] | None,
    dimension_names: Sequence[str] | None,
    attributes: Mapping[str, Any],
    separator: str = ".",
) -> ArrayMetadata:
    """The metadata of an array chunked as ``chunks`` and, if ``shards`` is
    given, sharded as ``shards`` (each a whole number of chunks along every
    dimension). ``serializer`` is the array-to-bytes codec (preceded by any
    array-to-array ones), ``compressors`` the bytes-to-bytes codecs, both
    already completed for the data type; ``separator`` the chunk keys'."""
    shape = tuple(int(n) for n in shape)
    chunks = tuple(int(c) for c in chunks)
    if len(chunks) != len(shape) or any(c < 1 for c in chunks):
        raise ValueError(f"chunks {chunks} do not fit an array of shape {shape}")
    codecs = (*(dict(c) for c in serializer), *(dict(c) for c in compressors))
    grid = chunks
    if shards is not None:
        shards = tuple(int(s) for s in shards)
        if len(shards) != len(shape) or any(s < c or s % c for s, c in zip(shards, chunks)):
            raise ValueError(
                f"shards {shards} are not whole numbers of chunks {chunks} along every "
                f"dimension"
            )
        codecs = (sharding_codec(chunks, codecs),)
        grid = shards
    return ArrayMetadata(
        shape=shape,
        data_type=data_type,
        chunk_grid=grid,
        fill_value=fill_value,
        codecs=codecs,
        attributes=dict(attributes),
        dimension_names=tuple(dimension_names) if dimension_names is not None else None,
        dtype=dtype,
        separator=separator,
    )


def group_metadata(attributes: Mapping[str, Any], *, consolidated: bool = False) -> dict[str, Any]:
    """A group's ``zarr.json``; ``consolidated``: with an (empty) inline
    consolidated metadata, as a group listed in another's consolidated
    metadata, or a root that lists nothing yet, carries it."""
    document: dict[str, Any] = {"attributes": dict(attributes), "zarr_format": 3}
    if consolidated:
        document["consolidated_metadata"] = {
            "kind": "inline",
            "must_understand": False,
            "metadata": {},
        }
    document["node_type"] = "group"
    return document


def dumps(document: Mapping[str, Any], indent: int | None) -> str:
    """JSON text as zarr-python writes ``zarr.json`` (non-finite numbers
    are already spelt as strings where the specification says so)."""
    return json.dumps(document, indent=indent, allow_nan=True)


def compact(document: Mapping[str, Any]) -> str:
    """JSON text without a space: as :func:`dumps`, for the root's
    consolidated metadata (which only programs read)."""
    return json.dumps(document, separators=(",", ":"), allow_nan=True)


def consolidated_root(
    attributes: Mapping[str, Any], members: Mapping[str, str], indent: int | None | str
) -> str:
    """The root group's ``zarr.json`` with the consolidated metadata of every
    node, from each node's text (``members``, by path, as :func:`dumps`
    gave it, or :func:`compact` when ``indent`` is ``"compact"``): only the
    root's own attributes are encoded again. Nodes are listed by depth, then
    by name folded for case (zarr-python's order). (JSON's indentation of a
    value nested at a depth is its text with that depth's indent after each
    line break.)"""
    mark = secrets.token_hex(8)
    paths = sorted(
        members, key=lambda p: (p.count("/"), unicodedata.normalize("NFKC", p).casefold())
    )
    frame = {
        "attributes": dict(attributes),
        "zarr_format": 3,
        "consolidated_metadata": {
            "kind": "inline",
            "must_understand": False,
            "metadata": {path: f"{mark}{n}" for n, path in enumerate(paths)},
        },
        "node_type": "group",
    }
    if indent == "compact":
        text, newline = compact(frame), None
    else:
        assert not isinstance(indent, str)
        text = dumps(frame, indent)
        # Node values sit at depth 3: root, consolidated_metadata, metadata.
        newline = "\n" + " " * (3 * indent) if indent is not None else None
    for n, path in enumerate(paths):
        member = members[path]
        if newline is not None:
            member = member.replace("\n", newline)
        text = text.replace(f'"{mark}{n}"', member, 1)
    return text


@functools.lru_cache(maxsize=64)
def morton_order(shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """The positions of a grid of ``shape`` in compressed Morton (Z) order:
    the order in which zarr-python lays the chunks of a shard out.

    A position's code interleaves the bits of its coordinates, lowest bits
    first and dimensions in order, leaving out a dimension once its size
    needs no more bits; the positions are sorted by code.
    """
    bits = [(n - 1).bit_length() for n in shape]

    def code(position: tuple[int, ...]) -> int:
        value, out_bit = 0, 0
        for bit in range(max(bits, default=0)):
            for dim, width in enumerate(bits):
                if bit < width:
                    value |= ((position[dim] >> bit) & 1) << out_bit
                    out_bit += 1
        return value

    return tuple(sorted(itertools.product(*(range(n) for n in shape)), key=code))
