"""Detector frames referenced in place: HDF5 chunks as Icechunk virtual chunks.

With ``external="virtual"`` a run's store is an Icechunk repository
(:mod:`bluesky_zarr.storage`). The frames that stream_datum documents (and
area-detector HDF5 datums) point to are not read: each HDF5 chunk becomes a
*virtual chunk*, a reference to its byte range in the detector's file,
placed at the grid point of its event (snaking undone), so the cube reads like
any other and no frame byte is copied.

An HDF5 dataset maps when one point's frames are whole Zarr chunks:

* chunked one frame per chunk (or all the frames of one point per chunk),
  or a regular tiling of a frame, stored raw or with a filter whose bytes a
  Zarr V3 codec decodes as they are (Blosc, id 32001; Zstandard, id 32015);
* contiguous (frames at a fixed stride from the dataset's offset).

Anything else (gzip/deflate, whose zlib framing the V3 ``gzip`` codec does not
read; LZF; HDF5's shuffle; the LZ4 and bitshuffle plugins with their own
framing; checksums; chunks that span several points, such as a detector's
column of sums; a chunk stored with its filter skipped) is copied as in
``fill`` mode, per data key, and the stream group's ``virtual`` attribute
says which keys are referenced and which were copied, and why.

**A reference is made only to bytes that are there.** Before the rows of a
file are referenced, their chunks' byte ranges are checked against the file's
real size (``_formats.check_hdf5_rows``): a file cut short is refused with
:class:`~bluesky_zarr.ExternalFileError`, never referenced past its end. Each
detector file referenced is remembered with its identity (device, inode), size
and modification time; at stop it is looked at again (:meth:`VirtualFrames.verify`).
The points whose frames lie in a file that vanished, was replaced by another
file, or was cut short of their bytes are taken off ``_written`` and their
references deleted (the cube reads whole, the fill value there); the stream
group's ``virtual`` attribute names each file (``files``: its size and
modification time at the last reference) and what changed (``changed``: why,
and the points; a file modified in place or appended to after its last
reference is named too, its points kept).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._errors import (
    ExternalFileError,
)
from ..storage import _zarr
from ..storage._icechunk import _icechunk

if TYPE_CHECKING:
    from ._data import StreamKey
    from ._target import ExternalRun, FrameTarget



#: HDF5 filter ids whose chunks Zarr V3 codecs decode as stored.
BLOSC_FILTER = "32001"
ZSTD_FILTER = "32015"

_BLOSC_CNAMES = {0: "blosclz", 1: "lz4", 2: "lz4hc", 4: "zlib", 5: "zstd"}
_BLOSC_SHUFFLES = {0: "noshuffle", 1: "shuffle", 2: "bitshuffle"}

#: Names HDF5 (h5py) gives filters that have no Zarr V3 codec reading their chunks.
_FILTER_NAMES = {
    "gzip": "gzip/deflate (zlib framing, which the Zarr V3 gzip codec does not read)",
    "lzf": "LZF (no Zarr V3 codec)",
    "shuffle": "HDF5 byte shuffle (no Zarr V3 codec)",
    "fletcher32": "Fletcher-32 checksums (no Zarr V3 codec)",
    "scaleoffset": "scale-offset (no Zarr V3 codec)",
    "szip": "szip (no Zarr V3 codec)",
    "32004": "the HDF5 LZ4 plugin (its own block framing, not numcodecs' LZ4)",
    "32008": "the bitshuffle plugin (its own block framing)",
}


# ------------------------------------------------------------ frame mapping
@dataclass
class _KeyState:
    """What was decided for one data key of one stream."""

    #: The Zarr chunk shape and codec configuration its array was laid out
    #: with for references (None: the key is copied).
    chunks: tuple[int, ...] | None = None
    codecs: Any = None
    #: Why some (or all) of its frames were copied.
    copied: str | None = None


@dataclass
class _Layout:
    """How one HDF5 dataset maps onto Zarr chunks of one data key."""

    frame_chunks: tuple[int, ...]
    compressors: tuple[Any, ...]
    endian: str | None
    codecs_id: str


#: Points listed at most per changed file in the ``virtual`` attribute (the
#: ``_written`` mask tells them all).
LISTED_POINTS = 100


@dataclass
class _File:
    """A detector file that references point into, as it was when referenced."""

    path: str
    #: Its size and modification time (ns) at the last reference into it.
    size: int
    mtime_ns: int
    #: The end of the bytes referenced, per point, by (stream, data key).
    ends: dict[tuple[str, str], dict[tuple[int, ...], int]] = field(default_factory=dict)
    #: The chunks (their grid indices) referencing it, per point, likewise.
    chunks: dict[tuple[str, str], dict[tuple[int, ...], list[tuple[int, ...]]]] = field(
        default_factory=dict
    )


@dataclass
class VirtualFrames:
    """Turns the rows that stream_datum (and area-detector datum) documents
    name into virtual chunks."""

    run: ExternalRun
    keys: dict[tuple[str, str], _KeyState] = field(default_factory=dict)
    #: The files referenced, by (path, device, inode): a file replaced under
    #: the same name is another file.
    files: dict[tuple[str, int, int], _File] = field(default_factory=dict)
    #: What :meth:`verify` found changed, per stream: path -> record.
    changed: dict[str, dict[str, Any]] = field(default_factory=dict)

    def place(
        self,
        stream: FrameTarget,
        key: str,
        dataset: Any,
        path: str,
        info: StreamKey,
        per_index: int,
        start: int,
        stop: int,
        index: tuple[np.ndarray, ...],
    ) -> str | None:
        """Reference the frames of events ``start..stop`` at the points ``index``.

        Returns None when they are referenced, else why they must be copied
        (the caller copies them).
        """
        specs = self.prepare(stream, key, dataset, path, info, per_index, start, stop, index)
        if isinstance(specs, str):
            return specs
        self.apply(stream, key, [path], specs, index)
        return None

    def settled_copied(self, stream: FrameTarget, key: str) -> bool:
        """Whether the key's frames are copied from now on."""
        state = self.keys.get((stream.name, key))
        return state is not None and state.chunks is None and state.copied is not None

    def prepare(
        self,
        stream: FrameTarget,
        key: str,
        dataset: Any,
        path: str,
        info: StreamKey,
        per_index: int,
        start: int,
        stop: int,
        index: tuple[np.ndarray, ...],
    ) -> list[Any] | str:
        """The virtual chunks of events ``start..stop`` (at the points ``index``),
        the key's array laid out for them; or why they must be copied."""
        state = self.keys.setdefault((stream.name, key), _KeyState())
        if state.chunks is None and state.copied is not None:
            return state.copied
        spec = next(s for s in stream.layout.arrays.values() if s.key == key)
        keeps = (
            not info.squeezed
            and info.declared is not None
            and len(info.declared) == dataset.ndim
        )
        layout, why = _dataset_layout(dataset, per_index, keeps)
        reason = why if layout is None else _dtype_mismatch(spec.dtype, dataset.dtype)
        if layout is None or reason is not None:
            return self._copied(stream, key, state, reason or "unknown")
        row_shape = tuple(dataset.shape[1:])
        frame_chunks = layout.frame_chunks
        chunks = (1,) * stream.n_scan + frame_chunks
        if state.chunks is None:
            frame = ((per_index,) if keeps else ()) + row_shape
            relaid = self._lay_out(stream, spec, chunks, layout, np.empty(frame, dataset.dtype))
            if relaid is not None:
                return self._copied(stream, key, state, relaid)
            state.chunks, state.codecs = chunks, layout.codecs_id
            self._record(stream)
        elif (state.chunks, state.codecs) != (chunks, layout.codecs_id):
            return self._copied(
                stream, key, state,
                f"{path}: chunks or filters differ from the first file's "
                f"({chunks} {layout.codecs_id} against {state.chunks} {state.codecs})",
            )
        specs, reason = _chunk_specs(
            dataset, path, per_index, keeps, layout, start, stop, index, row_shape
        )
        if reason is not None:
            return self._copied(stream, key, state, reason)
        return specs

    def apply(
        self,
        stream: FrameTarget,
        key: str,
        paths: list[str],
        specs: list[Any],
        index: tuple[np.ndarray, ...],
    ) -> None:
        """Store prepared virtual chunks of files ``paths`` and mark their points."""
        virtual = self.run.repository
        assert virtual is not None
        if stream.growing and index[0].size:
            stream.ensure_length(int(index[0].max()) + 1)
        for path in paths:
            virtual.ensure_container(os.path.abspath(path))
        spec = next(s for s in stream.layout.arrays.values() if s.key == key)
        self._remember(stream, key, paths, specs)
        virtual.set_refs("/" + stream.array_node(spec.name).path, specs)
        if index[0].size:
            lo = [int(ix.min()) for ix in index]
            hi = [int(ix.max()) + 1 for ix in index]
            filled = np.zeros([h - lo_ for lo_, h in zip(lo, hi)], dtype=bool)
            filled[tuple(ix - lo_ for ix, lo_ in zip(index, lo))] = True
            region = tuple(slice(lo_, h) for lo_, h in zip(lo, hi))
            stream.mark_referenced(spec.name, region, filled)
        return None

    def _remember(
        self, stream: FrameTarget, key: str, paths: list[str], specs: list[Any]
    ) -> None:
        """Note the file, size and modification time behind each reference."""
        by_uri: dict[str, _File] = {}
        new_file = False
        for path in paths:
            try:
                info = os.stat(path)
            except OSError as err:
                raise ExternalFileError(
                    f"the detector file {path} vanished before its frames were referenced: "
                    f"{err}"
                ) from err
            ident = (os.path.abspath(path), info.st_dev, info.st_ino)
            seen = self.files.get(ident)
            if seen is None:
                seen = self.files[ident] = _File(ident[0], info.st_size, info.st_mtime_ns)
                new_file = True
            seen.size, seen.mtime_ns = info.st_size, info.st_mtime_ns
            by_uri[Path(path).resolve().as_uri()] = seen
        n_scan = stream.n_scan
        for spec in specs:
            seen = by_uri[spec.location]
            ends = seen.ends.setdefault((stream.name, key), {})
            point = tuple(int(i) for i in spec.index[:n_scan])
            ends[point] = max(ends.get(point, 0), int(spec.offset) + int(spec.length))
            chunks = seen.chunks.setdefault((stream.name, key), {}).setdefault(point, [])
            chunks.append(tuple(int(i) for i in spec.index))
        if new_file:
            self._record(stream)

    def verify(self) -> int:
        """At stop: look at every file referenced again. Points whose bytes are
        gone (the file vanished, was replaced, or was cut short of them) are
        taken off ``_written``; a file modified since its last reference is
        named, its points kept. Returns the number of points taken off."""
        lost_points = 0
        touched: set[str] = set()
        for ident, seen in self.files.items():
            try:
                now: os.stat_result | None = os.stat(seen.path)
            except FileNotFoundError:
                now = None
            if now is None:
                why, lost = "vanished", None
            elif (now.st_dev, now.st_ino) != ident[1:]:
                why, lost = "replaced by another file of the same name", None
            elif now.st_size < seen.size:
                why = f"cut from {seen.size} to {now.st_size} bytes"
                lost = now.st_size
            elif now.st_mtime_ns != seen.mtime_ns:
                why = (
                    f"modified after its last reference (now {now.st_size} bytes, "
                    f"was {seen.size}): appended to, or rewritten in place"
                )
                lost = -1  # nothing is known to be gone
            else:
                continue
            for (stream_name, key), ends in seen.ends.items():
                stream = self.run.streams[stream_name]
                gone = [
                    p for p, end in ends.items() if lost is None or (lost >= 0 and end > lost)
                ]
                if gone:
                    spec = next(a for a in stream.layout.arrays.values() if a.key == key)
                    index = tuple(np.array(axis, dtype=np.int64) for axis in zip(*gone))
                    stream.unmark(spec.name, index)
                    # The references go too: the cube reads whole, the fill
                    # value where the frames were.
                    chunks = seen.chunks[stream_name, key]
                    self._forget_chunks(stream, spec.name, [c for p in gone for c in chunks[p]])
                    lost_points += len(gone)
                kept = len(ends) - len(gone)
                record = self.changed.setdefault(stream_name, {})
                record[seen.path] = {
                    "why": why,
                    "data_key": key,
                    "points_unwritten": len(gone),
                    "points_kept": kept,
                    "points": [list(p) for p in (gone or list(ends))[:LISTED_POINTS]],
                }
                touched.add(stream_name)
        for name in touched | {n for n, _ in self.keys}:
            if name in self.run.streams:
                self._record(self.run.streams[name])
        return lost_points

    def _forget_chunks(
        self, stream: FrameTarget, name: str, chunks: list[tuple[int, ...]]
    ) -> None:
        """Delete the references of ``chunks`` of array ``name``."""
        array = stream.array_node(name)
        store = self.run.repository.store
        separator = array.metadata.separator
        for index in chunks:
            key = "c" + separator + separator.join(str(i) for i in index)
            _zarr.delete(store, f"{array.path}/{key}")

    def _copied(self, stream: FrameTarget, key: str, state: _KeyState, reason: str) -> str:
        if state.copied != reason:
            state.copied = reason
            self._record(stream)
        return reason

    def _record(self, stream: FrameTarget) -> None:
        """Write the stream group's ``virtual`` attribute: the keys referenced,
        and the keys copied with why."""
        states = {k: s for (name, k), s in self.keys.items() if name == stream.name}
        attrs: dict[str, Any] = {
            "referenced": sorted(k for k, s in states.items() if s.chunks is not None),
            "copied": {k: s.copied for k, s in sorted(states.items()) if s.copied},
            "files": {
                f.path: {"size": f.size, "mtime": f.mtime_ns / 1e9}
                for f in self.files.values()
                if any(name == stream.name for name, _ in f.ends)
            },
        }
        if stream.name in self.changed:
            attrs["changed"] = self.changed[stream.name]
        with self.run.meta_lock:
            stream.group = self.run.metadata.set_attributes(stream.name, {"virtual": attrs})
            self.run.metadata.consolidate()

    def _lay_out(
        self,
        stream: FrameTarget,
        spec: Any,
        chunks: tuple[int, ...],
        layout: _Layout,
        sample: np.ndarray,
    ) -> str | None:
        """Make the key's array anew with one point's frames per chunk and the
        codecs of the file; returns why not, if its frames were placed before."""
        # The file's byte order (the machine's, for a native dtype).
        serializer: dict[str, Any] = {"name": "bytes"}
        if sample.dtype.itemsize > 1:
            serializer["configuration"] = {"endian": layout.endian or sys.byteorder}
        with self.run.buffer_lock, self.run.meta_lock:
            why = stream.remake_array(
                spec.name,
                sample,
                chunks=chunks,
                serializer=serializer,
                compressors=layout.compressors,
            )
            if why is None:
                self.run.metadata.consolidate()
        return why


