"""Where each point of the scanned stream lies, proved by its setpoints.

The start document *claims* a grid (:class:`~._plan.ScanPlan`); the events
carry the positions the motors were sent to. :class:`StreamGeometry` checks
every event against the coordinate at the index the grid gives it, and
learns from the positions what the document leaves open:

* which motor steps which axis (the one that changes from one point to the
  next is innermost; a motor that never moves goes with the outermost axis),
* the values along each axis (each index's value is the first position seen
  there; every later point at that index must agree),
* whether each axis reverses when the axes outside it step (snaking), on
  inner and outer axes alike, decided at the first point where it matters,
* for a rectilinear grid visited out of order (a square spiral), the cell of
  each point from its positions and the grid the ``extents`` span.

Until the positions have shown which motor steps which axis the stream is
*pending* (its documents are held, nothing is placed); a contradiction
after points were placed asks for a relayout; a grid that the positions
cannot prove, or that they contradict, becomes one growing dimension with
every motor as a coordinate (the fallback). What was decided, and from what,
is :meth:`StreamGeometry.record`.

Pure: no I/O, no threads. The check costs a few microseconds per event.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import ScanIndexError
from ._scan import TIME_DIM, ScanDim, ScanPlan, dimension_names

#: Data keys that hold a motor's setpoint, after the motor's name: ophyd's
#: ``m_setpoint``, EPICS motors' ``m_user_setpoint``, ophyd-async's
#: ``m-user_setpoint``. Otherwise the motor's own key (its readback) is used.
SETPOINT_SUFFIXES = ("_setpoint", "_user_setpoint", "-user_setpoint", "-setpoint")

#: Agreement asked of setpoints (exact values the plan sent, computed once
#: per axis), as a fraction of the axis's step.
SETPOINT_TOLERANCE = 1e-6

#: Agreement asked of readbacks, as a fraction of the axis's step: a quarter
#: step still tells each index from its neighbours.
READBACK_TOLERANCE = 0.25

#: Agreement asked where no step is known yet, relative to the value.
EXACT = 1e-9

#: What :meth:`StreamGeometry.observe` says about a page of events.
OK = "ok"
DECIDED = "decided"  # a pending stream's geometry is now known
RELAYOUT = "relayout"  # placed points contradict the grid: it fell back

#: The group attribute holding the decision (see StreamGeometry.record).
GEOMETRY_ATTRIBUTE = "bluesky_zarr_geometry"


@dataclass(frozen=True)
class MotorSource:
    """Where a motor's position is in the events of a stream."""

    motor: str
    key: str
    #: Whether ``key`` is a setpoint (else a readback).
    setpoint: bool
    #: The smallest tolerance: half the readback's declared precision.
    floor: float


def motor_sources(motors: Sequence[str], data_keys: Mapping[str, Any]) -> list[MotorSource]:
    """The motors among ``motors`` whose positions the stream carries, in the
    order the descriptor lists their keys (the order the plan reads them,
    the same in every process)."""
    order = {key: n for n, key in enumerate(data_keys)}
    sources = []
    for motor in motors:
        key = next((motor + s for s in SETPOINT_SUFFIXES if motor + s in data_keys), None)
        setpoint = key is not None
        if key is None and motor in data_keys:
            key = motor
        if key is None:
            continue
        data_key = data_keys[key]
        if isinstance(data_key, Mapping) and data_key.get("shape") not in (None, [], ()):
            continue  # not a position: an array
        floor = 0.0
        precision = data_keys.get(motor, {}).get("precision") if not setpoint else None
        if isinstance(precision, int) and not isinstance(precision, bool) and 0 <= precision < 16:
            floor = 0.5 * 10.0**-precision
        sources.append(MotorSource(motor, key, setpoint, floor))
    sources.sort(key=lambda s: order[s.key])
    return sources


