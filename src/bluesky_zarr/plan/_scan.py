"""What a run's start document says about the shape of the experiment.

A :class:`ScanPlan` is the start document's *claim*: scan dimensions (names,
sizes, snaking, motors, initial setpoints), how the grid is walked (in raster
order, out of order, or not at all) and whether the document says which motor
steps which axis. :mod:`._geometry` checks the claim against the setpoints
each event carries, and learns what the document leaves open.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import DocumentError, OptionError, ScanIndexError
from ._names import sanitize_name
from ._validate import MAX_SCAN_POINTS, check_start, checked_shape

#: The dimension name of scans and streams that grow as events arrive.
TIME_DIM = "time"

@dataclass(frozen=True)
class ScanDim:
    """One scan dimension: its name, its size (``None`` while growing), the
    motors stepped along it and their planned setpoints (if known)."""

    name: str
    size: int | None
    motors: tuple[str, ...]
    setpoints: Mapping[str, np.ndarray]
    #: Whether the first motor's coordinate takes the dimension's name (and
    #: so indexes it); False where every motor is a plain coordinate (a
    #: dimension that grows with points in no order of any motor).
    indexed: bool = True


@dataclass(frozen=True)
class ScanPlan:
    """Scan geometry of one run, derived from its start document."""

    dims: tuple[ScanDim, ...]
    snaking: tuple[bool, ...]
    stream: str
    #: How the points are visited: ``"raster"`` (seq_num orders them, axes
    #: possibly snaked), ``"nonsequential"`` (a rectilinear grid visited out
    #: of order: the setpoints say where each point lies) or ``"growing"``.
    walk: str = "raster"
    #: Whether the document says which motor steps which axis and which axes
    #: snake (a bluesky grid plan does; a bare ``shape`` does not).
    described: bool = True
    #: ``extents`` of each dimension, as (start, stop) pairs, if given.
    extents: tuple[tuple[float, float], ...] | None = None
    #: Whether the plan moves relative to where the motors were (its extents
    #: then are relative too).
    relative: bool = False
    #: Every motor the document names (``motors`` and ``hints.dimensions``).
    motors: tuple[str, ...] = ()
    #: The user's names for the scan dimensions (``dims=``), if any.
    user_dims: tuple[str, ...] | None = None

    @property
    def shape(self) -> tuple[int, ...] | None:
        """The scan shape, or ``None`` for a scan that grows."""
        sizes = tuple(d.size for d in self.dims)
        if any(s is None for s in sizes):
            return None
        return sizes  # type: ignore[return-value]

    def index(self, seq_nums: np.ndarray) -> tuple[np.ndarray, ...]:
        """Map an array of ``seq_num`` values to index arrays, one per dimension.

        The frame measured at setpoint ``j`` lands at index ``j`` whatever the
        order of measurement: snaked axes are unfolded.
        """
        points = np.asarray(seq_nums, dtype=np.int64) - 1
        if points.size and points.min() < 0:
            raise ScanIndexError(
                f"seq_num must be >= 1, got {int(points.min()) + 1}"
            )
        shape = self.shape
        if shape is None:
            return (points,)
        total = math.prod(shape)
        if points.size and points.max() >= total:
            raise ScanIndexError(
                f"seq_num {int(points.max()) + 1} is beyond the scan shape "
                f"{shape} ({total} points)"
            )
        raw = np.unravel_index(points, shape)
        index = list(raw)
        for axis in range(1, len(shape)):
            if self.snaking[axis]:
                # Bluesky reverses an axis each time the axes outside it advance.
                outer = points // math.prod(shape[axis:])
                reverse = (outer % 2) == 1
                index[axis] = np.where(reverse, shape[axis] - 1 - raw[axis], raw[axis])
        return tuple(np.asarray(i, dtype=np.int64) for i in index)


#: Plan patterns whose points are visited in raster order (snaked or not).
RASTER_PATTERNS = {"outer_product", "outer_list_product"}


def _snake_axes(start: Mapping[str, Any], ndim: int) -> list[bool]:
    """Snaking from ``snake_axes`` (list_grid_scan records it, not ``snaking``)."""
    value = start.get("snake_axes")
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("true", "false"):
            value = text.lower() == "true"
        else:
            # A list of motors, recorded as the repr of the list.
            motors = list(start.get("motors") or [])
            if len(motors) == ndim:
                return [i > 0 and f"name='{m}'" in text for i, m in enumerate(motors)]
            return [False] * ndim
    if value is True:
        # All axes but the outermost snake, as bluesky's outer_list_product does.
        return [False] + [True] * (ndim - 1)
    if isinstance(value, (list, tuple)) and len(value) == ndim:
        return [bool(v) for v in value]
    return [False] * ndim


def _hinted_dimensions(start: Mapping[str, Any]) -> list[Any]:
    """``hints.dimensions`` (checked by :func:`check_start`), else ``[]``."""
    hints = start.get("hints")
    dimensions = hints.get("dimensions") if isinstance(hints, Mapping) else None
    return list(dimensions) if dimensions is not None else []


def _dimension_motors(start: Mapping[str, Any], stream: str) -> list[list[str]]:
    """Motor names per dimension, from ``hints.dimensions`` or ``motors``."""
    hinted = _hinted_dimensions(start)
    result = [list(fields) for fields, entry_stream in hinted if entry_stream == stream]
    if result:
        return result
    motors = start.get("motors")
    if motors:
        return [[m] for m in motors]
    return []


def primary_stream(start: Mapping[str, Any]) -> str:
    """The stream the scan dimensions apply to (``primary`` unless hinted)."""
    dimensions = _hinted_dimensions(start)
    return str(dimensions[0][1]) if dimensions else "primary"


def plan_scan(start: Mapping[str, Any], dims: Sequence[str] | None = None) -> ScanPlan:
    """Build the :class:`ScanPlan` of a run from its start document.

    Parameters
    ----------
    start
        The run's start document.
    dims
        Optional user names for the scan dimensions, overriding the motors'.
    """
    check_start(start)
    stream = primary_stream(start)
    motors_per_dim = _dimension_motors(start, stream)
    named = _named_motors(start, stream)
    shape_doc = start.get("shape")
    pattern = start.get("plan_pattern")
    hints = start.get("hints")
    gridding = hints.get("gridding") if isinstance(hints, Mapping) else None
    walk = "raster"
    if gridding == "rectilinear_nonsequential" and shape_doc is not None:
        # A square spiral: a rectilinear grid, visited out of order.
        walk = "nonsequential"
    elif shape_doc is not None and pattern is not None and pattern not in RASTER_PATTERNS:
        # e.g. bluesky's scan (inner_product): points in a line, appended.
        shape_doc = None
    described = True
    if shape_doc is not None:
        # Refused before anything is allocated for it (setpoints, masks).
        shape = checked_shape(
            "start['shape']", shape_doc, limit=MAX_SCAN_POINTS, total="scan points"
        )
        if not shape or any(s < 1 for s in shape):
            raise DocumentError(
                f"start['shape'] must hold positive integers, got {shape_doc!r}"
            )
        # The document says which motor steps which axis when a grid plan
        # wrote it (bluesky lists them in the plan's order); a bare shape
        # with motors listed in any order (scan_nd takes them from a set)
        # says only how many points each axis has.
        described = len(motors_per_dim) == len(shape) and (
            pattern in RASTER_PATTERNS
            or gridding in ("rectilinear", "rectilinear_nonsequential")
            or start.get("snaking") is not None
            or len(shape) == 1
        )
        if len(motors_per_dim) != len(shape):
            motors_per_dim = [[] for _ in shape]
        _check_one_dimension_per_motor(motors_per_dim)
        snaking_doc = start.get("snaking") or _snake_axes(start, len(shape))
        if len(snaking_doc) != len(shape):
            raise DocumentError(
                f"start['snaking'] has {len(snaking_doc)} entries but start['shape'] "
                f"has {len(shape)}"
            )
        snaking = tuple(bool(s) for s in snaking_doc)
        sizes: list[int | None] = list(shape)
    else:
        walk = "growing"
        # count, list_scan, scan, adaptive and fly scans: one growing dimension.
        if len(motors_per_dim) > 1:
            # Several motors stepped together, listed as separate entries:
            # bluesky builds those lists from a set (scan_nd's cycler keys), so
            # their order changes from one process to the next. Sorted, the
            # dimension is named after the same motor every time.
            motors_per_dim = [sorted({m for ms in motors_per_dim for m in ms})]
        if not motors_per_dim:
            motors_per_dim = [[]]
        snaking = (False,)
        sizes = [None]

    names = dimension_names(motors_per_dim, sizes, dims)
    extents = _extents(start, len(sizes)) if walk != "growing" else None
    relative = str(start.get("plan_name", "")).startswith("rel_")
    scan_dims = []
    for axis, (name, size, motors) in enumerate(zip(names, sizes, motors_per_dim)):
        motors = [m for m in motors if m != TIME_DIM]
        setpoints: dict[str, np.ndarray] = {}
        # Relative plans give extents relative to where the motors were:
        # their setpoints come from the events instead.
        if size is not None and extents is not None and not relative and len(motors) == 1:
            setpoints[motors[0]] = np.linspace(*extents[axis], size)
        scan_dims.append(ScanDim(name, size, tuple(motors), setpoints))
    return ScanPlan(
        tuple(scan_dims),
        snaking,
        stream,
        walk=walk,
        described=described,
        extents=extents,
        relative=relative,
        motors=tuple(named),
        user_dims=tuple(dims) if dims is not None else None,
    )


def _named_motors(start: Mapping[str, Any], stream: str) -> list[str]:
    """Every motor the start document names for ``stream``, without repeats."""
    named: list[str] = []
    for fields, entry_stream in _hinted_dimensions(start):
        if entry_stream == stream:
            named.extend(fields)
    named.extend(start.get("motors") or [])
    return [m for m in dict.fromkeys(named) if m != TIME_DIM]


def _extents(start: Mapping[str, Any], ndim: int) -> tuple[tuple[float, float], ...] | None:
    """``extents`` as (start, stop) pairs of floats, if there is one per dimension."""
    extents = start.get("extents")
    if extents is None or len(extents) != ndim:
        return None
    pairs = []
    for axis, pair in enumerate(extents):
        try:
            lo, hi = (float(v) for v in pair)
        except (TypeError, ValueError):
            raise DocumentError(
                f"start['extents'][{axis}] must be a (start, stop) pair, got {pair!r}"
            ) from None
        pairs.append((lo, hi))
    return tuple(pairs)


def dimension_names(
    motors_per_dim: Sequence[Sequence[str]],
    sizes: Sequence[int | None],
    dims: Sequence[str] | None,
) -> list[str]:
    """Scan dimension names: the user's ``dims``, else each dimension's first
    motor (sanitised), ``time`` for one that grows, ``dim_<n>`` otherwise."""
    if dims is not None:
        if isinstance(dims, str) or len(dims) != len(sizes):
            raise OptionError(
                f"dims= must name each of the {len(sizes)} scan dimension(s) of this "
                f"run, got {dims!r}"
            )
        names = [str(d) for d in dims]
        for name in names:
            if not name or sanitize_name(name) != name:
                raise OptionError(
                    f"dims= names must be non-empty and use only letters, digits and "
                    f"'._+-', got {name!r}"
                )
    else:
        names = []
        for axis, motors in enumerate(motors_per_dim):
            if motors:
                names.append(sanitize_name(motors[0]) or f"dim_{axis}")
            elif sizes[axis] is None:
                names.append(TIME_DIM)
            else:
                names.append(f"dim_{axis}")
        # Distinct motors whose names sanitise alike (``m:1``, ``m_1``) or
        # that look like a numbered dimension: later ones get a suffix.
        for axis, name in enumerate(names):
            while name in names[:axis]:
                name += "_"
            names[axis] = name
    if len(set(names)) != len(names):
        raise OptionError(f"scan dimension names must be distinct, got {names!r}")
    return names


def _check_one_dimension_per_motor(motors_per_dim: Sequence[Sequence[str]]) -> None:
    """Refuse a start document that has one motor step two scan dimensions."""
    axis_of: dict[str, int] = {}
    for axis, motors in enumerate(motors_per_dim):
        for motor in motors:
            if axis_of.setdefault(motor, axis) != axis:
                raise DocumentError(
                    f"the start document's hints.dimensions (or motors) name the motor "
                    f"{motor!r} for scan dimensions {axis_of[motor]} and {axis}; each "
                    f"motor steps one dimension, got {[list(m) for m in motors_per_dim]!r}"
                )