def _dtype_mismatch(dtype: np.dtype | None, stored: np.dtype) -> str | None:
    if dtype is None:
        return None
    if dtype.kind != stored.kind or dtype.itemsize != stored.itemsize:
        return (
            f"the file stores {stored} where the descriptor declares {dtype}: its "
            f"bytes cannot be read as they are"
        )
    return None


def _codecs(filters: Mapping[str, Any], dtype: np.dtype) -> tuple[tuple[Any, ...], str] | str:
    """Zarr V3 codecs reading chunks stored with these HDF5 ``filters``, or why
    there are none."""
    if not filters:
        return (), "raw"
    if len(filters) > 1:
        names = ", ".join(_FILTER_NAMES.get(k, f"filter {k}") for k in filters)
        return f"HDF5 filter pipeline {names} has no Zarr V3 codec chain"
    ((name, options),) = filters.items()
    options = tuple(options) if isinstance(options, (tuple, list)) else (options,)
    if name == ZSTD_FILTER:
        level = int(options[0]) if options else 0
        zstd = {"name": "zstd", "configuration": {"level": level, "checksum": False}}
        return (zstd,), f"zstd:{level}"
    if name == BLOSC_FILTER:
        # cd_values: reserved, version, typesize, bytes, clevel, shuffle, compressor.
        clevel = int(options[4]) if len(options) > 4 else 5
        shuffle: Any = _BLOSC_SHUFFLES.get(int(options[5]) if len(options) > 5 else 1, "shuffle")
        cname: Any = _BLOSC_CNAMES.get(int(options[6]) if len(options) > 6 else 0, "blosclz")
        codec = {
            "name": "blosc",
            "configuration": {
                "typesize": dtype.itemsize,
                "cname": cname,
                "clevel": clevel,
                "shuffle": shuffle,
                "blocksize": 0,
            },
        }
        return (codec,), f"blosc:{cname}:{clevel}:{shuffle}"
    return (
        f"HDF5 filter {_FILTER_NAMES.get(name, f'{name} (no Zarr V3 codec)')} has no "
        f"Zarr V3 codec that reads its chunks"
    )


