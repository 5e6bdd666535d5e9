"""Random runs composed with event-model, checked against an independent model.

Each example builds a run without a RunEngine (scan shape, snaking, data keys
of random dtypes and frame shapes, missing and repeated points, events or
event pages of random sizes), feeds it to a :class:`ZarrWriter` with a random
chunk/shard layout and buffer bound, and compares every array of the store
with what a plain in-memory model of the scan says it must hold.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr
from bluesky.plan_patterns import snake_cyclers
from cycler import cycler
from event_model import compose_run, pack_event_page
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bluesky_zarr import ZarrWriter
from bluesky_zarr.write._buffer import MERGE_COPIES

from conftest import assert_times

with warnings.catch_warnings():
    # Hypothesis imports libcst to print a patch for a failing example; the
    # DeprecationWarning libcst raises on import would, under
    # filterwarnings=error, turn a failing example into a pytest INTERNALERROR.
    warnings.simplefilter("ignore", DeprecationWarning)
    with contextlib.suppress(ImportError):
        import libcst  # noqa: F401

#: Largest number of points of a generated grid (keeps examples fast).
MAX_POINTS = 16

DTYPES = ["uint8", "uint16", "int32", "float32", "float64"]

PROPERTY_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --------------------------------------------------------------------- model
def visiting_order(shape: tuple[int, ...], snaking: tuple[bool, ...]) -> list[tuple[int, ...]]:
    """The grid points in the order a scan visits them (``seq_num - 1`` -> point).

    Nested sweeps, outermost first; a snaking axis runs backwards on every
    other sweep, i.e. each time the axes outside it have advanced.
    """
    order: list[tuple[int, ...]] = []
    sweeps = [0] * len(shape)

    def sweep(axis: int, prefix: tuple[int, ...]) -> None:
        if axis == len(shape):
            order.append(prefix)
            return
        steps: Any = range(shape[axis])
        if snaking[axis] and sweeps[axis] % 2 == 1:
            steps = reversed(steps)
        sweeps[axis] += 1
        for i in steps:
            sweep(axis + 1, prefix + (i,))

    sweep(0, ())
    return order


@pytest.mark.parametrize(
    "shape, snaking",
    [
        ((3,), (False,)),
        ((2, 3), (False, True)),
        ((3, 2, 4), (False, True, True)),
        ((3, 2, 4), (False, False, True)),
        ((2, 3, 2, 3), (False, True, False, True)),
        ((2, 2, 3, 2), (False, True, True, True)),
    ],
)
def test_model_visiting_order_is_bluesky_snaking(shape, snaking):
    axes = [cycler(f"a{n}", list(range(size))) for n, size in enumerate(shape)]
    visited = [
        tuple(int(point[f"a{n}"]) for n in range(len(shape)))
        for point in snake_cyclers(axes, list(snaking))
    ]
    assert visiting_order(shape, snaking) == visited


@dataclass
class Key:
    name: str
    dtype: np.dtype
    frame: tuple[int, ...]
    #: Whether the descriptor gives ``dtype_numpy`` (for arrays, else the
    #: first frame tells the dtype).
    declared: bool = True

    @property
    def data_key(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"source": f"SIM:{self.name}", "shape": list(self.frame)}
        if self.declared or not self.frame:
            entry["dtype_numpy"] = self.dtype.str
        if self.frame:
            entry["dtype"] = "array"
        else:
            entry["dtype"] = "integer" if self.dtype.kind in "iu" else "number"
        return entry


@dataclass
class Run:
    #: Scan shape; ``None`` for a scan without ``shape`` (one growing dimension).
    shape: tuple[int, ...] | None
    snaking: tuple[bool, ...]
    keys: list[Key]
    #: seq_num of each event, in the order they are sent.
    sends: list[int]
    #: Events per event page, or None to send events one by one.
    pages: list[int] | None
    #: Whether page columns are stacked numpy arrays rather than lists.
    stacked: bool
    options: dict[str, Any]
    seed: int
    #: Growing scans only: whether a motor (readback only) is scanned.
    growing_motor: bool = False
    extents: list[tuple[float, float]] = field(default_factory=list)

    @property
    def n_scan(self) -> int:
        return 1 if self.shape is None else len(self.shape)

    @property
    def motors(self) -> list[str]:
        if self.shape is None:
            return ["g"] if self.growing_motor else []
        return [f"m{n}" for n in range(len(self.shape))]


def fill_of(dtype: np.dtype) -> Any:
    return np.nan if dtype.kind == "f" else 0


def value_for(key: Key, rng: np.random.Generator) -> Any:
    if key.dtype.kind == "f":
        values = (rng.standard_normal(key.frame) * 1000).astype(key.dtype)
    else:
        info = np.iinfo(key.dtype)
        values = rng.integers(info.min, info.max, size=key.frame, dtype=key.dtype, endpoint=True)
    if not key.frame:
        # Scalars travel as plain Python numbers, as ophyd signals give them.
        return values.item()
    return values


@dataclass
class Expected:
    arrays: dict[str, np.ndarray]
    written: np.ndarray
    coords: dict[str, np.ndarray]


def compose(run: Run) -> tuple[list[tuple[str, dict[str, Any]]], Expected]:
    """The run's documents and the store they must give, computed independently."""
    rng = np.random.default_rng(run.seed)
    metadata: dict[str, Any] = {"scan_id": 1, "plan_name": "property"}
    if run.shape is not None:
        metadata.update(
            shape=list(run.shape),
            extents=[list(e) for e in run.extents],
            snaking=list(run.snaking),
            motors=run.motors,
            num_points=math.prod(run.shape),
            plan_pattern="outer_product",
            hints={"dimensions": [([m], "primary") for m in run.motors]},
        )
        order = visiting_order(run.shape, run.snaking)
        setpoints = {
            m: np.linspace(lo, hi, n)
            for m, (lo, hi), n in zip(run.motors, run.extents, run.shape)
        }
        scan_shape = run.shape
    else:
        if run.motors:
            metadata.update(motors=run.motors, hints={"dimensions": [(run.motors, "primary")]})
        else:
            metadata.update(hints={"dimensions": [(["time"], "primary")]})
        length = max(run.sends, default=0)
        order = [(n,) for n in range(length)]
        setpoints = {}
        scan_shape = (length,)

    bundle = compose_run(metadata=metadata)
    data_keys = {k.name: k.data_key for k in run.keys}
    readback = {"dtype": "number", "shape": [], "source": "SIM:motor", "dtype_numpy": "<f8"}
    for m in run.motors:
        data_keys[m] = dict(readback)
        if m in setpoints:
            data_keys[f"{m}_setpoint"] = dict(readback)
    descriptor = bundle.compose_descriptor(data_keys=data_keys, name="primary")

    arrays = {
        k.name: np.full(scan_shape + k.frame, fill_of(k.dtype), dtype=k.dtype) for k in run.keys
    }
    for m in run.motors:
        arrays[f"{m}_readback"] = np.full(scan_shape, np.nan)
        if m in setpoints:
            arrays[f"{m}_setpoint"] = np.full(scan_shape, np.nan)
    arrays["time"] = np.full(scan_shape, np.nan)
    arrays["seq_num"] = np.zeros(scan_shape, dtype="int64")
    written = np.zeros(scan_shape, dtype=bool)
    coords = {m: values.copy() for m, values in setpoints.items()}
    if run.shape is None and run.motors:
        coords[run.motors[0]] = np.full(scan_shape, np.nan)

    events = []
    for n, seq_num in enumerate(run.sends):
        point = order[seq_num - 1]
        data: dict[str, Any] = {}
        for key in run.keys:
            data[key.name] = value_for(key, rng)
            arrays[key.name][point] = data[key.name]
        for axis, m in enumerate(run.motors):
            position = float(rng.uniform(-10, 10))
            data[m] = position
            arrays[f"{m}_readback"][point] = position
            if m in setpoints:
                data[f"{m}_setpoint"] = float(setpoints[m][point[axis]])
                arrays[f"{m}_setpoint"][point] = data[f"{m}_setpoint"]
            else:
                coords[m][point] = position
        when = 1.7e9 + n + 0.25
        arrays["time"][point] = when
        arrays["seq_num"][point] = seq_num
        written[point] = True
        events.append(
            descriptor.compose_event(
                data=data,
                timestamps={k: when for k in data},
                seq_num=seq_num,
                time=when,
            )
        )

    docs: list[tuple[str, dict[str, Any]]] = [
        ("start", dict(bundle.start_doc)),
        ("descriptor", dict(descriptor.descriptor_doc)),
    ]
    if run.pages is None:
        docs += [("event", dict(e)) for e in events]
    else:
        at = 0
        sizes = list(run.pages)
        while at < len(events):
            size = sizes.pop(0) if sizes else len(events)
            page = dict(pack_event_page(*events[at : at + size]))
            if run.stacked:
                page["seq_num"] = np.asarray(page["seq_num"])
                page["time"] = np.asarray(page["time"])
                page["data"] = {k: np.asarray(v) for k, v in page["data"].items()}
            docs.append(("event_page", page))
            at += size
    stop = dict(bundle.compose_stop())
    # bluesky's counter: a re-measured point (pause/resume) reuses its
    # seq_num, so num_events is the last seq_num issued; a seq_num never sent
    # is an event lost on the way.
    stop["num_events"] = {"primary": max(run.sends, default=0)}
    docs.append(("stop", stop))
    if not run.sends:
        # An array whose dtype only its first value tells is made when that
        # value arrives.
        for key in run.keys:
            if not key.declared and key.frame:
                del arrays[key.name]
    return docs, Expected(arrays, written, coords)


