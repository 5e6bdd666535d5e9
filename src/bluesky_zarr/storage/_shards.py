"""Encoding and writing whole write units, byte for byte as zarr-python does.

A block of the chunk buffer covers whole write units (shards, or chunks when
an array is not sharded). Written through ``array[region] = data``, each unit
costs zarr-python's general path: asyncio tasks, thread hand-offs, chunk
buffers and copies, most of the worker's time. A complete unit needs none of
it: :class:`DirectWriter` encodes each chunk with the codecs the array's
metadata declares (numcodecs releases the GIL while compressing), assembles a
shard as the Zarr V3 sharding codec specifies (chunks in the order
zarr-python writes them, then the index of offsets and lengths with its
CRC32C), and writes the file in one call to a temporary name, renamed into
place. The files are the ones zarr-python writes for the same data (the tests
compare them byte for byte). Arrays whose codec chain this module does not
reproduce keep zarr-python's path (:meth:`DirectWriter.of` returns ``None``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from ._blosc import Blosc
from ._metadata import ArrayNode
from ._spec import INDEX_CODECS, morton_order

#: Index entry of a chunk absent from a shard (the sharding codec's marker).
_ABSENT = 2**64 - 1


class _Encoder:
    """One chunk's bytes: the ``bytes`` codec, then optionally Blosc (the
    codecs as the array's metadata lists them)."""

    def __init__(self, dtype: np.dtype, codecs: Sequence[Mapping[str, Any]]) -> None:
        self.dtype = dtype
        self.blosc: Any = None
        if not codecs or codecs[0].get("name") != "bytes":
            raise NotImplementedError("the first codec is not 'bytes'")
        endian = codecs[0].get("configuration", {}).get("endian")
        held_little = dtype.byteorder == "<" or (dtype.byteorder in "=|" and np.little_endian)
        # Bytes are swapped where the codec stores another order than memory holds.
        self.swap = (
            dtype.itemsize > 1 and endian is not None and (endian == "little") != held_little
        )
        for codec in codecs[1:]:
            if codec.get("name") == "blosc" and self.blosc is None:
                config = codec["configuration"]
                self.blosc = Blosc(
                    config["cname"],
                    config["clevel"],
                    config["shuffle"],
                    config["blocksize"],
                    config["typesize"],
                )
            else:
                raise NotImplementedError(f"codec {codec!r}")

    def decode(self, encoded: Any, out: np.ndarray) -> None:
        """Decode into ``out`` the chunk that :meth:`__call__` encoded."""
        target = out if out.flags.c_contiguous else np.empty_like(out)
        raw = target.reshape(-1).view(np.uint8)
        if self.blosc is None:
            raw[:] = np.frombuffer(encoded, dtype=np.uint8)
        else:
            self.blosc.decode(encoded, raw)
        if self.swap:
            target.byteswap(inplace=True)
        if target is not out:
            out[...] = target

    def __call__(self, chunk: np.ndarray) -> Any:
        """The chunk's bytes: a view of it, or (compressed) a view of a pooled
        buffer, given back with :meth:`release` after the write."""
        data = np.ascontiguousarray(chunk)
        if self.swap:
            data = data.byteswap()
        raw = data.reshape(-1).view(np.uint8)
        if self.blosc is None:
            return raw
        return self.blosc.encode(raw)

    def release(self, parts: Sequence[Any]) -> None:
        """Give back the pooled buffers of parts this encoder made, once written."""
        if self.blosc is not None:
            for part in parts:
                self.blosc.release(part)


def _contiguous_part(part: tuple[int, ...], whole: tuple[int, ...]) -> bool:
    """Whether a block of shape ``part`` of a C-ordered array of shape
    ``whole`` is one contiguous range of its memory."""
    axes = list(zip(part, whole))
    while axes and axes[0][0] == 1:
        axes.pop(0)
    return all(p == w for p, w in axes[1:])