def _dataset_layout(dataset: Any, per_index: int, keeps: bool) -> tuple[_Layout | None, str]:
    """How the dataset's chunks map to Zarr chunks of one point, or why not."""
    row_shape = tuple(dataset.shape[1:])
    dtype = np.dtype(dataset.dtype)
    if dtype.kind not in "biuf" or dtype.hasobject:
        return None, f"HDF5 dtype {dtype} is not a plain number"
    endian = {">": "big", "<": "little"}.get(dtype.byteorder)
    chunks = dataset.chunks
    if chunks is None:
        if not keeps and per_index != 1:
            return None, f"{per_index} frames per point in a key that keeps one"
        frame = (1,) + row_shape if keeps else row_shape
        return _Layout(frame, (), endian, "raw"), ""
    codecs = _codecs(dataset._filters, dtype)
    if isinstance(codecs, str):
        return None, codecs
    compressors, codecs_id = codecs
    first, tile = int(chunks[0]), tuple(int(c) for c in chunks[1:])
    if first == 1:
        frame = ((1,) if keeps else ()) + tile
    elif keeps and first == per_index:
        frame = (first,) + tile
    else:
        return None, (
            f"HDF5 chunks of {first} rows span several points ({per_index} frame(s) a "
            f"point): a Zarr chunk holds one point"
        )
    return _Layout(frame, compressors, endian, codecs_id), ""


