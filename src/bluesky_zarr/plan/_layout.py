"""How a descriptor becomes arrays: names, dtypes, dimensions and chunking."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._errors import DocumentError, OptionError
from ._conventions import TIME_ATTRIBUTES, data_key_attributes
from ._names import sanitize_name
from ._scan import ScanDim
from ._validate import MAX_FRAME_ELEMENTS, check_descriptor, check_dtype, checked_shape

#: Names of the arrays every stream group carries besides its data keys.
RESERVED = ("time", "seq_num", "_written")

#: Default size target of a shard (bytes): large enough for efficient writes
#: (a few frames of 2048×2048), small enough that the buffer holding it stays
#: modest and that the RunEngine, when the writing falls behind, waits for one
#: shard's write (tens of milliseconds), not a much larger one's.
DEFAULT_SHARD_BYTES = 32 * 2**20

#: Points per chunk along a growing dimension when no frame sets it.
DEFAULT_GROWING_CHUNK = 1024


def numpy_dtype(key: str, data_key: Mapping[str, Any]) -> np.dtype | None:
    """The numpy dtype of a data key; ``None`` when only the data can tell.

    An explicit ``dtype_numpy`` is exact (and refused with
    :class:`DataTypeError` when no Zarr V3 array can hold it). A bare JSON
    ``dtype`` is only what the device guessed from its value when it was
    described (ophyd says ``integer`` for a motor sitting at ``0``, which
    reads ``2.5`` later), so ``integer`` and ``number`` are both stored as
    float64: every value such a key sends fits (integers exactly up to 2**53).
    """
    declared = data_key.get("dtype_numpy")
    if declared:  # a string or a list of pairs (see check_descriptor); "" is none
        try:
            if isinstance(declared, str):
                dtype = np.dtype(declared)
            else:
                dtype = np.dtype([tuple(f) for f in declared])
        except (TypeError, ValueError):
            raise DocumentError(
                f"data key {key!r}: dtype_numpy {declared!r} is not a numpy dtype"
            ) from None
        if dtype.kind == "S" and data_key.get("dtype") == "string":
            # Text of a bounded width (ophyd-async's EPICS strings and enums
            # say "|S40"): the values come as str, and are stored as strings.
            return np.dtype(f"<U{max(1, dtype.itemsize)}")
        check_dtype(key, dtype, fill_value_for(dtype))
        return dtype
    kind = data_key.get("dtype")
    if kind in ("number", "integer"):
        return np.dtype("float64")
    if kind == "boolean":
        return np.dtype("bool")
    if kind == "string":
        return np.dtype("O")
    if kind == "array":
        return None
    raise DocumentError(
        f"data key {key!r}: dtype must be one of number, integer, boolean, string, "
        f"array, got {kind!r}"
    )


def fill_value_for(dtype: np.dtype) -> Any:
    """NaN for floats (unmeasured points are visibly missing), else zero-like."""
    if dtype.kind in "fc":
        return np.nan
    if dtype.kind == "b":
        return False
    if dtype.kind in "OUS":
        return ""
    if dtype.kind == "V":
        # Raw bytes and structured values: all bytes zero.
        return np.zeros((), dtype)[()]
    return 0


def frame_shape(key: str, data_key: Mapping[str, Any]) -> tuple[int, ...] | None:
    """The per-point shape of a data key; ``None`` when only the data can tell.

    A frame of more than :data:`MAX_FRAME_ELEMENTS` elements is refused here,
    before anything is allocated for it.
    """
    shape = data_key.get("shape", [])
    if shape is None:
        return None
    if isinstance(shape, (list, tuple)) and any(s is None for s in shape):
        return None
    return checked_shape(
        f"data key {key!r}: shape", shape, limit=MAX_FRAME_ELEMENTS, total="elements per frame"
    )


def frame_dim_names(key: str, data_key: Mapping[str, Any], ndim: int) -> list[str]:
    """Frame dimension names: the data key's ``dims``, else y/x, else numbered."""
    dims = data_key.get("dims")
    if dims and len(dims) == ndim:
        return [sanitize_name(d) or f"{key}_dim_{n}" for n, d in enumerate(dims)]
    if ndim == 2:
        return ["y", "x"]
    return [f"{sanitize_name(key)}_dim_{n}" for n in range(ndim)]


@dataclass
class ArraySpec:
    """One array of a stream group, before it is created."""

    name: str
    key: str | None  # the data key it stores, None for time/seq_num
    dtype: np.dtype | None
    frame_shape: tuple[int, ...] | None
    frame_dims: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    #: The data key's ``external`` field (e.g. ``"STREAM:"``), if any.
    external: str | None = None

    @property
    def ready(self) -> bool:
        """Whether dtype and shape are known (else the first event decides)."""
        return self.dtype is not None and self.frame_shape is not None


