"""The grid a stream is stored on is proved by the setpoints its events carry.

Every case runs a real RunEngine over simulated motors (ophyd.sim and
ophyd-async), reads the store back with xarray and compares each frame with
the frame the detector took where the coordinates at its index put the
motors. bluesky's scan_nd lists a plan's motors from a set, whose order
changes with PYTHONHASHSEED: the plans also run in child processes with
other seeds and must give the same store.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from typing import Any
from urllib.parse import urlparse

import bluesky.plans as bp
import h5py
import numpy as np
import pytest
import zarr
from bluesky import RunEngine
from cycler import cycler
from dodal.plans import spec_scan
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ophyd.sim import SynSignal
from ophyd_async import sim
from scanspec.specs import Line

from bluesky_zarr import ZarrWriter
from bluesky_zarr.plan._geometry import DECIDED, OK, RELAYOUT, StreamGeometry
from bluesky_zarr.plan._scan import plan_scan
from bluesky_zarr.sim import PointCamera, frame_at, motors
from helpers.geometry_plans import PLANS, frames_at_their_setpoints, run_plan

from conftest import (
    HELPERS,
    blob_detector,
    by_kind,
    epoch_seconds,
    fly,
    open_stream,
    quick_sleep,
    record,
)

# ------------------------------------------------------- bluesky and dodal


@pytest.mark.parametrize("name", list(PLANS))
def test_every_frame_at_its_setpoints(RE, tmp_path, name):
    writer = ZarrWriter(tmp_path)
    RE.subscribe(writer)
    result = run_plan(RE, writer, name)
    _, dims, source = PLANS[name]
    assert result["dims"] == dims  # names after the motors, outermost first
    assert result["source"] == source
    assert result["checked"] == result["events"] == math.prod(dims.values())
    assert result["written"]


def test_the_same_store_in_every_process(tmp_path):
    """Each plan, run in processes whose sets iterate in other orders, gives
    the same dimensions (names, order, sizes) and every frame at its
    setpoints."""
    children = []
    for seed in ("0", "1", "2", "3"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        # The child imports `helpers.geometry_plans`: tests/ on its path.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(HELPERS.parent), env.get("PYTHONPATH", "")) if p
        )
        children.append(
            subprocess.Popen(
                [sys.executable, str(HELPERS / "geometry_child.py"), str(tmp_path / seed),
                 *PLANS, "ophyd_async_spec_scan"],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
        )
    outputs = []
    try:
        for child in children:
            outputs.append((child, *child.communicate(timeout=600)))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.communicate()
    results = []
    for child, out, err in outputs:
        assert child.returncode == 0, err[-3000:]
        results.append([json.loads(line) for line in out.splitlines()])
    for lines in results:
        assert [r["plan"] for r in lines] == [*PLANS, "ophyd_async_spec_scan"]
        for result in lines[:-1]:
            _, dims, source = PLANS[result["plan"]]
            assert result["dims"] == dims, result
            assert list(result["dims"]) == list(dims), result
            assert result["checked"] == math.prod(dims.values()), result
            assert result["source"] == source
        assert lines[-1] == results[0][-1]
        assert list(lines[-1]["dims"]) == ["stage-y", "stage-x"]


# ----------------------------------------------------------- ophyd-async


def test_ophyd_async_spec_scan_snaked_over_a_stage(RE, tmp_path):
    """A detector writing HDF5 (stream_datum before each event) over
    ophyd-async motors, whose events carry readbacks only: the frame at each
    index is the one the detector wrote at that point's event, and that
    event's positions are the coordinates of the index."""
    from helpers.geometry_plans import run_ophyd_async_spec_scan

    docs = record(RE)
    writer = ZarrWriter(tmp_path / "data")
    RE.subscribe(writer)
    result = run_ophyd_async_spec_scan(RE, writer, tmp_path)
    assert result["dims"] == {"stage-y": 3, "stage-x": 4}
    ds = open_stream(writer.stores[0])
    assert ds.attrs["bluesky_zarr_geometry"]["source"] == "setpoints"
    assert ds.attrs["bluesky_zarr_geometry"]["snaking"] == [False, True]
    assert ds.attrs["bluesky_zarr_geometry"]["positions"] == {
        "stage-y": "stage-y", "stage-x": "stage-x"
    }
    (sres,) = [s for s in by_kind(docs, "stream_resource") if s["data_key"] == "det"]
    with h5py.File(urlparse(sres["uri"]).path, "r") as file:
        frames = file[sres["parameters"]["dataset"]][()]
    events = {e["seq_num"]: e for e in by_kind(docs, "event")}
    assert len(events) == 12 and bool(ds["_written"].all())
    for y in range(3):
        for x in range(4):
            point = {"stage-y": y, "stage-x": x}
            seq = int(ds["seq_num"].isel(point))
            np.testing.assert_array_equal(ds["det"].isel(point).values, frames[seq - 1])
            assert events[seq]["data"]["stage-y"] == float(ds["stage-y"][y])
            assert events[seq]["data"]["stage-x"] == float(ds["stage-x"][x])
    # Every other row was measured backwards (the path snakes).
    assert [int(s) for s in ds["seq_num"].isel({"stage-y": 1}).values] == [8, 7, 6, 5]