class GridMap:
    """How a grid placed its points: the seq_num at any index of it."""

    def __init__(
        self, shape: tuple[int, ...], snake: Sequence[bool | None], cells: np.ndarray | None
    ) -> None:
        self.shape = shape
        self.snake = [bool(s) for s in snake]
        #: Out-of-order grids: the seq_num held by each cell (0: none).
        self.cells = cells

    def seq_at(self, index: Sequence[np.ndarray]) -> np.ndarray:
        """The seq_num of the point at each index (one array per axis)."""
        if self.cells is not None:
            return self.cells[tuple(index)].astype(np.int64)
        flat = np.zeros(len(index[0]), dtype=np.int64)
        for axis, size in enumerate(self.shape):
            raw = np.asarray(index[axis], dtype=np.int64)
            if axis and self.snake[axis]:
                raw = np.where(flat % 2 == 1, size - 1 - raw, raw)
            flat = flat * size + raw
        return flat + 1


class StreamGeometry:
    """The grid of one stream: claimed by the start document, proved by the
    positions its events carry (see the module's docstring)."""

    def __init__(self, plan: ScanPlan, stream: str, data_keys: Mapping[str, Any]) -> None:
        self.plan = plan
        self.stream = stream
        scanned = stream == plan.stream
        self.shape: tuple[int, ...] | None = plan.shape if scanned else None
        shape = self.shape or ()
        #: Points between steps of each axis, and in one sweep of it.
        self._strides = [math.prod(shape[a + 1 :]) for a in range(len(shape))]
        self._sweeps = [math.prod(shape[a:]) for a in range(len(shape))]
        self._total = math.prod(shape)
        self.walk = plan.walk if scanned else "growing"
        self.sources = motor_sources(plan.motors, data_keys) if scanned else []
        self._column = {s.motor: j for j, s in enumerate(self.sources)}
        self.status = "pending"
        self.dims: tuple[ScanDim, ...] = plan.dims if scanned else (
            ScanDim(TIME_DIM, None, (), {}),
        )
        self.source = "metadata"
        self.reason = ""
        #: How the grid placed points before it fell back (for the relayout).
        self.previous: GridMap | None = None
        self.checked = 0
        self._notes: list[str] = []
        # Positions seen while the geometry is learned: point -> row.
        self._history: dict[int, list[float]] = {}
        n = len(self.sources)
        self._axis_of = [-1] * n
        self._coords: list[np.ndarray] = [np.empty(0)] * n
        self._step = [0.0] * n
        self._on_axis: list[list[int]] = []
        self._checks: list[tuple[int, int]] = []
        self.snake: list[bool | None] = []
        self._cells: np.ndarray | None = None
        self._cell_of: np.ndarray | None = None
        self._lattice: list[tuple[float, float]] = []
        if not scanned:
            self._decide("growing", "metadata", "a stream of its own: points appended in time")
        elif self.walk == "growing":
            self._decide(
                "growing", "metadata",
                "the start document gives no grid (no shape, or points in a line): "
                "one dimension that grows",
            )
        elif self.walk == "nonsequential":
            self._start_nonsequential()
        else:
            self._start_raster()

    # -------------------------------------------------------------- queries
    @property
    def decided(self) -> bool:
        return self.status != "pending"

    @property
    def gridded(self) -> bool:
        """Whether points are placed on a grid of fixed shape."""
        return self.status == "grid"

    @property
    def sequential(self) -> bool:
        """Whether seq_num says where each point lies (else its positions do)."""
        return self.walk != "nonsequential" or self.status != "grid"

    def index(self, seq_nums: np.ndarray) -> tuple[np.ndarray, ...] | None:
        """Index arrays (one per dimension) of the points ``seq_nums`` name,
        or None while any of them cannot be placed yet (the stream is
        pending, or an event has still to show its position)."""
        points = np.asarray(seq_nums, dtype=np.int64) - 1
        if points.size and points.min() < 0:
            raise ScanIndexError(f"seq_num must be >= 1, got {int(points.min()) + 1}")
        if self.status == "pending":
            return None
        if self.status != "grid":
            return (points,)
        assert self.shape is not None
        self._check_range(points)
        if points.size == 1 and self._cell_of is None:
            # One event (as the RunEngine sends them): plain arithmetic.
            point = self._raster_point(int(points[0]))
            if point is None:
                return None
            return tuple(np.array([i], dtype=np.int64) for i in point)
        if self._cell_of is not None:
            flat = self._cell_of[points]
            if (flat < 0).any():
                return None
            return tuple(np.asarray(i, dtype=np.int64) for i in np.unravel_index(flat, self.shape))
        raw = np.unravel_index(points, self.shape)
        index = list(raw)
        for axis in range(1, len(self.shape)):
            reverse = (points // math.prod(self.shape[axis:])) % 2 == 1
            snake = self.snake[axis]
            if snake is None:
                if reverse.any():
                    return None
                continue
            if snake:
                index[axis] = np.where(reverse, self.shape[axis] - 1 - raw[axis], raw[axis])
        return tuple(np.asarray(i, dtype=np.int64) for i in index)

    def coordinates(self) -> dict[str, np.ndarray]:
        """The values along each axis learned so far, by motor (NaN unknown)."""
        return {
            s.motor: self._coords[j].copy()
            for j, s in enumerate(self.sources)
            if self._axis_of[j] >= 0 and self._coords[j].size
        }

    def record(self) -> dict[str, Any]:
        """The decision and its evidence, JSON-safe, for the group's attributes."""
        plan = self.plan
        record: dict[str, Any] = {
            "source": self.source,
            "reason": self.reason,
            "status": self.status,
            "walk": self.walk if self.status == "grid" else "growing",
            "dims": [d.name for d in self.dims],
            "shape": [d.size for d in self.dims],
            "motors": {d.name: list(d.motors) for d in self.dims},
            "positions": {s.motor: s.key for s in self.sources},
            "points_checked": self.checked,
            "claimed": {
                "shape": list(plan.shape) if plan.shape else None,
                "dims": [d.name for d in plan.dims],
                "described": plan.described,
            },
        }
        if self.status == "grid":
            record["snaking"] = list(self.snake)
        if self._notes:
            record["notes"] = list(self._notes)
        if self.previous is not None:
            record["relayout"] = True
        return record

    # --------------------------------------------------------------- events
    def observe(self, seq_nums: np.ndarray, data: Mapping[str, Any]) -> str:
        """Check (or learn from) the positions of a page of events.

        Returns :data:`OK`, :data:`DECIDED` (a pending stream's geometry is
        now known: place what was held) or :data:`RELAYOUT` (the grid is
        contradicted by points already placed: it fell back, and they must
        move). Raises :class:`ScanIndexError` for a seq_num beyond the
        claimed grid, before anything is learned from the page.
        """
        if self.status in ("growing", "fallback") or not self.sources:
            return OK
        points = [int(s) - 1 for s in seq_nums]
        if points and min(points) < 0:
            raise ScanIndexError(f"seq_num must be >= 1, got {min(points) + 1}")
        if self.walk == "raster" and points and max(points) >= self._total:
            self._check_range(np.asarray(points))
        rows = self._rows(data, len(points))
        if self.status == "pending":
            for p, row in zip(points, rows):
                self._history[p] = row
            self._try_decide()
            return DECIDED if self.decided else OK
        for p, row in zip(points, rows):
            reason = self._check_point(p, row)
            if reason is not None:
                self._fall_back(reason, placed=True)
                return RELAYOUT
        return OK

    def finish(self) -> None:
        """The stream ends: decide a pending geometry from what came."""
        if self.status == "pending":
            self._fall_back(
                f"the run ended after {len(self._history)} point(s), before the positions "
                f"could show how the points lie on the claimed shape "
                f"{list(self.shape or ())}"
            )

    # ------------------------------------------------------------ internals
    def _rows(self, data: Mapping[str, Any], n: int) -> list[list[float]]:
        rows = [[math.nan] * len(self.sources) for _ in range(n)]
        for j, source in enumerate(self.sources):
            column = data.get(source.key)
            if column is None:
                continue
            for i in range(min(n, len(column))):
                try:
                    rows[i][j] = float(column[i])
                except (TypeError, ValueError):
                    pass  # not a position: refused where the value is stored
        return rows

    def _check_range(self, points: np.ndarray) -> None:
        assert self.shape is not None
        total = math.prod(self.shape)
        if points.size and points.max() >= total:
            raise ScanIndexError(
                f"seq_num {int(points.max()) + 1} is beyond the scan shape "
                f"{tuple(self.shape)} ({total} points)"
            )

    def _decide(self, status: str, source: str, reason: str) -> None:
        self.status = status
        self.source = source
        self.reason = reason
        self._history.clear()

    def _fall_back(self, reason: str, placed: bool = False) -> None:
        """Give up the grid: one growing dimension, every motor a coordinate.
        ``placed``: points were placed on the grid (they must move)."""
        if placed and self.status == "grid":
            assert self.shape is not None
            self.previous = GridMap(self.shape, self.snake, self._cells)
        motors = tuple(s.motor for s in self.sources)
        self.dims = (ScanDim(TIME_DIM, None, motors, {}, indexed=False),)
        self._cells = self._cell_of = None
        self._decide("fallback", "fallback", reason)

    def _tolerance(self, j: int, value: float, step: float | None = None) -> float:
        source = self.sources[j]
        step = abs(self._step[j] if step is None else step)
        if step > 0:
            fraction = SETPOINT_TOLERANCE if source.setpoint else READBACK_TOLERANCE
            return max(fraction * step, source.floor, EXACT * max(1.0, abs(value)))
        # No step to measure against yet: a readback may stray by half its
        # declared precision (else it must repeat exactly, as a setpoint).
        return max(source.floor, EXACT * max(1.0, abs(value)))

    def _learn(self, j: int, i: int, value: float) -> None:
        coords = self._coords[j]
        coords[i] = value
        gaps = np.abs(coords - value)
        gaps = gaps[gaps > EXACT * max(1.0, abs(value))]
        if gaps.size:
            smallest = float(gaps.min())
            if self._step[j] == 0.0 or smallest < self._step[j]:
                self._step[j] = smallest

    def _grid(self, source: str, reason: str, axes: Sequence[Sequence[int]]) -> None:
        """Decide a grid whose axis ``a`` carries the motor columns ``axes[a]``."""
        assert self.shape is not None
        self._on_axis = [list(columns) for columns in axes]
        for axis, columns in enumerate(self._on_axis):
            for j in columns:
                self._axis_of[j] = axis
                self._coords[j] = np.full(self.shape[axis], np.nan)
        self._checks = [(j, a) for j, a in enumerate(self._axis_of) if a >= 0]
        self.status = "grid"
        self.source = source
        self.reason = reason

    def _name_dims(self, axes: Sequence[Sequence[int]]) -> None:
        assert self.shape is not None
        motors = [[self.sources[j].motor for j in columns] for columns in axes]
        names = dimension_names(motors, list(self.shape), self.plan.user_dims)
        self.dims = tuple(
            ScanDim(name, size, tuple(m), {}) for name, size, m in zip(names, self.shape, motors)
        )

    # ------------------------------------------------------------- raster
    def _start_raster(self) -> None:
        assert self.shape is not None
        plan = self.plan
        k = len(self.shape)
        self.snake = [bool(s) for s in plan.snaking] if plan.described else [None] * k
        self.snake[0] = False  # nothing outside the outermost axis steps
        for axis, size in enumerate(self.shape):
            if size == 1:
                self.snake[axis] = False
        if k == 1:
            if plan.described and plan.dims[0].motors:
                columns = [self._column[m] for m in plan.dims[0].motors if m in self._column]
                self._grid("metadata", "one dimension: seq_num orders the points", [columns])
            elif self.sources:
                columns = list(range(len(self.sources)))
                self._grid(
                    "setpoints",
                    "one dimension: seq_num orders the points; named after the first "
                    "motor the events carry",
                    [columns],
                )
                self._name_dims([columns])
            else:
                self._grid("metadata", "one dimension: seq_num orders the points", [[]])
            return
        if plan.described:
            axes = [[self._column[m] for m in d.motors if m in self._column] for d in plan.dims]
            self._grid(
                "metadata",
                "the start document describes the grid (shape, motors per axis, snaking); "
                "every point is checked against its positions"
                if self.sources else
                "the start document describes the grid; the events carry no motor "
                "positions to check it against",
                axes,
            )
            return
        if not self.sources:
            self._fall_back(
                f"the start document gives the shape {list(self.shape)} but not which motor "
                f"steps which axis, and the events carry no motor positions to show it"
            )

    def _raster_index(self, p: int, axis: int, snake: bool) -> int:
        assert self.shape is not None
        size = self.shape[axis]
        raw = (p // self._strides[axis]) % size
        if snake and (p // self._sweeps[axis]) % 2:
            return size - 1 - raw
        return raw

    def _raster_point(self, p: int) -> list[int] | None:
        """The index of point ``p`` of a raster grid; None while an axis
        whose snaking no event has shown yet would reverse there."""
        assert self.shape is not None
        index = []
        for axis, size in enumerate(self.shape):
            i = (p // self._strides[axis]) % size
            if axis and (p // self._sweeps[axis]) % 2:
                snake = self.snake[axis]
                if snake is None:
                    return None
                if snake:
                    i = size - 1 - i
            index.append(i)
        return index

    def _try_decide(self) -> None:
        if self.walk == "nonsequential":
            self._try_anchor()
            return
        assert self.shape is not None
        k = len(self.shape)
        # Axis 1 steps for the first time at this point: by then every axis
        # inside it has stepped too, and only the outermost is still unseen.
        # (Or the grid's last point, for a grid smaller than that.)
        last = min(math.prod(self.shape[2:]), math.prod(self.shape) - 1)
        if any(p not in self._history for p in range(last + 1)):
            return
        points = range(last + 1)
        values = np.array([self._history[p] for p in range(last + 1)], dtype=float)
        fits: list[dict[int, list[bool]]] = []
        for j in range(len(self.sources)):
            options: dict[int, list[bool]] = {}
            for axis in range(k):
                choices = [False, True] if self.snake[axis] is None else [bool(self.snake[axis])]
                good = [
                    s for s in choices
                    if self._fits(
                        j, values[:, j], [self._raster_index(p, axis, s) for p in points]
                    )
                ]
                if good:
                    options[axis] = good
            fits.append(options)
        axes: list[list[int]] = [[] for _ in range(k)]
        still: list[int] = []
        for j, options in enumerate(fits):
            motor = self.sources[j].motor
            if not options:
                self._fall_back(
                    f"{motor} ({self.sources[j].key}) changes in a way no axis of the claimed "
                    f"shape {list(self.shape)} explains"
                )
                return
            if len(options) == k:
                still.append(j)  # has not moved: the outermost axis, or one of size 1
            elif len(options) == 1:
                axes[next(iter(options))].append(j)
            else:
                self._fall_back(
                    f"{motor} fits several axes ({sorted(options)}) of the claimed shape "
                    f"{list(self.shape)}"
                )
                return
        # Motors that have not moved go, in the order the events list them
        # (the plan's order, outermost first), to the axes no moving motor
        # took: the outermost (which has not stepped yet) and those of size 1.
        # Any left over go with the outermost axis.
        free = [axis for axis in range(k) if not axes[axis]]
        for j, axis in zip(still, free):
            axes[axis].append(j)
        for j in still[len(free):]:
            axes[0].append(j)
            self._notes.append(
                f"{self.sources[j].motor} did not move before the outermost axis stepped"
            )
        for axis in range(2, k):
            if self.snake[axis] is not None:
                continue
            agreed = {False, True}
            for j in axes[axis]:
                agreed &= set(fits[j][axis])
            if not agreed:
                self._fall_back(f"the motors of axis {axis} disagree on whether it snakes")
                return
            self.snake[axis] = False if len(agreed) == 2 else agreed.pop()
            if len(agreed) == 2 and self.shape[axis] > 1:
                self._notes.append(f"axis {axis}: snaking unproven (no motor tells), taken as not")
        history = self._history
        self._grid(
            "setpoints",
            "the start document gives the shape but not which motor steps which axis nor "
            "how: learned from the positions (the motor that changes from point to point "
            "is innermost)",
            axes,
        )
        self._name_dims(axes)
        for p in sorted(history):
            reason = self._check_point(p, history[p])
            if reason is not None:
                self._fall_back(reason)
                return
        self._history.clear()

    def _fits(self, j: int, values: np.ndarray, index: Sequence[int]) -> bool:
        """Whether the positions ``values`` of motor ``j`` depend on ``index`` alone."""
        groups: dict[int, list[float]] = {}
        for value, i in zip(values, index):
            if value == value:
                groups.setdefault(i, []).append(float(value))
        means = sorted(sum(g) / len(g) for g in groups.values())
        gaps = [b - a for a, b in zip(means, means[1:]) if b - a > 0]
        step = min(gaps) if gaps else 0.0
        for group in groups.values():
            spread = max(group) - min(group)
            if spread > self._tolerance(j, max(group, key=abs), step):
                return False
        return True

    def _check_point(self, p: int, row: Sequence[float]) -> str | None:
        """Check one point against the grid (learning values seen first);
        returns why it contradicts the grid, or None."""
        self.checked += 1
        if self._cells is not None:
            return self._check_cell(p, row)
        assert self.shape is not None
        index = []
        shape = self.shape
        for axis, size in enumerate(shape):
            i = (p // self._strides[axis]) % size
            if axis and size > 1 and (p // self._sweeps[axis]) % 2:
                snake = self.snake[axis]
                if snake is None:
                    snake = self._decide_snake(axis, i, row)
                    if snake is None:
                        return (
                            f"event {p + 1}: the motors of axis {axis} are neither where "
                            f"the row began nor where it ended"
                        )
                if snake:
                    i = shape[axis] - 1 - i
            index.append(i)
        for j, axis in self._checks:
            value = row[j]
            if value != value:
                continue
            expected = self._coords[j][index[axis]]
            if expected != expected:
                self._learn(j, index[axis], value)
                continue
            off = abs(value - expected)
            # (Setpoints repeat exactly: most points need no tolerance.)
            if off and off > self._tolerance(j, value):
                source = self.sources[j]
                return (
                    f"event {p + 1}: {source.key} is {value!r}, but the grid puts the point "
                    f"at {self.dims[axis].name}[{index[axis]}] = {float(expected)!r}"
                )
        return None

    def _decide_snake(self, axis: int, raw: int, row: Sequence[float]) -> bool | None:
        assert self.shape is not None
        flipped = self.shape[axis] - 1 - raw
        straight = reverse = True
        for j in self._on_axis[axis]:
            value = row[j]
            if value != value:
                continue
            coords = self._coords[j]
            tolerance = self._tolerance(j, value)
            straight &= not abs(value - coords[raw]) > tolerance
            reverse &= not abs(value - coords[flipped]) > tolerance
        if straight and reverse:
            claimed = self.plan.snaking[axis] if self.plan.described else False
            self._notes.append(
                f"axis {axis}: snaking unproven (its positions read the same both ways), "
                f"taken as {'snaked' if claimed else 'not'}"
            )
            self.snake[axis] = bool(claimed)
        elif straight or reverse:
            self.snake[axis] = reverse
        else:
            return None
        return self.snake[axis]

    # ------------------------------------------------------- out of order
    def _start_nonsequential(self) -> None:
        assert self.shape is not None
        plan = self.plan
        extents = plan.extents
        leading = [
            next((self._column[m] for m in d.motors if m in self._column), None)
            for d in plan.dims
        ]
        if not plan.described or extents is None or any(j is None for j in leading):
            self._fall_back(
                "a rectilinear grid visited out of order, but the start document's "
                "extents and motors per axis, or the events' positions, do not say "
                "where each point lies"
            )
            return
        self._leading = [int(j) for j in leading if j is not None]
        self._lattice = []
        for (lo, hi), size in zip(extents, self.shape):
            self._lattice.append((lo, (hi - lo) / (size - 1) if size > 1 else 0.0))
        self.snake = [False] * len(self.shape)
        if plan.relative:
            return  # pending: where the grid lies comes with the first points
        self._grid_nonsequential(
            "metadata",
            "a rectilinear grid visited out of order (start document: gridding, shape, "
            "extents): each point placed where its positions lie on it",
        )

    def _grid_nonsequential(self, source: str, reason: str) -> None:
        assert self.shape is not None
        axes = [
            [self._column[m] for m in d.motors if m in self._column] for d in self.plan.dims
        ]
        self._grid(source, reason, axes)
        for j, (origin, step) in zip(self._leading, self._lattice):
            self._coords[j][:] = origin + step * np.arange(self._coords[j].size)
            self._step[j] = abs(step)
        self._cells = np.zeros(self.shape, dtype=np.int64)
        self._cell_of = np.full(math.prod(self.shape), -1, dtype=np.int64)
        history = self._history
        for p in sorted(history):
            reason_ = self._check_point(p, history[p])
            if reason_ is not None:
                self._fall_back(reason_)
                return
        self._history.clear()

    def _try_anchor(self) -> None:
        """A relative grid visited out of order lies around where the motors
        were: the scan starts at its centre (with an even count, between the
        two central values, which the first points visit)."""
        assert self.shape is not None
        first = min(self._history)
        lattice = []
        for axis, (j, (_, step)) in enumerate(zip(self._leading, self._lattice)):
            size = self.shape[axis]
            v0 = self._history[first][j]
            if v0 != v0:
                self._fall_back(f"event {first + 1} carries no position of axis {axis}")
                return
            if size % 2:
                lattice.append((v0 - step * (size // 2), step))
                continue
            tolerance = self._tolerance(j, v0, step)
            later = [
                row[j] for p, row in sorted(self._history.items())
                if abs(row[j] - v0) > tolerance
            ]
            if not later:
                return  # still pending: the second central value has not come
            steps = (later[0] - v0) / step
            if abs(abs(steps) - 1) * abs(step) > tolerance:
                self._fall_back(
                    f"a relative grid visited out of order whose first points are not at "
                    f"its centre (axis {axis})"
                )
                return
            at = size // 2 - (1 if steps > 0 else 0)
            lattice.append((v0 - step * at, step))
        self._lattice = lattice
        self._grid_nonsequential(
            "setpoints",
            "a relative rectilinear grid visited out of order: the extents around the "
            "first points (its centre); each point placed where its positions lie on it",
        )

    def _check_cell(self, p: int, row: Sequence[float]) -> str | None:
        assert self.shape is not None and self._cells is not None
        assert self._cell_of is not None
        index = []
        for axis, (j, (origin, step)) in enumerate(zip(self._leading, self._lattice)):
            value = row[j]
            size = self.shape[axis]
            if value != value:
                return f"event {p + 1} carries no position of {self.dims[axis].name}"
            i = int(round((value - origin) / step)) if step else 0
            if not 0 <= i < size or abs(value - (origin + i * step)) > self._tolerance(j, value):
                return (
                    f"event {p + 1}: {self.sources[j].key} is {value!r}, not a value of "
                    f"the grid's {self.dims[axis].name} ({origin!r} + k * {step!r}, k < {size})"
                )
            index.append(i)
        cell = tuple(index)
        held = int(self._cells[cell])
        if held and held != p + 1:
            return f"events {held} and {p + 1} are both at {cell} of the grid"
        for j, axis in self._checks:
            if j in self._leading:
                continue
            value = row[j]
            expected = self._coords[j][index[axis]]
            if value != value:
                continue
            if expected != expected:
                self._learn(j, index[axis], value)
            elif abs(value - expected) > self._tolerance(j, value):
                return (
                    f"event {p + 1}: {self.sources[j].key} is {value!r}, but the grid has "
                    f"{float(expected)!r} there"
                )
        self._cells[cell] = p + 1
        self._cell_of[p] = sum(i * stride for i, stride in zip(cell, self._strides))
        return None