@dataclass
class StreamLayout:
    """The arrays of one stream group and the dimensions they share."""

    name: str
    scan_dims: list[str]
    scan_sizes: list[int | None]
    arrays: dict[str, ArraySpec]
    dim_sizes: dict[str, int | None]
    coords: dict[str, str]  # coordinate name -> scan dimension
    coord_sources: dict[str, str]  # coordinate name -> data key giving values
    coord_motors: dict[str, str] = field(default_factory=dict)  # coordinate -> motor
    #: The scan dimensions the user's chunks= / shards= were written for
    #: (the grid the start document claims), where the stream is laid out
    #: otherwise (the fallback): see :meth:`fit_chunking`.
    claimed_scan_ndim: int | None = None

    @property
    def growing(self) -> bool:
        return any(s is None for s in self.scan_sizes)

    def fit_chunking(self, value: Sequence[int] | None, frame_ndim: int) -> Any:
        """A user's chunks or shards, given for the claimed grid, over this
        layout's one growing dimension: the grid's scan part folded into one
        (``(10, 1, 512, 512)`` becomes ``(10, 512, 512)``). A stream that
        fell back is not refused for options that fitted its claim."""
        claimed = self.claimed_scan_ndim
        if (
            value is None
            or claimed is None
            or claimed == len(self.scan_dims)
            or len(value) != claimed + frame_ndim
        ):
            return value
        scan = math.prod(int(v) for v in value[:claimed])
        return (scan, *value[claimed:])

    def _clashes(self, name: str, size: int) -> bool:
        return name in self.scan_dims or (
            name in self.dim_sizes and self.dim_sizes[name] != size
        )

    def claim_frame_dims(self, spec: ArraySpec) -> None:
        """Give ``spec`` frame dimension names that do not clash in size."""
        assert spec.frame_shape is not None
        names = []
        for name, size in zip(spec.frame_dims, spec.frame_shape):
            # A frame dimension never shares a name with a scan dimension
            # (one array cannot have a dimension twice), nor with another
            # frame dimension of another size.
            if self._clashes(name, size):
                name = f"{sanitize_name(spec.key or spec.name)}_{name}"
            while self._clashes(name, size):
                name = f"{name}_"
            self.dim_sizes[name] = size
            names.append(name)
        spec.frame_dims = names


def plan_stream(
    scan: Sequence[ScanDim],
    descriptor: Mapping[str, Any],
) -> StreamLayout:
    """Lay out the group of one stream from its descriptor, over the scan
    dimensions ``scan`` (see :class:`~._geometry.StreamGeometry`).

    Array names are distinct even where case is not (``Time`` beside the
    writer's own ``time``, ``Det`` beside ``det``): a store copied to a file
    system that ignores case keeps every array.
    """
    check_descriptor(descriptor)
    stream = str(descriptor.get("name", "primary"))
    data_keys = descriptor["data_keys"]
    scan_dims = [d.name for d in scan]
    scan_sizes = [d.size for d in scan]
    layout = StreamLayout(
        name=stream,
        scan_dims=scan_dims,
        scan_sizes=scan_sizes,
        arrays={},
        dim_sizes=dict(zip(scan_dims, scan_sizes)),
        coords={},
        coord_sources={},
    )
    taken = _Names(RESERVED)
    # Coordinates: each motor's setpoints along its dimension.
    for dim in scan:
        for n, motor in enumerate(dim.motors):
            # The first motor's setpoints index the dimension, so they take
            # its name (which differs from the motor's when the user names it).
            name = dim.name if n == 0 and dim.indexed else sanitize_name(motor)
            if not name or name in taken:
                continue
            taken.add(name)
            source = None
            for candidate in (f"{motor}_setpoint", f"{motor}_user_setpoint",
                              f"{motor}-user_setpoint", motor):
                if candidate in data_keys:
                    source = candidate
                    break
            layout.coords[name] = dim.name
            layout.coord_motors[name] = motor
            if source is not None:
                layout.coord_sources[name] = source
    for dim_name in scan_dims:
        taken.add(dim_name)
    for key, data_key in data_keys.items():
        name = sanitize_name(key) or "data"
        if name in layout.coords or name in scan_dims:
            # xarray needs a variable named like a dimension to be its index:
            # readbacks of scanned motors take another name.
            name = f"{name}_readback"
        while name in taken:  # (one array per name whatever its case)
            name = f"{name}_"
        taken.add(name)
        shape = frame_shape(key, data_key)
        dtype = numpy_dtype(key, data_key)
        frame_dims = frame_dim_names(key, data_key, len(shape) if shape else 0)
        attrs: dict[str, Any] = {"data_key": key}
        for field_name in ("units", "source", "precision", "object_name"):
            if data_key.get(field_name) is not None:
                attrs[field_name] = data_key[field_name]
        attrs.update(data_key_attributes(data_key))
        spec = ArraySpec(name, key, dtype, shape, frame_dims, attrs)
        if data_key.get("external"):
            spec.external = str(data_key["external"])
        if shape is not None:
            layout.claim_frame_dims(spec)
        layout.arrays[name] = spec
    for name in ("time", "seq_num"):
        dtype = np.dtype("float64") if name == "time" else np.dtype("int64")
        spec = ArraySpec(name, None, dtype, (), [])
        if name == "time":
            # CF: xarray decodes it to dates; the values stay float seconds.
            spec.attrs.update(TIME_ATTRIBUTES)
        layout.arrays[name] = spec
    return layout