@pytest.mark.parametrize(
    ("shape", "dims", "source"),
    [([16], ("dim_0",), "metadata"), ([4, 4], ("time",), "fallback")],
    ids=["one-dimension", "grid-without-positions"],
)
def test_fly_scan_declaring_only_a_shape(RE, tmp_path, caplog, shape, dims, source):
    """A fly scan whose start document gives only ``shape``: frames by index
    where seq_num orders them (one dimension), else one growing dimension and
    the reason, never a guessed grid."""
    det = blob_detector(tmp_path, sim.PatternGenerator(sleep=quick_sleep()))
    docs = record(RE)
    writer = ZarrWriter(tmp_path / "data")
    RE.subscribe(writer)
    with caplog.at_level(logging.WARNING, logger="bluesky_zarr"):
        RE(fly(det, 16, 1, md={"shape": shape}))
    ds = open_stream(writer.stores[0])
    assert ds["det"].dims == (*dims, "y", "x")
    geometry = ds.attrs["bluesky_zarr_geometry"]
    assert geometry["source"] == source
    (sres,) = [s for s in by_kind(docs, "stream_resource") if s["data_key"] == "det"]
    with h5py.File(urlparse(sres["uri"]).path, "r") as file:
        frames = file[sres["parameters"]["dataset"]][()]
    np.testing.assert_array_equal(ds["det"].values, frames)
    np.testing.assert_array_equal(ds["seq_num"].values, np.arange(1, 17))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    if source == "fallback":
        assert "motor positions" in geometry["reason"]
        assert len(warnings) == 1 and "one growing dimension" in warnings[0].getMessage()
    else:
        assert not warnings


# -------------------------------------------------------------- relayout


def claimed_grid_walked_otherwise(cam: Any, a: Any, b: Any) -> Any:
    """A plan whose start document describes a 3x4 raster grid, whose last
    row does not follow it."""
    outer = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    inner = [0, 1, 2, 3, 0, 1, 2, 3, 3, 1, 0, 2]
    md = {
        "shape": [3, 4],
        "plan_pattern": "outer_product",
        "snaking": [False, False],
        "hints": {"dimensions": [(["a"], "primary"), (["b"], "primary")]},
    }
    return bp.scan_nd([cam], cycler(a, outer) + cycler(b, inner), md=md)


@pytest.mark.parametrize(
    ("chunks", "stored"), [(None, (1, 4, 5)), ((3, 2, 4, 5), (6, 4, 5))],
    ids=["default-chunks", "chunks-given-for-the-grid"],
)
def test_points_placed_on_a_contradicted_grid_move_to_one_growing_dimension(
    RE, tmp_path, caplog, chunks, stored
):
    a, b = motors("a", "b")
    cam = PointCamera([a, b], shape=(4, 5), name="cam")
    # A short flush interval: most points are on disk (in partial shards)
    # before the grid is contradicted. Chunks given for the claimed grid
    # are folded onto the growing dimension.
    options = {"chunks": {"cam_image": chunks}} if chunks else {}
    writer = ZarrWriter(tmp_path, flush_interval=0.01, **options)
    RE.subscribe(writer)
    with caplog.at_level(logging.WARNING, logger="bluesky_zarr"):
        RE(claimed_grid_walked_otherwise(cam, a, b))
    store = writer.stores[0]
    ds = open_stream(store)
    assert ds["cam_image"].dims == ("time", "y", "x")
    geometry = ds.attrs["bluesky_zarr_geometry"]
    assert geometry["source"] == "fallback" and geometry["relayout"] is True
    assert "event 9" in geometry["reason"]
    np.testing.assert_array_equal(ds["seq_num"].values, np.arange(1, 13))
    for i in range(12):
        positions = {"a": float(ds["a"][i]), "b": float(ds["b"][i])}
        np.testing.assert_array_equal(ds["cam_image"][i].values, frame_at(positions, (4, 5)))
    np.testing.assert_array_equal(ds["b"].values, [0, 1, 2, 3, 0, 1, 2, 3, 3, 1, 0, 2])
    assert bool(ds["_written"].all())
    assert zarr.open_array(store / "primary" / "cam_image", mode="r").chunks == stored
    # Nothing of the grid is left beside the stream.
    assert sorted(p.name for p in store.iterdir() if p.is_dir()) == ["primary"]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_a_run_that_ends_before_the_grid_is_shown_falls_back(RE, tmp_path):
    """A 3-D scanspec path stopped after two points: which motor steps the
    middle axis is unknown, so the points are stored along one dimension."""
    m1, m2, m3 = motors("motor1", "motor2", "motor3")
    cam = PointCamera([m1, m2, m3], shape=(4, 5), name="cam")
    docs = record(RE)
    RE(spec_scan({cam}, Line(m3, 0, 1, 2) * Line(m2, 0, 1, 3) * Line(m1, 0, 2, 4)))
    events = by_kind(docs, "event")[:2]
    writer = ZarrWriter(tmp_path)
    for name, doc in docs:
        if name != "event" or doc in events:
            writer(name, doc)
    ds = open_stream(writer.stores[0])
    assert ds["cam_image"].dims == ("time", "y", "x")
    geometry = ds.attrs["bluesky_zarr_geometry"]
    assert geometry["source"] == "fallback" and "ended after 2 point" in geometry["reason"]
    for i, event in enumerate(events):
        np.testing.assert_array_equal(ds["cam_image"][i].values, event["data"]["cam_image"])
        assert float(ds["motor1"][i]) == event["data"]["motor1_setpoint"]