def _chunk_specs(
    dataset: Any,
    path: str,
    per_index: int,
    keeps: bool,
    layout: _Layout,
    start: int,
    stop: int,
    index: tuple[np.ndarray, ...],
    row_shape: tuple[int, ...],
) -> tuple[list[Any], str | None]:
    """The virtual chunk specs of events ``start..stop``, or why they cannot be
    made; raises :class:`ExternalFileError` for rows whose bytes are not in
    the file (it is never referenced past its end)."""
    from ..external._formats import check_hdf5_rows

    ic = _icechunk()
    check_hdf5_rows(dataset, path, start * per_index, stop * per_index)
    location = Path(path).resolve().as_uri()
    specs = []
    tiles = tuple(
        math.ceil(n / c) for n, c in zip(row_shape, layout.frame_chunks[-len(row_shape):])
    ) if row_shape else ()
    if dataset.chunks is None:
        offset = dataset.id.get_offset()
        if offset is None:  # checked above; the file changed since
            raise ExternalFileError(f"{path}: the contiguous dataset holds no data")
        row_bytes = math.prod(row_shape) * dataset.dtype.itemsize
        for e in range(stop - start):
            point = [int(ix[e]) for ix in index]
            for f in range(per_index):
                row = (start + e) * per_index + f
                chunk = point + ([f] if keeps else []) + [0] * len(row_shape)
                specs.append(ic.VirtualChunkSpec(
                    index=chunk, location=location, offset=offset + row * row_bytes,
                    length=row_bytes,
                ))
        return specs, None
    rows_per_chunk = int(dataset.chunks[0])
    tile_shape = layout.frame_chunks[-len(row_shape):] if row_shape else ()
    get = dataset.id.get_chunk_info_by_coord
    for e in range(stop - start):
        point = [int(ix[e]) for ix in index]
        for f in range(0, per_index, rows_per_chunk):
            row = (start + e) * per_index + f
            for tile in np.ndindex(*tiles) if tiles else [()]:
                where = (row,) + tuple(t * c for t, c in zip(tile, tile_shape))
                stored = get(where)
                if stored.byte_offset is None:  # checked above; the file changed since
                    raise ExternalFileError(f"{path}: row {row} of the dataset has no chunk")
                if stored.filter_mask:
                    return [], (
                        f"{path}: a chunk was stored with its filter skipped "
                        f"(filter mask {stored.filter_mask})"
                    )
                frame_index = [f // rows_per_chunk] if keeps else []
                specs.append(ic.VirtualChunkSpec(
                    index=point + frame_index + list(tile), location=location,
                    offset=int(stored.byte_offset), length=int(stored.size),
                ))
    return specs, None
