"""Where an event becomes points of a stream's arrays.

A :class:`StreamWriter` owns the arrays of one stream group. It maps each
event (a page of events, or frames that external data point to) to its point,
an index along the scan dimensions, checks its values against the arrays,
and places them in the chunk buffer (:mod:`._buffer`), which hands back
complete blocks; the buffer writes each (``_buffer.BlockBuffer.write_block``, through
:mod:`._io`, merging with what an earlier write of the block left) and marks
its points on disk.

``_written`` flips for a point only after every array of the stream holds
that point on disk.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .._errors import DataTypeError, DocumentError
from ..plan import (
    PER_POINT_SUFFIX,
    RESERVED,
    WRITTEN_ATTRIBUTES,
    ArraySpec,
    FrameCoordinate,
    StreamLayout,
    check_chunking,
    default_chunking,
    fill_value_for,
    find_axis,
    preview,
    sanitize_name,
    typed,
)
from ..storage import ArrayNode, GroupNode, UnitIO
from ._buffer import ArraySink, Block, BlockBuffer

if TYPE_CHECKING:
    from ..storage import StoreMetadata
    from ._options import WriterOptions
    from ._workers import BackgroundWriter

logger = logging.getLogger(__name__)


class StreamRun(Protocol):
    """What a stream needs of its run (a :class:`~bluesky_zarr.write._run.RunWriter`)."""

    options: WriterOptions
    #: The store's metadata: every array is made, grown and consolidated there.
    metadata: StoreMetadata
    #: The chunk buffer, shared by the runs of one writer.
    buffer: BlockBuffer
    #: Held while the store's metadata changes.
    meta_lock: threading.RLock
    #: The default shard size of this run (bytes).
    shard_bytes: int

    @property
    def background(self) -> BackgroundWriter | None: ...

    def raise_failures(self) -> None: ...

class StreamWriter:
    """The group of one stream: its arrays, blocks, masks and coordinates."""

    def __init__(
        self,
        run: StreamRun,
        group: GroupNode,
        layout: StreamLayout,
        setpoints: Mapping[str, np.ndarray],
        descriptor: Mapping[str, Any] | None = None,
    ) -> None:
        self.run = run
        self.group = group
        self.layout = layout
        self.name = layout.name
        self.n_scan = len(layout.scan_dims)
        #: Whether its events carry datum ids, which external data fill in.
        self.fills = False
        self.growing = layout.growing
        #: Current length of the growing dimension (arrays are this long).
        self.length = 0
        self.scan_shape: tuple[int, ...] = tuple(
            0 if s is None else s for s in layout.scan_sizes
        )
        self.sinks: dict[str, ArraySink] = {}
        self.pending: dict[str, ArraySpec] = {}
        self.lock = threading.Lock()
        #: Held by the worker writing the mask and coordinates as blocks
        #: reach the disk (see :meth:`mark_on_disk`), taken before
        #: ``self.lock``: their files are written outside ``self.lock``, which
        #: the RunEngine's thread takes at every event.
        self.io_lock = threading.Lock()
        self.on_disk: dict[str, np.ndarray] = {}
        self.coord_values: dict[str, np.ndarray] = {}
        self.coord_arrays: dict[str, ArrayNode] = {}
        #: How the mask and coordinates are written, by array path.
        self._io: dict[str, UnitIO] = {}
        #: What reached the disk since the last :meth:`take_written_regions`:
        #: by array path, the array and the bounding box of its writes.
        self._written_regions: dict[str, tuple[ArrayNode, list[int], list[int]]] = {}
        #: Coordinates that event data update (setpoint data, or any for
        #: dimensions whose setpoints the start document does not give).
        self.coord_from_data: dict[str, str] = {}
        for name, source in layout.coord_sources.items():
            if layout.coord_motors.get(name, name) not in setpoints or source.endswith(
                "setpoint"
            ):
                self.coord_from_data[name] = source
        #: The stream's descriptors, in order, and their order by uid.
        self.descriptors: list[Mapping[str, Any]] = [descriptor] if descriptor else []
        self.descriptor_number: dict[str, int] = (
            {str(descriptor.get("uid")): 0} if descriptor else {}
        )
        #: Coordinates of frame dimensions from the devices' configuration
        #: (``_frame_coords``), by dimension; their arrays; the per-point
        #: coordinates made when a configuration changed; and, per point, the
        #: number of the descriptor its event came with (-1: none yet).
        self.frame_coords: dict[str, FrameCoordinate] = {}
        self.frame_coord_arrays: dict[str, ArrayNode] = {}
        self.per_point_arrays: dict[str, ArrayNode] = {}
        self.point_descriptor = np.full(self.scan_shape, -1, dtype=np.int32)
        #: Every name the frame dimensions of this stream go by (frame_coords= keys).
        self.frame_dim_names: set[str] = set()
        for spec in layout.arrays.values():
            if spec.ready:
                self._create(spec)
            else:
                self.pending[spec.name] = spec
        self.written = self._create_plain(
            "_written", np.dtype(bool), False, self._mask_chunks(), WRITTEN_ATTRIBUTES
        )
        for name, dim in layout.coords.items():
            axis = layout.scan_dims.index(dim)
            values = np.full(self.scan_shape[axis], np.nan)
            motor = layout.coord_motors.get(name, name)
            if motor in setpoints:
                values[:] = setpoints[motor]
            self.coord_values[name] = values
            array = self.run.metadata.add_array(
                f"{self.name}/{name}",
                shape=values.shape,
                dtype="float64",
                chunks=(max(1, min(self._mask_chunks()[axis], 1 << 16)),) if self.growing
                else (max(1, values.shape[0]),),
                shards=None,
                fill_value=np.nan,
                dimension_names=[dim],
                attributes={
                    "_ARRAY_DIMENSIONS": [dim],
                    "long_name": f"{motor} setpoint",
                    "motor": motor,
                },
                compressors=self.run.options.compressors,
            )
            self.coord_arrays[name] = array
            if values.size:
                self._update(array, (slice(0, values.size),), values)

    # ------------------------------------------------------------------ setup
    def _mask_chunks(self) -> tuple[int, ...]:
        if self.growing:
            return (4096,)
        if math.prod(self.scan_shape) <= 1 << 20:
            return tuple(max(1, s) for s in self.scan_shape)
        return (1,) * (self.n_scan - 1) + (self.scan_shape[-1],)

    def _create_plain(
        self,
        name: str,
        dtype: np.dtype,
        fill: Any,
        chunks: tuple[int, ...],
        attrs: dict[str, Any],
    ) -> ArrayNode:
        dims = list(self.layout.scan_dims)
        return self.run.metadata.add_array(
            f"{self.name}/{name}",
            shape=self.scan_shape,
            dtype=dtype,
            chunks=chunks,
            shards=None,
            fill_value=fill,
            dimension_names=dims,
            attributes={"_ARRAY_DIMENSIONS": dims, **attrs},
            compressors=self.run.options.compressors,
        )

    def _create(self, spec: ArraySpec) -> ArraySink:
        assert spec.dtype is not None and spec.frame_shape is not None
        options = self.run.options
        chunks, shards, block = default_chunking(self.layout, spec, self.run.shard_bytes)
        block_shape: tuple[int, ...] | None = block
        ndim = self.n_scan + len(spec.frame_shape)
        frame_ndim = len(spec.frame_shape)
        user_chunks = self.layout.fit_chunking(
            options.chunks.get(spec.name, options.chunks.get(spec.key or "")), frame_ndim
        )
        user_shards = self.layout.fit_chunking(
            options.shards.get(spec.name, options.shards.get(spec.key or "")), frame_ndim
        )
        if user_chunks is not None or user_shards is not None:
            block_shape = None  # the user's shards (else chunks) are the blocks
            check_chunking(spec.name, ndim, user_chunks, user_shards)
            if user_chunks is not None:
                chunks = tuple(int(c) for c in user_chunks)
                shards = None
            if user_shards is not None:
                shards = tuple(int(s) for s in user_shards)
                if user_chunks is None:
                    chunks = tuple(min(c, s) for c, s in zip(chunks, shards))
                check_chunking(spec.name, ndim, chunks, shards)
        if not self.growing:
            chunks = tuple(min(c, max(1, s)) for c, s in zip(chunks, self.scan_shape)) + tuple(
                chunks[self.n_scan :]
            )
            if shards is not None:
                shards = tuple(
                    -(-min(s, max(1, n)) // c) * c
                    for s, n, c in zip(shards, self.scan_shape, chunks)
                ) + tuple(shards[self.n_scan :])
        self._claim_frame_coords(spec)
        dims = list(self.layout.scan_dims) + list(spec.frame_dims)
        dtype: Any = str if spec.dtype.kind in "OU" else spec.dtype
        # Tell xarray (CF ``coordinates``) which variables are coordinates.
        extra = [c for c, d in self.layout.coords.items() if c != d] + [
            self.frame_coords[d].per_point or "" for d in spec.frame_dims
            if d in self.frame_coords and self.frame_coords[d].per_point
        ]
        array = self.run.metadata.add_array(
            f"{self.name}/{spec.name}",
            shape=self.scan_shape + spec.frame_shape,
            dtype=dtype,
            chunks=chunks,
            shards=shards,
            fill_value=fill_value_for(spec.dtype),
            dimension_names=dims,
            attributes={
                "_ARRAY_DIMENSIONS": dims,
                **typed(spec.attrs, spec.dtype),
                **({"coordinates": " ".join(extra)} if extra else {}),
            },
            compressors=options.compressors,
        )
        sink = ArraySink(spec, array, self.n_scan, block_shape)
        self.sinks[spec.name] = sink
        self.on_disk[spec.name] = np.zeros(self.scan_shape, dtype=bool)
        return sink

    def _create_pending(self, spec: ArraySpec, sample: np.ndarray) -> ArraySink:
        """Create an array whose dtype or shape only its first value tells."""
        if spec.dtype is None:
            spec.dtype = sample.dtype
        if spec.frame_shape is None:
            spec.frame_shape = sample.shape
            if len(spec.frame_dims) != sample.ndim:
                spec.frame_dims = (
                    ["y", "x"] if sample.ndim == 2
                    else [f"{spec.name}_dim_{n}" for n in range(sample.ndim)]
                )
            self.layout.claim_frame_dims(spec)
        with self.run.meta_lock:
            with self.lock:
                if self.growing:
                    self.scan_shape = (self.length,)
                sink = self._create(spec)
            del self.pending[spec.name]
            self.run.metadata.consolidate()
        return sink

    # ---------------------------------------------------- frame coordinates
    def _claim_frame_coords(self, spec: ArraySpec) -> None:
        """Give the frame dimensions of ``spec`` their coordinates from the
        devices' configuration (``_frame_coords``), making their arrays; a
        dimension whose name another coordinate of other values (or another
        array) holds is renamed for this array."""
        if not spec.frame_dims or not self.descriptors or spec.key is None:
            return
        assert spec.frame_shape is not None
        first = self.descriptors[0]
        data_keys = first.get("data_keys")
        data_key = data_keys.get(spec.key) if isinstance(data_keys, Mapping) else None
        if not isinstance(data_key, Mapping):
            return
        declared = data_key.get("dims")
        declared = list(declared) if isinstance(declared, (list, tuple)) else []
        for axis, size in enumerate(spec.frame_shape):
            dim = spec.frame_dims[axis]
            names = (dim,) + tuple(
                str(d) for d in declared[axis : axis + 1] if isinstance(d, str) and d != dim
            )
            self.frame_dim_names.update(names)
            found, why = find_axis(first, data_key, names, size, self.run.options.frame_coords)
            if why is not None:
                logger.warning("bluesky-zarr: stream %r: %s", self.name, why)
            if found is None:
                continue
            existing = self.frame_coords.get(dim)
            if existing is not None and existing.key == found.key and np.array_equal(
                existing.values, found.values, equal_nan=True
            ):
                continue  # the same axis: shared
            if existing is not None or self._name_taken(dim):
                dim = self._own_dim_name(spec, dim, size)
                spec.frame_dims[axis] = dim
            coordinate = FrameCoordinate(
                dim, found.object_name, found.key, found.units, [found.values]
            )
            for later in self.descriptors[1:]:
                coordinate.add_descriptor(later)
            self.frame_coords[dim] = coordinate
            array = self.run.metadata.add_array(
                f"{self.name}/{dim}",
                shape=(size,),
                dtype="float64",
                chunks=(max(1, size),),
                shards=None,
                fill_value=np.nan,
                dimension_names=[dim],
                attributes=coordinate.attributes(),
                compressors=self.run.options.compressors,
            )
            self.frame_coord_arrays[dim] = array
            if size:
                self._update(array, (slice(0, size),), coordinate.values)
            if len(coordinate.configurations) > 1:
                self._make_per_point(coordinate)

    def _name_taken(self, name: str) -> bool:
        """Whether an array or coordinate of the stream is called ``name``."""
        return (
            name in self.layout.arrays
            or name in self.layout.coords
            or name in self.layout.scan_dims
            or name in RESERVED
            or name in self.frame_coords
        )

    def _own_dim_name(self, spec: ArraySpec, dim: str, size: int) -> str:
        name = f"{sanitize_name(spec.key or spec.name)}_{dim}"
        while self._name_taken(name) or (
            name in self.layout.dim_sizes and self.layout.dim_sizes[name] != size
        ):
            name = f"{name}_"
        self.layout.dim_sizes[name] = size
        return name

    def add_descriptor(self, doc: Mapping[str, Any]) -> None:
        """Another descriptor of this stream: a configuration that changed
        gives its frame coordinates a per-point coordinate (``_frame_coords``).
        Called under the run's metadata lock; the caller consolidates."""
        self.descriptor_number[str(doc.get("uid"))] = len(self.descriptors)
        self.descriptors.append(doc)
        for coordinate in self.frame_coords.values():
            if coordinate.add_descriptor(doc) and coordinate.per_point is None:
                with self.lock:
                    self._make_per_point(coordinate)

    def _make_per_point(self, coordinate: FrameCoordinate) -> None:
        """The per-point coordinate of a frame dimension whose configuration
        changed, written for every point so far (under ``self.lock``)."""
        name = f"{coordinate.dim}{PER_POINT_SUFFIX}"
        while self._name_taken(name):
            name = f"{name}_"
        coordinate.per_point = name
        logger.warning(
            "bluesky-zarr: stream %r: the configuration %r of %r changed during the run; "
            "%r holds the values each point was measured with",
            self.name, coordinate.key, coordinate.object_name, name,
        )
        metadata = self.run.metadata
        size = coordinate.values.shape[0]
        dims = list(self.layout.scan_dims) + [coordinate.dim]
        chunks = self._mask_chunks() + (max(1, size),)
        array = metadata.add_array(
            f"{self.name}/{name}",
            shape=self.scan_shape + (size,),
            dtype="float64",
            chunks=chunks,
            shards=None,
            fill_value=np.nan,
            dimension_names=dims,
            attributes=coordinate.per_point_attributes(dims),
            compressors=self.run.options.compressors,
        )
        self.per_point_arrays[coordinate.dim] = array
        index = self.frame_coord_arrays[coordinate.dim]
        self.frame_coord_arrays[coordinate.dim] = metadata.set_array_attributes(
            index, coordinate.attributes()
        )
        # The arrays along the dimension name the new coordinate (CF
        # ``coordinates``), so that xarray shows it with them.
        for sink in self.sinks.values():
            if coordinate.dim in sink.spec.frame_dims:
                named = str(sink.array.attrs.get("coordinates", "")).split()
                sink.array = metadata.set_array_attributes(
                    sink.array, {"coordinates": " ".join(named + [name])}
                )
        if array.size:
            region = tuple(slice(0, n) for n in self.scan_shape)
            self._update(
                array,
                region + (slice(0, size),),
                coordinate.at_points(self._point_descriptors(region)),
            )

    def note_points(self, index: Sequence[np.ndarray], descriptor: Any) -> None:
        """Record the descriptor the events at ``index`` came with (for the
        per-point values of frame coordinates whose configuration changes)."""
        if not self.frame_coords:
            return
        number = self.descriptor_number.get(str(descriptor), 0)
        with self.lock:
            if self.growing and index[0].size:
                needed = int(index[0].max()) + 1
                current = self.point_descriptor
                if needed > current.shape[0]:
                    grown = np.full(max(needed, 2 * current.shape[0]), -1, dtype=np.int32)
                    grown[: current.shape[0]] = current
                    self.point_descriptor = grown
            self.point_descriptor[tuple(index)] = number

    def _point_descriptors(self, region: tuple[slice, ...]) -> np.ndarray:
        """The descriptor numbers of the points in ``region`` (-1 past those known)."""
        shape = tuple(r.stop - r.start for r in region)
        known = self.point_descriptor[region]
        if known.shape == shape:
            return known
        padded = np.full(shape, -1, dtype=np.int32)
        padded[tuple(slice(0, n) for n in known.shape)] = known
        return padded

    # ----------------------------------------------------------------- events
    def put_page(self, page: Mapping[str, Any], index: Sequence[np.ndarray]) -> None:
        """Copy the events of a page into their blocks (the RunEngine's thread)."""
        data = page.get("data")
        if not isinstance(data, Mapping):
            raise DocumentError("event_page has no 'data' mapping")
        n = len(index[0])
        columns: list[tuple[ArraySpec, Sequence[Any]]] = []
        for spec in self.layout.arrays.values():
            if spec.key is None:
                values = page.get(spec.name)
                if values is None or len(values) != n:
                    raise DocumentError(f"event_page lacks {spec.name!r} for its events")
            else:
                if spec.key not in data:
                    if spec.external:
                        # Stream-external data: its frames come from
                        # stream_datum documents, not from the event.
                        continue
                    raise DocumentError(
                        f"event of stream {self.name!r} lacks data key {spec.key!r} "
                        f"declared by its descriptor"
                    )
                values = data[spec.key]
                if len(values) != n:
                    raise DocumentError(
                        f"event_page column {spec.key!r} has {len(values)} values for "
                        f"{n} events"
                    )
            columns.append((spec, values))
        # Validate every value before touching any block: a bad event is
        # refused whole and nothing already buffered is disturbed.
        checked = [(spec, self._check_column(spec, values)) for spec, values in columns]
        self.note_points(index, page.get("descriptor"))
        self.set_coordinates(index, data)
        for spec, arrays in checked:
            self._place_column(spec, index, arrays)

    def set_coordinates(self, index: Sequence[np.ndarray], data: Mapping[str, Any]) -> None:
        """Take the coordinates' values at ``index`` from the columns of
        ``data`` (data key -> values) that give them."""
        for name, source in self.coord_from_data.items():
            if source not in data:
                continue
            axis = self.layout.scan_dims.index(self.layout.coords[name])
            try:
                values = np.asarray(data[source], dtype="float64")
            except (TypeError, ValueError):
                raise DataTypeError(
                    f"data key {source!r} gives the coordinate {name!r}, but its values "
                    f"are not numbers: {preview(data[source])}"
                ) from None
            self._set_coordinate(name, index[axis], values)

    def put_frames(self, key: str, index: Sequence[np.ndarray], values: Sequence[Any]) -> None:
        """Place the values of one data key at the given points.

        For data that does not travel inside events (e.g. frames that
        ``stream_datum`` documents point to): ``index`` holds one index array
        per scan dimension, ``values`` one value per point.
        """
        spec = next((s for s in self.layout.arrays.values() if s.key == key), None)
        if spec is None:
            raise DocumentError(f"stream {self.name!r} has no data key {key!r}")
        if len(values) != len(index[0]):
            raise DocumentError(
                f"{len(values)} values of {key!r} for {len(index[0])} points"
            )
        self._place_column(spec, index, self._check_column(spec, values))

    def put_values(self, name: str, index: Sequence[np.ndarray], values: Sequence[Any]) -> None:
        """Place values of the array ``name`` at the given points (one index
        array per scan dimension, one value per point): points moved from
        another layout of the stream (see ``_relayout``)."""
        spec = self.layout.arrays[name]
        self._place_column(spec, index, self._check_column(spec, values))

    def put_points(
        self, index: Sequence[np.ndarray], seq_nums: np.ndarray, times: np.ndarray
    ) -> None:
        """Record ``seq_num`` and ``time`` of points that no event describes.

        For streams whose data all come from ``stream_datum`` documents (a fly
        scan of an ophyd-async detector emits no events).
        """
        for name, values in (("seq_num", seq_nums), ("time", times)):
            spec = self.layout.arrays[name]
            self._place_column(spec, index, self._check_column(spec, list(values)))

    def _check_column(self, spec: ArraySpec, values: Sequence[Any]) -> list[np.ndarray]:
        sink = self.sinks.get(spec.name)
        if sink is None:
            return [np.asarray(v) for v in values]
        return [sink.check(v) for v in values]

    def _place_column(
        self, spec: ArraySpec, index: Sequence[np.ndarray], arrays: list[np.ndarray]
    ) -> None:
        sink = self.sinks.get(spec.name)
        if sink is None:
            if not arrays:
                return
            sink = self._create_pending(spec, arrays[0])
            arrays = [sink.check(a) for a in arrays]
        for i, value in enumerate(arrays):
            self.run.buffer.place(self, sink, tuple(int(ix[i]) for ix in index), value)

    def _set_coordinate(self, name: str, positions: np.ndarray, values: np.ndarray) -> None:
        with self.lock:
            current = self.coord_values[name]
            needed = int(positions.max()) + 1 if positions.size else 0
            if needed > current.shape[0]:
                grown = np.full(max(needed, 2 * current.shape[0]), np.nan)
                grown[: current.shape[0]] = current
                self.coord_values[name] = current = grown
            current[positions] = values

    # ----------------------------------------------------------------- blocks
    def _block_extent(
        self, sink: ArraySink, key: tuple[int, ...]
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Origin and scan shape of a block (clipped at the edges of the scan)."""
        origin = tuple(k * b for k, b in zip(key, sink.block_shape))
        if self.growing:
            return origin, sink.block_shape
        scan = tuple(min(b, s - o) for b, s, o in zip(sink.block_shape, self.scan_shape, origin))
        return origin, scan

    def block_layout(
        self, sink: ArraySink, key: tuple[int, ...]
    ) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype of the buffer of a block."""
        _, scan = self._block_extent(sink, key)
        dtype = sink.dtype if sink.dtype.kind not in "OU" else np.dtype(object)
        return scan + sink.frame_shape, dtype

    def new_block(self, sink: ArraySink, key: tuple[int, ...], data: np.ndarray) -> Block:
        """A block over ``data``, a buffer of :meth:`block_layout`. Its content
        is not cleared: points never received get the fill value in the
        worker, off the RunEngine's thread (see write_block)."""
        origin, scan = self._block_extent(sink, key)
        filled = np.zeros(scan, dtype=bool)
        return Block(origin, data, filled, 0, math.prod(scan), time.monotonic(), data.nbytes)

    def ensure_length(self, length: int) -> None:
        """Grow every array of a growing stream to ``length`` points."""
        with self.run.meta_lock:
            if length <= self.length:
                return
            metadata = self.run.metadata
            with self.lock:
                for sink in self.sinks.values():
                    sink.array = metadata.resize(sink.array, (length,) + sink.frame_shape)
                    mask = np.zeros(length, dtype=bool)
                    mask[: self.length] = self.on_disk[sink.name]
                    self.on_disk[sink.name] = mask
                self.written = metadata.resize(self.written, (length,))
                for name, array in self.coord_arrays.items():
                    self.coord_arrays[name] = metadata.resize(array, (length,))
                for dim, array in self.per_point_arrays.items():
                    self.per_point_arrays[dim] = metadata.resize(
                        array, (length,) + array.shape[1:]
                    )
                self.length = length
                self.scan_shape = (length,)
            metadata.consolidate()

    def mark_on_disk(self, sink: ArraySink, region: tuple[slice, ...], filled: np.ndarray) -> None:
        """``filled`` points of ``region`` of ``sink`` are on disk: the mask
        and the coordinates of the points that became complete are written.
        What to write is taken under ``self.lock``; the files are written
        under ``self.io_lock`` only, one worker at a time, each writing the
        newest state (so no older state is written over a newer one)."""
        with self.io_lock:
            updates: list[tuple[ArrayNode, tuple[slice, ...], np.ndarray]] = []
            with self.lock:
                self._note_written(sink.array, region)
                self.on_disk[sink.name][region] |= filled
                complete = not self.pending
                written = (
                    np.all([mask[region] for mask in self.on_disk.values()], axis=0) & complete
                )
                # Write the mask only when points became complete: most blocks
                # (scalars arriving before their frames) change nothing.
                if (written & filled).any():
                    updates.append((self.written, region, written))
                for name in self.coord_from_data:
                    array = self.coord_arrays[name]
                    axis = self.layout.scan_dims.index(self.layout.coords[name])
                    part = region[axis]
                    values = self.coord_values[name]
                    stop = min(part.stop, values.shape[0], array.shape[0])
                    if part.start < stop:
                        updates.append(
                            (array, (slice(part.start, stop),), values[part.start : stop].copy())
                        )
                for dim, array in self.per_point_arrays.items():
                    coordinate = self.frame_coords[dim]
                    updates.append(
                        (
                            array,
                            region + (slice(0, array.shape[-1]),),
                            coordinate.at_points(self._point_descriptors(region)),
                        )
                    )
            self._write_outside_lock(updates)

    def unmark(self, name: str, index: tuple[np.ndarray, ...]) -> None:
        """The points ``index`` of array ``name`` are no longer on disk (the
        detector file they reference lost them): off ``_written``."""
        if not index[0].size:
            return
        with self.io_lock:
            with self.lock:
                self.on_disk[name][index] = False
                region = tuple(slice(int(ix.min()), int(ix.max()) + 1) for ix in index)
                written = np.all([mask[region] for mask in self.on_disk.values()], axis=0)
                update = (self.written, region, written & (not self.pending))
            self._write_outside_lock([update])

    # ------------------------------------------------- external data's access
    def array_node(self, name: str) -> ArrayNode:
        """The array (node) of array ``name``."""
        return self.sinks[name].array

    def mark_referenced(self, name: str, region: tuple[slice, ...], filled: np.ndarray) -> None:
        """Points of array ``name`` referenced in place (virtual chunks) are on disk."""
        self.mark_on_disk(self.sinks[name], region, filled)

    def remake_array(
        self,
        name: str,
        sample: np.ndarray,
        *,
        chunks: tuple[int, ...],
        serializer: Mapping[str, Any],
        compressors: Sequence[Any],
    ) -> str | None:
        """Make array ``name`` anew with one point's frames a chunk and the
        codecs a detector's file stores its chunks with (for references to
        them); returns why not if its frames were placed before. The caller
        holds the run's buffer and metadata locks, and consolidates."""
        spec = self.layout.arrays[name]
        sink = self.sinks.get(name)
        if sink is None:
            sink = self._create_pending(spec, sample)
        if sink.blocks or sink.submitted or self.on_disk[name].any():
            return "frames of this key were copied before the first that can be referenced"
        old = sink.array
        array = self.run.metadata.add_array(
            f"{self.name}/{name}",
            shape=old.shape,
            dtype=old.dtype,
            chunks=chunks,
            shards=None,
            serializer=serializer,
            compressors=compressors,
            fill_value=fill_value_for(sink.dtype),
            dimension_names=old.metadata.dimension_names,
            attributes=dict(old.attrs),
        )
        self.sinks[name] = ArraySink(sink.spec, array, self.n_scan)
        return None

    def _update(self, array: ArrayNode, region: tuple[slice, ...], values: np.ndarray) -> None:
        """Write ``values`` over ``region`` of the mask or a coordinate (under
        ``self.lock``, as the stream is set up)."""
        self._unit_io(array).update(array, region, values)
        self._note_written(array, region)

    def _write_outside_lock(
        self, updates: Sequence[tuple[ArrayNode, tuple[slice, ...], np.ndarray]]
    ) -> None:
        """Write updates of the mask and coordinates (under ``self.io_lock``,
        not ``self.lock``), then note them for live readers."""
        for array, region, values in updates:
            self._unit_io(array).update(array, region, values)
        if updates:
            with self.lock:
                for array, region, _ in updates:
                    self._note_written(array, region)

    def _unit_io(self, array: ArrayNode) -> UnitIO:
        io = self._io.get(array.path)
        if io is None:
            io = self._io[array.path] = UnitIO(array)
        return io

    def _note_written(self, array: ArrayNode, region: tuple[slice, ...]) -> None:
        """Add ``region`` (whole along the dimensions it does not name) to
        what ``array`` had written since the last look (under ``self.lock``)."""
        shape = array.shape
        lo = [int(r.start) for r in region] + [0] * (len(shape) - len(region))
        hi = [int(r.stop) for r in region] + list(shape[len(region) :])
        known = self._written_regions.get(array.path)
        if known is not None:
            lo = [min(a, b) for a, b in zip(lo, known[1])]
            hi = [max(a, b) for a, b in zip(hi, known[2])]
        self._written_regions[array.path] = (array, lo, hi)

    def take_written_regions(self) -> list[tuple[ArrayNode, tuple[int, ...], tuple[int, ...]]]:
        """Each array written to since the last call, with the offset and shape
        of the region (bounding box) its writes covered: what a live reader
        (Tiled's subscribers) is told about."""
        with self.lock:
            regions, self._written_regions = self._written_regions, {}
        return [
            (array, tuple(lo), tuple(h - low for h, low in zip(hi, lo)))
            for array, lo, hi in regions.values()
        ]

    def summary(self) -> dict[str, Any]:
        """Counts for the stop record: points on disk in every array
        (``written_points``), and in every array but those whose frames stay
        in external files as references (``recorded_points``)."""
        referenced = {
            spec.name
            for spec in self.layout.arrays.values()
            if spec.external and self.run.options.external == "reference"
        }
        with self.lock:
            return {
                "shape": list(self.scan_shape),
                "written_points": self._count(set()),
                "recorded_points": self._count(referenced),
            }

    def _count(self, leave_out: set[str]) -> int:
        """Points on disk in every array but those in ``leave_out``."""
        if any(name not in leave_out for name in self.pending):
            return 0  # an array that has not been made yet holds nothing
        masks = [mask for name, mask in self.on_disk.items() if name not in leave_out]
        return int(np.all(masks, axis=0).sum()) if masks else 0