def test_held_points_are_written_once_the_grid_is_shown(RE, tmp_path):
    """While the positions have not shown the grid, nothing is placed; the
    points held are placed when they have, and the store then holds them."""
    m1, m2, m3 = motors("motor1", "motor2", "motor3")
    cam = PointCamera([m1, m2, m3], shape=(4, 5), name="cam")
    docs = record(RE)
    RE(spec_scan({cam}, Line(m3, 0, 1, 2) * ~Line(m2, 0, 1, 3) * Line(m1, 0, 2, 4)))
    writer = ZarrWriter(tmp_path)
    events = 0
    for name, doc in docs:
        if name == "stop":
            break
        writer(name, doc)
        events += name == "event"
        if events == 4:  # the first row: the middle axis has not stepped
            writer.flush()
            group = writer.stores[0] / "primary"
            assert not (group / "cam_image").exists()
        if events == 5:
            writer.flush()
            ds = open_stream(writer.stores[0])
            assert int(ds["_written"].sum()) == 5
    writer("stop", docs[-1][1])
    ds = open_stream(writer.stores[0])
    assert dict(ds.sizes) == {"motor3": 2, "motor2": 3, "motor1": 4, "y": 4, "x": 5}
    assert frames_at_their_setpoints(ds, {}) == 24


def test_spiral_written_grows_as_the_spiral_goes(RE, tmp_path):
    m1, m2 = motors("motor1", "motor2")
    cam = PointCamera([m1, m2], shape=(4, 5), name="cam")
    writer = ZarrWriter(tmp_path)
    RE.subscribe(writer)
    seen = []

    def after_event(name: str, doc: dict[str, Any]) -> None:
        if name == "event":
            writer.flush()
            ds = open_stream(writer.stores[0])
            seen.append(int(ds["_written"].sum()))

    RE.subscribe(after_event)
    RE(bp.spiral_square([cam], m1, m2, 0, 0, 2, 2, 5, 5))
    assert seen == list(range(1, 26))
    ds = open_stream(writer.stores[0])
    assert dict(ds["cam_image"].sizes) == {"motor2": 5, "motor1": 5, "y": 4, "x": 5}
    np.testing.assert_allclose(ds["motor1"].values, np.linspace(-1, 1, 5))
    # The first point of a square spiral is the centre of the grid.
    assert int(ds["seq_num"].isel(motor2=2, motor1=2)) == 1


# --------------------------------------------------------------- names


def test_names_equal_but_for_case_get_distinct_arrays(RE, tmp_path):
    time_signal = SynSignal(func=lambda: 7.5, name="Time")
    det = SynSignal(func=lambda: 1.0, name="det")
    other = SynSignal(func=lambda: 2.0, name="Det")
    writer = ZarrWriter(tmp_path)
    RE.subscribe(writer)
    RE(bp.count([time_signal, det, other], num=3))
    group = writer.stores[0] / "primary"
    names = [p.name for p in group.iterdir() if p.is_dir()]
    assert len({n.casefold() for n in names}) == len(names)
    ds = open_stream(writer.stores[0])
    by_key = {ds[v].attrs.get("data_key"): v for v in ds.variables}
    assert by_key["Time"] == "Time_" and by_key["det"] == "det" and by_key["Det"] == "Det_"
    np.testing.assert_array_equal(ds[by_key["Time"]].values, [7.5] * 3)
    np.testing.assert_array_equal(ds[by_key["det"]].values, [1.0] * 3)
    np.testing.assert_array_equal(ds[by_key["Det"]].values, [2.0] * 3)
    assert ds["time"].dims == ("time",) and epoch_seconds(ds["time"])[0] > 1e9