class DirectWriter:
    """Writes whole write units of one array straight to its directory."""

    def __init__(
        self,
        files: Any,
        path: str,
        unit: tuple[int, ...],
        fill: Any,
        encoder: _Encoder,
        sharding: Mapping[str, Any] | None,
        separator: str = ".",
    ) -> None:
        #: The store's file writer (:class:`bluesky_zarr.storage._files.LocalFiles`).
        self.files = files
        self.path = path
        self.unit = unit
        self.fill = fill
        self.encode = encoder
        self.sharding = sharding
        #: The chunk key encoding's separator (``c.1.0`` or ``c/1/0``).
        self.separator = separator
        if sharding is not None:
            self.chunk = tuple(int(c) for c in sharding["chunk_shape"])
            self.per_shard = tuple(u // c for u, c in zip(unit, self.chunk))
            self.order = morton_order(self.per_shard)
            self.index_at_start = sharding.get("index_location", "end") == "start"
        chunk = self.chunk if sharding is not None else unit
        #: Copies of a unit made while it is encoded and written: none when
        #: its chunks are stored as they lie in memory (no compressor, no byte
        #: swap, each chunk a contiguous part of the unit), else one (the
        #: encoded chunks, held until the file is written).
        self.copies = 0 if (
            encoder.blosc is None and not encoder.swap and _contiguous_part(chunk, unit)
        ) else 1

    @classmethod
    def of(cls, array: ArrayNode) -> DirectWriter | None:
        """A direct writer for ``array``, or ``None`` where zarr-python must write."""
        files = array.local_files
        if files is None:
            return None
        dtype = np.dtype(array.dtype)
        if dtype.kind not in "biufc" or not array.shape:
            return None
        metadata = array.metadata
        if metadata.separator not in (".", "/"):
            return None
        codecs: list[Mapping[str, Any]] = list(metadata.codecs)
        sharding = metadata.sharding
        try:
            if sharding is not None:
                if [dict(c) for c in sharding.get("index_codecs", ())] != list(INDEX_CODECS):
                    return None
                codecs = list(sharding["codecs"])
            encoder = _Encoder(dtype, codecs)
        except NotImplementedError:
            return None
        unit = tuple(array.shards or array.chunks)
        # Every chunk is written (zarr-python's write_empty_chunks), as the
        # writer's arrays are configured.
        fill = np.asarray(_fill_value(metadata.fill_value, dtype), dtype=dtype)
        return cls(files, array.path, unit, fill, encoder, sharding, metadata.separator)

    def key(self, index: tuple[int, ...]) -> str:
        """The store key of the unit (shard, else chunk) at ``index``."""
        return f"{self.path}/c{self.separator}{self.separator.join(str(i) for i in index)}"

    def write(
        self,
        origin: tuple[int, ...],
        data: np.ndarray,
        shape: tuple[int, ...],
        encoded: Mapping[tuple[int, ...], Any] | None = None,
    ) -> None:
        """Write ``data``, placed at ``origin`` and spanning whole write units
        (or ending at the edge of the array, whose shape is ``shape``), one
        file per unit. ``encoded`` holds chunks already encoded (see
        :meth:`encode_point`), by position in the one shard ``data`` spans."""
        origin = tuple(origin) + (0,) * (data.ndim - len(origin))
        # The array's own dtype, byte order included: its bytes are what is encoded.
        data = data.astype(self.encode.dtype, copy=False)
        ranges = [
            range(o // u, -(-(o + n) // u)) for o, n, u in zip(origin, data.shape, self.unit)
        ]
        for key in itertools.product(*ranges):
            self._write_unit(key, self._unit_data(key, origin, data), shape, encoded)

    def encodes_points_apart(self, n_scan: int, frame_shape: tuple[int, ...]) -> bool:
        """Whether each point's chunks can be encoded on their own, as the
        point arrives: a compressed shard whose chunks each hold one point
        and whose frames fill it exactly (no padding at a frame's edge)."""
        return (
            self.sharding is not None
            and self.encode.blosc is not None
            and all(c == 1 for c in self.chunk[:n_scan])
            and tuple(self.unit[n_scan:]) == tuple(frame_shape)
        )

    def encode_point(
        self, block: np.ndarray, point: tuple[int, ...]
    ) -> dict[tuple[int, ...], Any]:
        """The encoded chunks of one point of ``block`` (the scan part of the
        image of one shard, from its first point), by position in the shard;
        see :meth:`encodes_points_apart`."""
        data = block[point].astype(self.encode.dtype, copy=False)
        frame_chunks = self.per_shard[len(point) :]
        chunk = self.chunk[len(point) :]
        out = {}
        for position in itertools.product(*(range(n) for n in frame_chunks)):
            part = data[tuple(slice(p * c, (p + 1) * c) for p, c in zip(position, chunk))]
            out[point + position] = self.encode(part)
        return out

    def read(
        self, origin: tuple[int, ...], size: tuple[int, ...], out: np.ndarray | None = None
    ) -> np.ndarray:
        """What the files hold for the region of ``size`` at ``origin``, which
        spans whole write units (or ends at the array's edge): the inverse of
        :meth:`write`, for merging a block with what an earlier write left.
        Read into ``out`` when given (of ``size`` and the array's dtype)."""
        origin = tuple(origin) + (0,) * (len(size) - len(origin))
        ranges = [range(o // u, -(-(o + n) // u)) for o, n, u in zip(origin, size, self.unit)]
        keys = list(itertools.product(*ranges))
        if len(keys) == 1 and tuple(size) == self.unit:
            return self._read_unit(keys[0], out)
        if out is None:
            out = np.empty(size, dtype=self.encode.dtype)
        for key in keys:
            start = tuple(k * u for k, u in zip(key, self.unit))
            unit = self._read_unit(key)
            target = tuple(
                slice(max(s, o) - o, min(s + u, o + n) - o)
                for s, u, o, n in zip(start, self.unit, origin, size)
            )
            source = tuple(
                slice(t.start + o - s, t.stop + o - s) for t, o, s in zip(target, origin, start)
            )
            out[target] = unit[source]
        return out

    def _read_unit(self, key: tuple[int, ...], unit: np.ndarray | None = None) -> np.ndarray:
        """The full image of one unit as its file holds it (the fill value
        where the file or a chunk of it is absent), in ``unit`` if given."""
        path = Path(self.files.root) / self.key(key)
        if unit is None:
            unit = np.empty(self.unit, dtype=self.encode.dtype)
        try:
            encoded = memoryview(path.read_bytes())
        except FileNotFoundError:
            unit[...] = self.fill
            return unit
        if self.sharding is None:
            self.encode.decode(encoded, unit)
            return unit
        count = math.prod(self.per_shard) * 16
        raw_index = bytes(encoded[:count] if self.index_at_start else encoded[-count - 4 : -4])
        checksum = bytes(encoded[count : count + 4] if self.index_at_start else encoded[-4:])
        if np.uint32(google_crc32c.value(raw_index)).astype("<u4").tobytes() != checksum:
            raise OSError(f"{path}: the shard index does not match its checksum")
        index = np.frombuffer(raw_index, dtype="<u8").reshape(self.per_shard + (2,))
        for position in itertools.product(*(range(n) for n in self.per_shard)):
            offset, length = (int(v) for v in index[position])
            place = tuple(slice(p * c, (p + 1) * c) for p, c in zip(position, self.chunk))
            if offset == _ABSENT:
                unit[place] = self.fill
            else:
                self.encode.decode(encoded[offset : offset + length], unit[place])
        return unit

    def _unit_data(
        self, key: tuple[int, ...], origin: tuple[int, ...], data: np.ndarray
    ) -> np.ndarray:
        """The full image of one unit: a view of ``data``, or a copy padded with
        the fill value where the unit passes the data (at the array's edge)."""
        start = tuple(k * u for k, u in zip(key, self.unit))
        inner = tuple(
            slice(max(s, o) - o, min(s + u, o + n) - o)
            for s, u, o, n in zip(start, self.unit, origin, data.shape)
        )
        part = data[inner]
        if part.shape == self.unit:
            return part
        full = np.full(self.unit, self.fill, dtype=data.dtype)
        within = tuple(
            slice(i.start + o - s, i.stop + o - s) for i, o, s in zip(inner, origin, start)
        )
        full[within] = part
        return full

    def _write_unit(
        self,
        key: tuple[int, ...],
        unit: np.ndarray,
        shape: tuple[int, ...],
        encoded: Mapping[tuple[int, ...], Any] | None = None,
    ) -> None:
        name = self.key(key)
        if self.sharding is None:
            parts = [self.encode(unit)]
        else:
            start = tuple(k * u for k, u in zip(key, self.unit))
            parts = list(self._shard(unit, start, shape, encoded or {}))
        self.files.write_parts(name, parts)
        # Written: the encoded chunks' memory serves the next ones (no fresh
        # pages). A failed write keeps them (a retry may still hold them).
        self.encode.release(parts)

    def _shard(
        self,
        unit: np.ndarray,
        start: tuple[int, ...],
        shape: tuple[int, ...],
        encoded: Mapping[tuple[int, ...], Any],
    ) -> Iterator[Any]:
        """The parts of a shard file: chunks in zarr-python's order, and the
        index (chunks wholly past the array's edge are left out, as absent)."""
        index = np.full(self.per_shard + (2,), _ABSENT, dtype="<u8")
        parts = []
        offset = 0
        for position in self.order:
            corner = tuple(s + p * c for s, p, c in zip(start, position, self.chunk))
            if any(x >= n for x, n in zip(corner, shape)):
                continue
            chunk_bytes = encoded.get(position)
            if chunk_bytes is None:
                chunk = unit[
                    tuple(slice(p * c, (p + 1) * c) for p, c in zip(position, self.chunk))
                ]
                chunk_bytes = self.encode(chunk)
            length = memoryview(chunk_bytes).nbytes
            index[position] = (offset, length)
            parts.append(chunk_bytes)
            offset += length
        if self.index_at_start:
            present = index[..., 0] != _ABSENT
            index[present, 0] += index.nbytes + 4
        index_bytes = index.tobytes()
        checksum = np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes()
        if self.index_at_start:
            yield index_bytes
            yield checksum
            yield from parts
        else:
            yield from parts
            yield index_bytes
            yield checksum


class UnitIO:
    """Whole write units of one array, in and out: directly where its codecs
    allow (:class:`DirectWriter`), else through zarr-python.

    The array is passed to each call, as the newest object over it (a growing
    array is replaced by a longer one); its shape bounds the units.
    """

    def __init__(self, array: ArrayNode) -> None:
        self.direct = DirectWriter.of(array)

    def write(
        self,
        array: ArrayNode,
        origin: tuple[int, ...],
        data: np.ndarray,
        encoded: Mapping[tuple[int, ...], Any] | None = None,
    ) -> None:
        """Write ``data`` at ``origin``, spanning whole units (or ending at the
        array's edge); ``encoded``: chunks the direct path encoded already."""
        if self.direct is not None:
            self.direct.write(origin, data, array.shape, encoded)
        else:
            array[_region(origin, data.shape)] = data

    def read(
        self,
        array: ArrayNode,
        origin: tuple[int, ...],
        size: tuple[int, ...],
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """What the store holds for the region of ``size`` at ``origin`` (whole units)."""
        if self.direct is not None:
            return self.direct.read(origin, size, out)
        return np.asarray(array[_region(origin, size)])

    def update(self, array: ArrayNode, region: tuple[slice, ...], values: np.ndarray) -> None:
        """Write ``values`` over ``region`` of a small array (a mask, a
        coordinate), keeping the rest of the units it touches; the caller is
        the only writer of the array."""
        if self.direct is None:
            array[region] = values
            return
        unit = array.shards or array.chunks
        start = tuple(r.start // u * u for r, u in zip(region, unit))
        size = tuple(
            min(-(-r.stop // u) * u, n) - s for r, u, n, s in zip(region, unit, array.shape, start)
        )
        hull = self.direct.read(start, size)
        hull[tuple(slice(r.start - s, r.stop - s) for r, s in zip(region, start))] = values
        self.direct.write(start, hull, array.shape)


def _fill_value(value: Any, dtype: np.dtype) -> Any:
    """A fill value from its JSON form (``"NaN"``, ``"Infinity"``, pairs for
    complex numbers)."""
    if dtype.kind == "c" and isinstance(value, (list, tuple)):
        return complex(float(value[0]), float(value[1]))
    if isinstance(value, str):
        return float(value)
    return value


def _region(origin: tuple[int, ...], size: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(origin, size))