# ---------------------------------------------------------------- strategies
@st.composite
def layouts(draw, scan_shape: tuple[int, ...], frame: tuple[int, ...]) -> dict[str, Any]:
    """Chunks and/or shards for one array (scan dims, then frame dims)."""
    kind = draw(st.sampled_from(["default", "chunks", "chunks+shards", "shards"]))
    if kind == "default":
        return {}
    if kind == "shards":
        # Chunks stay the writer's default (one frame), so shards must hold
        # whole frames.
        scan = tuple(draw(st.integers(1, max(1, s))) for s in scan_shape)
        return {"shards": scan + frame}
    chunks = tuple(draw(st.integers(1, max(1, s))) for s in scan_shape + frame)
    layout: dict[str, Any] = {"chunks": chunks}
    if kind == "chunks+shards":
        layout["shards"] = tuple(
            c * draw(st.integers(1, max(1, -(-max(1, s) // c))))
            for c, s in zip(chunks, scan_shape + frame)
        )
    return layout


@st.composite
def runs(draw, growing: bool | None = None) -> Run:
    """A random run: a grid (``growing=False``), a scan without shape, or either."""
    if growing is None:
        growing = draw(st.integers(0, 3)) == 0
    if growing:
        shape = None
        snaking: tuple[bool, ...] = (False,)
        length = draw(st.integers(1, 12))
        layout_shape = (length,)
    else:
        ndim = draw(st.integers(1, 4))
        sizes: list[int] = []
        for _ in range(ndim):
            room = max(1, MAX_POINTS // math.prod(sizes or [1]))
            sizes.append(draw(st.integers(1, min(5, room))))
        shape = tuple(sizes)
        snaking = (False,) + tuple(draw(st.booleans()) for _ in range(ndim - 1))
        length = math.prod(shape)
        layout_shape = shape

    keys = []
    for n in range(draw(st.integers(1, 3))):
        dtype = np.dtype(draw(st.sampled_from(DTYPES)))
        frame = draw(
            st.sampled_from(
                [(), (), (1,), (3,), (2, 3), (4, 4), (1, 5), (3, 2)],
            )
        )
        keys.append(Key(f"k{n}", dtype, frame, declared=draw(st.integers(0, 3)) > 0))

    # Which points are sent, and which are sent again later with new values.
    sent = [s for s in range(1, length + 1) if draw(st.integers(0, 5)) > 0]
    if growing and not sent:
        sent = [length]
    sends = list(sent)
    if draw(st.integers(0, 3)) == 0:
        # Out of order, as when documents of a run travel different routes.
        sends = draw(st.permutations(sends))
    if sent:
        for _ in range(draw(st.integers(0, 3))):
            again = draw(st.sampled_from(sent))
            first = sends.index(again)
            sends.insert(draw(st.integers(first + 1, len(sends))), again)

    pages = None
    if draw(st.booleans()):
        pages = draw(st.lists(st.integers(1, 6), min_size=1, max_size=len(sends) + 1))

    options: dict[str, Any] = {}
    chunks: dict[str, tuple[int, ...]] = {}
    shards: dict[str, tuple[int, ...]] = {}
    for key in keys:
        layout = draw(layouts(layout_shape, key.frame))
        if "chunks" in layout:
            chunks[key.name] = layout["chunks"]
        if "shards" in layout:
            shards[key.name] = layout["shards"]
    if chunks:
        options["chunks"] = chunks
    if shards:
        options["shards"] = shards
    options["max_buffer_bytes"] = draw(st.sampled_from([1, 300, 4096, 2**29]))
    options["flush_interval"] = draw(st.sampled_from([None, None, 5.0]))
    options["workers"] = draw(st.integers(1, 2))
    options["compressors"] = draw(st.sampled_from(["default", None]))

    extents = []
    if shape is not None:
        for _ in shape:
            lo = draw(st.integers(-5, 5))
            extents.append((float(lo), float(lo + draw(st.integers(1, 9)))))
    return Run(
        shape=shape,
        snaking=snaking,
        keys=keys,
        sends=sends,
        pages=pages,
        stacked=pages is not None and draw(st.booleans()),
        options=options,
        seed=draw(st.integers(0, 2**32 - 1)),
        growing_motor=growing and draw(st.booleans()),
        extents=extents,
    )


# --------------------------------------------------------------------- check
def open_primary(store: Path) -> xr.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return xr.open_zarr(store, group="primary").load()


def largest_block_bytes(
    group: zarr.Group, names: list[str], n_scan: int, growing: bool
) -> int:
    """Bytes of the largest write unit (shard, else chunk) a buffered array holds.

    On a fixed grid a unit is cut at the array's edge; on a growing dimension
    it is held whole, since the array's final length is not known.
    """
    largest = 0
    for name in names:
        array = group[name]
        assert isinstance(array, zarr.Array)
        unit = array.shards or array.chunks
        scan = [
            u if growing else min(u, max(1, s))
            for u, s in zip(unit[:n_scan], array.shape[:n_scan])
        ]
        largest = max(largest, math.prod(scan + list(array.shape[n_scan:])) * array.dtype.itemsize)
    return largest


def check_arrays(run: Run, store: Path, expected: Expected) -> zarr.Group:
    """Every array of the primary stream, read by zarr and by xarray, is as expected."""
    ds = open_primary(store)
    root = zarr.open_group(store, mode="r")
    group = root["primary"]
    assert isinstance(group, zarr.Group)
    n_scan = run.n_scan

    buffered = list(expected.arrays)
    on_disk = set(group.array_keys())
    assert on_disk == set(buffered) | {"_written"} | set(expected.coords)

    for name, want in expected.arrays.items():
        raw = group[name]
        assert isinstance(raw, zarr.Array)
        got = raw[...]
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=f"zarr {name}")
        variable = ds[name]
        if name == "time":  # CF: xarray decodes it to dates
            assert_times(variable, want)
        else:
            assert variable.dtype == want.dtype, name
            np.testing.assert_array_equal(variable.values, want, err_msg=f"xarray {name}")
        assert list(variable.dims[:n_scan]) == list(ds["_written"].dims)
    for key in run.keys:
        if key.name in run.options.get("chunks", {}) and key.name in expected.arrays:
            assert group[key.name].chunks == run.options["chunks"][key.name]

    np.testing.assert_array_equal(group["_written"][...], expected.written)
    np.testing.assert_array_equal(ds["_written"].values, expected.written)
    for name, want in expected.coords.items():
        np.testing.assert_array_equal(group[name][...], want, err_msg=f"coordinate {name}")
        np.testing.assert_array_equal(ds[name].values, want, err_msg=f"coordinate {name}")
    if run.shape is not None:
        assert ds["_written"].dims == tuple(run.motors)
    return root


def check_store(run: Run, store: Path, expected: Expected) -> None:
    root = check_arrays(run, store, expected)
    group = root["primary"]
    assert isinstance(group, zarr.Group)
    buffered = list(expected.arrays)
    info = root.attrs["bluesky_zarr"]
    assert isinstance(info, dict)
    lost = max(run.sends, default=0) - len(set(run.sends))
    assert info["complete"] is (lost == 0)
    if lost:
        assert info["missing"] == {
            "primary": {"expected": max(run.sends), "written": len(set(run.sends))}
        }
    assert info["write_failures"] == []
    assert info["streams"]["primary"]["written_points"] == int(expected.written.sum())
    limit = run.options["max_buffer_bytes"]
    assert info["max_buffer_bytes"] == limit
    # The bound covers blocks and the copies of a block being written (one
    # more where a block cut at the edge of its write unit is padded to it);
    # a single block larger than the bound is still written (alone).
    largest = largest_block_bytes(group, buffered, run.n_scan, run.shape is None)
    assert info["buffer_peak_bytes"] <= max(limit, (2 + MERGE_COPIES) * largest)


def feed_and_check(run: Run, tmp_path_factory) -> None:
    """Feed the run to a writer with its options; the store must match the model."""
    event("growing" if run.shape is None else f"{len(run.shape)}-d grid")
    event(("stacked pages" if run.stacked else "pages") if run.pages else "events")
    event("dtype from data" if any(not k.declared and k.frame for k in run.keys) else "declared")
    event(f"max_buffer_bytes={run.options['max_buffer_bytes']}")
    event("in order" if run.sends == sorted(run.sends) else "out of order")
    event("repeated points" if len(set(run.sends)) < len(run.sends) else "no repeats")
    event("user layout" if {"chunks", "shards"} & set(run.options) else "default layout")
    docs, expected = compose(run)
    event("missing points" if not expected.written.all() else "all points")
    directory = tmp_path_factory.mktemp("property")
    writer = ZarrWriter(directory, **run.options)
    for name, doc in docs:
        writer(name, doc)
    assert len(writer.stores) == 1
    assert list(writer.open_runs) == []
    check_store(run, writer.stores[0], expected)


@PROPERTY_SETTINGS
@given(run=runs(growing=False))
def test_random_grid_runs_match_the_model(run, tmp_path_factory):
    feed_and_check(run, tmp_path_factory)


@settings(PROPERTY_SETTINGS, max_examples=12)
@given(run=runs(growing=True))
def test_random_growing_runs_match_the_model(run, tmp_path_factory):
    feed_and_check(run, tmp_path_factory)


def events_in(name: str, doc: dict[str, Any]) -> int:
    if name == "event":
        return 1
    if name == "event_page":
        return len(doc["seq_num"])
    return 0


@settings(PROPERTY_SETTINGS, max_examples=15)
@given(run=runs(), data=st.data())
def test_store_is_consistent_during_the_run(run, data, tmp_path_factory):
    """Mid-run the store opens; written points hold what was sent; flush writes all."""
    docs, _ = compose(run)
    directory = tmp_path_factory.mktemp("midrun")
    writer = ZarrWriter(directory, **run.options)
    last = len(docs) - 1
    checkpoints = data.draw(st.sets(st.integers(1, last - 1), max_size=3)) if last > 1 else set()
    flushes = data.draw(st.sets(st.sampled_from(sorted(checkpoints)))) if checkpoints else set()
    if run.shape is None:
        # Workers of a growing stream consolidate metadata while they write;
        # reading meanwhile trips the warnings race that
        # test_threads.py::test_consolidation_ignores_warning_scopes_of_other_threads shows.
        flushes = checkpoints
    sent = 0
    for n, (name, doc) in enumerate(docs):
        writer(name, doc)
        sent += events_in(name, doc)
        if n not in checkpoints:
            continue
        so_far = replace(run, sends=run.sends[:sent])
        _, expected = compose(so_far)
        store = writer.stores[0]
        if n in flushes:
            writer.flush()
            check_arrays(so_far, store, expected)
            continue
        # Without a flush the writer may hold any part back; whatever it
        # marks as written must be complete and hold the last value sent.
        # The mask is read first: a point it shows was on disk before.
        group = zarr.open_group(store, mode="r")["primary"]
        assert isinstance(group, zarr.Group)
        written = group["_written"][...]
        values = {name_: group[name_][...] for name_ in expected.arrays if name_ in group}
        length = written.shape[0]
        assert length <= expected.written.shape[0]
        assert not (written & ~expected.written[:length]).any()
        ds = open_primary(store)
        assert ds["_written"].shape[0] >= length
        # A point sent again may still hold its earlier value on disk.
        repeated = {s for s in so_far.sends if so_far.sends.count(s) > 1}
        if run.shape is None:
            settled = [(s - 1,) for s in so_far.sends if s not in repeated and s <= length]
        else:
            order = visiting_order(run.shape, run.snaking)
            settled = [order[s - 1] for s in so_far.sends if s not in repeated]
        for point in settled:
            if not written[point]:
                continue
            for array_name, want in expected.arrays.items():
                np.testing.assert_array_equal(
                    values[array_name][point],
                    want[point],
                    err_msg=f"{array_name} at written point {point}",
                )
    check_store(run, writer.stores[0], compose(run)[1])