# ------------------------------------------------------------ property


@st.composite
def line_products(draw: Any) -> list[tuple[int, float, float, int, bool]]:
    """1 to 4 Lines: (motor, start, stop, points, snaked), outermost first."""
    count = draw(st.integers(1, 4))
    order = draw(st.permutations(range(4)))[:count]
    lines = []
    for motor in order:
        points = draw(st.integers(1, 3 if count > 2 else 4))
        start = draw(st.sampled_from([-2.0, 0.0, 1.5]))
        span = draw(st.sampled_from([-3.0, -1.0, 1.0, 2.5]))
        lines.append((motor, start, start + span, points, draw(st.booleans())))
    return lines


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(lines=line_products())
def test_random_scanspec_products_are_never_scrambled(tmp_path_factory, lines):
    names = ["m0", "m1", "m2", "m3"]
    axes = motors(*names)
    cam = PointCamera(axes, shape=(3, 2), name="cam")
    spec = None
    for motor, start, stop, points, snaked in lines:
        line = Line(axes[motor], start, stop, points)
        line = ~line if snaked else line
        spec = line if spec is None else spec * line
    RE = RunEngine({}, call_returns_result=False)
    docs = record(RE)
    writer = ZarrWriter(tmp_path_factory.mktemp("runs"))
    RE.subscribe(writer)
    RE(spec_scan({cam}, spec))
    ds = open_stream(writer.stores[0])
    image = ds["cam_image"]
    scan_dims = list(image.dims[:-2])
    moving = [names[m] for m, *_ in lines]
    # A grid (never the fallback) named after the motors, outermost first,
    # sized as the path.
    assert ds.attrs["bluesky_zarr_geometry"]["source"] in ("metadata", "setpoints")
    assert scan_dims == moving
    assert [ds.sizes[d] for d in scan_dims] == [p for _, _, _, p, _ in lines]
    events = by_kind(docs, "event")
    assert int(ds["_written"].sum()) == len(events)
    for event in events:
        where = np.argwhere(ds["seq_num"].values == event["seq_num"])
        assert len(where) == 1, f"event {event['seq_num']} is not stored exactly once"
        point = dict(zip(scan_dims, (int(i) for i in where[0])))
        np.testing.assert_array_equal(image.isel(point).values, event["data"]["cam_image"])
        for motor in moving:
            coordinate = ds[motor].isel({d: i for d, i in point.items() if d in ds[motor].dims})
            assert float(coordinate) == event["data"][f"{motor}_setpoint"]
        # The camera's frame where the motors were (those not scanned rest).
        where = {m.name: event["data"].get(m.name, float(m.position)) for m in axes}
        expected = frame_at(where, (3, 2))
        np.testing.assert_array_equal(image.isel(point).values, expected)


# ------------------------------------------------------- the check itself


def test_readbacks_within_a_fraction_of_the_step_prove_the_grid():
    """Motors that send readbacks only (no setpoint field), jittering within
    their declared precision around where they were sent: the grid is
    learned and every point checked; a readback half a step off contradicts
    it."""
    start = {
        "uid": "s", "time": 0, "shape": [3, 4], "motors": ["x", "y"],
        "hints": {"dimensions": [[["x"], "primary"], [["y"], "primary"]]},
    }
    keys = {m: {"dtype": "number", "shape": [], "source": "sim", "precision": 3}
            for m in ("y", "x")}
    rng = np.random.default_rng(5)

    def walk(jitter: float) -> list[tuple[int, dict[str, list[float]]]]:
        pages = []
        for p in range(12):
            row, column = divmod(p, 4)
            column = 3 - column if row % 2 else column  # the inner axis snakes
            x, y = 0.5 * column, 10.0 + row
            pages.append((p + 1, {"x": [x + rng.normal(0, jitter)],
                                  "y": [y + rng.normal(0, jitter)]}))
        return pages

    geometry = StreamGeometry(plan_scan(start), "primary", keys)
    verdicts = [geometry.observe(np.array([s]), data) for s, data in walk(1e-4)]
    assert verdicts == [OK, DECIDED] + [OK] * 10
    assert [d.name for d in geometry.dims] == ["y", "x"]
    assert geometry.snake == [False, True]
    index = geometry.index(np.arange(1, 13))
    assert index is not None and list(index[1][4:8]) == [3, 2, 1, 0]
    # The same walk with one point half a step from where it belongs.
    geometry = StreamGeometry(plan_scan(start), "primary", keys)
    pages = walk(1e-4)
    pages[6][1]["x"][0] += 0.25
    verdicts = [geometry.observe(np.array([s]), data) for s, data in pages]
    assert verdicts[6] == RELAYOUT and geometry.source == "fallback"
    assert "event 7" in geometry.reason