class _Names:
    """Names taken in one group, compared without case (as macOS and
    Windows compare file names)."""

    def __init__(self, names: Sequence[str] = ()) -> None:
        self._folded = {n.casefold() for n in names}

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.casefold() in self._folded

    def add(self, name: str) -> None:
        self._folded.add(name.casefold())


def default_chunking(
    layout: StreamLayout,
    spec: ArraySpec,
    shard_bytes: int,
) -> tuple[tuple[int, ...], tuple[int, ...] | None, tuple[int, ...]]:
    """Default chunks, shards and write blocks (over the scan dimensions).

    A chunk is one frame. The frames that arrive in a row along the innermost
    scan dimension (up to ``shard_bytes``) form one write block and one
    shard: written in one go, as one file, when the row is complete. A frame
    of ``shard_bytes`` or more is a file of its own.
    """
    assert spec.frame_shape is not None and spec.dtype is not None
    n_scan = len(layout.scan_dims)
    inner = layout.scan_sizes[-1]
    frame_bytes = math.prod(spec.frame_shape) * spec.dtype.itemsize
    if spec.frame_shape and frame_bytes > 0:
        per_row = max(1, shard_bytes // frame_bytes)
        per_row = min(per_row, inner) if inner is not None else min(per_row, 1000)
        chunks = (1,) * n_scan + spec.frame_shape
        block = (1,) * (n_scan - 1) + (per_row,)
        # zarr-python's sharding codec cannot hold structured values (it
        # hashes the fill value, an unhashable numpy void): plain chunks.
        if per_row > 1 and spec.dtype.fields is None:
            return chunks, block + spec.frame_shape, block
        return chunks, None, block
    # Scalars: one chunk per run of points as long as the frames' blocks, so
    # a point's scalars reach the disk when its frames do.
    run = row_length(layout, shard_bytes)
    block = (1,) * (n_scan - 1) + (run,)
    return block + spec.frame_shape, None, block


def row_length(layout: StreamLayout, shard_bytes: int) -> int:
    """Points in a row of the innermost dimension that scalars chunk by."""
    inner = layout.scan_sizes[-1]
    runs = []
    for spec in layout.arrays.values():
        if spec.ready and spec.frame_shape:
            assert spec.frame_shape is not None and spec.dtype is not None
            frame_bytes = math.prod(spec.frame_shape) * spec.dtype.itemsize
            if frame_bytes:
                runs.append(max(1, shard_bytes // frame_bytes))
    if inner is None:
        return min(min(runs), 1000) if runs else DEFAULT_GROWING_CHUNK
    return min(min(runs), inner) if runs else inner


def check_chunking(
    name: str,
    ndim: int,
    chunks: Sequence[int] | None,
    shards: Sequence[int] | None,
) -> None:
    """Raise :class:`OptionError` for chunks/shards that do not fit an array."""
    for label, value in (("chunks", chunks), ("shards", shards)):
        if value is None:
            continue
        if len(value) != ndim or any(int(v) < 1 for v in value):
            raise OptionError(
                f"{label} for {name!r} must be {ndim} positive integers (scan "
                f"dimensions then frame dimensions), got {tuple(value)!r}"
            )
    if chunks is not None and shards is not None:
        if any(s % c for s, c in zip(shards, chunks)):
            raise OptionError(
                f"shards for {name!r} must be multiples of its chunks, got "
                f"shards={tuple(shards)!r} chunks={tuple(chunks)!r}"
            )
