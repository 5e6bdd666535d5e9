"""Plans of bluesky and of Diamond's dodal (over scanspec paths), and the
check that a store holds every frame at the setpoints its coordinates name.

Shared by tests/test_geometry.py and the child process it starts with other
``PYTHONHASHSEED`` values (tests/geometry_child.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bluesky.plans as bp
import numpy as np
import xarray as xr
from dodal.plans import (
    count,
    list_grid_scan,
    list_scan,
    num_grid_rscan,
    num_grid_scan,
    num_rscan,
    num_scan,
    spec_scan,
)
from scanspec.specs import Line

from bluesky_zarr.sim import PointCamera, frame_at, motors

FRAME = (4, 5)

Devices = dict[str, Any]
#: name -> (plan over the devices, expected scan dimensions and sizes, source).
PLANS: dict[str, tuple[Callable[[Devices], Any], dict[str, int], str]] = {
    "spec_line": (
        lambda d: spec_scan({d["cam"]}, Line(d["m1"], 0, 2, 5)),
        {"motor1": 5}, "metadata",
    ),
    "spec_grid": (
        lambda d: spec_scan({d["cam"]}, Line(d["m2"], 0, 1, 3) * Line(d["m1"], 0, 2, 4)),
        {"motor2": 3, "motor1": 4}, "setpoints",
    ),
    "spec_snaked_grid": (
        lambda d: spec_scan({d["cam"]}, Line(d["m2"], 0, 1, 3) * ~Line(d["m1"], 0, 2, 4)),
        {"motor2": 3, "motor1": 4}, "setpoints",
    ),
    "spec_3d_snaked": (
        lambda d: spec_scan(
            {d["cam"]},
            Line(d["m3"], 0, 1, 2) * ~Line(d["m2"], 0, 1, 3) * ~Line(d["m1"], 0, 2, 4),
        ),
        {"motor3": 2, "motor2": 3, "motor1": 4}, "setpoints",
    ),
    "spec_middle_axis_snaked": (
        lambda d: spec_scan(
            {d["cam"]},
            Line(d["m3"], 0, 1, 3) * ~Line(d["m2"], 0, 1, 2) * Line(d["m1"], 0, 2, 3),
        ),
        {"motor3": 3, "motor2": 2, "motor1": 3}, "setpoints",
    ),
    "spec_descending_snaked_inner": (
        lambda d: spec_scan({d["cam"]}, Line(d["m1"], 5, 6, 2) * ~Line(d["m2"], 3, 1, 5)),
        {"motor1": 2, "motor2": 5}, "setpoints",
    ),
    "spec_zip": (
        lambda d: spec_scan({d["cam"]}, Line(d["m1"], 0, 2, 5).zip(Line(d["m2"], 1, 3, 5))),
        {"motor1": 5}, "setpoints",
    ),
    "spec_grid_of_zip": (
        lambda d: spec_scan(
            {d["cam"]},
            Line(d["m3"], 0, 1, 2) * ~Line(d["m1"], 0, 2, 3).zip(Line(d["m2"], 1, 3, 3)),
        ),
        {"motor3": 2, "motor1": 3}, "setpoints",
    ),
    "spec_concat": (
        lambda d: spec_scan(
            {d["cam"]}, Line(d["m1"], 0, 2, 3).concat(Line(d["m1"], 3, 5, 3))
        ),
        {"motor1": 6}, "metadata",
    ),
    "dodal_num_grid_scan": (
        lambda d: num_grid_scan([d["cam"]], [(d["m1"], [0, 1, 3]), (d["m2"], [0, 2, 4])]),
        {"motor1": 3, "motor2": 4}, "metadata",
    ),
    "dodal_num_grid_rscan": (
        lambda d: num_grid_rscan([d["cam"]], [(d["m1"], [0, 1, 2]), (d["m2"], [0, 2, 3])]),
        {"motor1": 2, "motor2": 3}, "metadata",
    ),
    "dodal_list_grid_scan": (
        lambda d: list_grid_scan(
            [d["cam"]], [(d["m1"], [0, 1, 3]), (d["m2"], [0, 2, 4, 5])]
        ),
        {"motor1": 3, "motor2": 4}, "metadata",
    ),
    "dodal_num_scan": (
        lambda d: num_scan([d["cam"]], [(d["m1"], [0, 1]), (d["m2"], [0, 2])], 3),
        {"motor1": 3}, "metadata",
    ),
    "dodal_num_rscan": (
        lambda d: num_rscan([d["cam"]], [(d["m1"], [0, 1]), (d["m2"], [0, 2])], 3),
        {"motor1": 3}, "metadata",
    ),
    "dodal_list_scan": (
        lambda d: list_scan([d["cam"]], [(d["m1"], [0, 1, 3]), (d["m2"], [0, 2, 4])]),
        {"motor1": 3}, "metadata",
    ),
    "dodal_count": (lambda d: count([d["cam"]], num=3), {"time": 3}, "metadata"),
    "grid_scan_snaked": (
        lambda d: bp.grid_scan(
            [d["cam"]], d["m1"], 0, 1, 2, d["m2"], 0, 1, 3, d["m3"], 0, 1, 2, snake_axes=True
        ),
        {"motor1": 2, "motor2": 3, "motor3": 2}, "metadata",
    ),
    "spiral_square": (
        lambda d: bp.spiral_square([d["cam"]], d["m1"], d["m2"], 0, 0, 2, 2, 3, 4),
        {"motor2": 4, "motor1": 3}, "metadata",
    ),
    "rel_spiral_square": (
        lambda d: bp.rel_spiral_square([d["cam"]], d["m1"], d["m2"], 2, 3, 4, 5),
        {"motor2": 5, "motor1": 4}, "setpoints",
    ),
}


def devices() -> Devices:
    """Three simulated motors and a camera whose frame says where they are."""
    m1, m2, m3 = motors("motor1", "motor2", "motor3")
    for n, motor in enumerate((m1, m2, m3)):
        motor.set(0.25 * (n + 1)).wait()
    cam = PointCamera([m1, m2, m3], shape=FRAME, name="cam")
    return {"m1": m1, "m2": m2, "m3": m3, "cam": cam}


def open_primary(store: Path) -> xr.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return xr.open_zarr(store, group="primary").load()


def frames_at_their_setpoints(ds: xr.Dataset, resting: dict[str, float]) -> int:
    """Check that every written frame of ``cam_image`` is the frame the camera
    takes where the coordinates at its index put the motors (a motor with no
    coordinate stayed at ``resting``). Returns the number of frames checked;
    raises AssertionError at the first frame that is not."""
    image = ds["cam_image"]
    scan_dims = list(image.dims[: -len(FRAME)])
    checked = 0
    for index in np.ndindex(*(ds.sizes[d] for d in scan_dims)):
        point = dict(zip(scan_dims, index))
        if not bool(ds["_written"].isel(point)):
            continue
        positions = {}
        for motor in ("motor1", "motor2", "motor3"):
            if motor in ds.coords:
                where = {d: i for d, i in point.items() if d in ds[motor].dims}
                positions[motor] = float(ds[motor].isel(where))
            else:
                positions[motor] = resting[motor]
        expected = frame_at(positions, FRAME)
        actual = image.isel(point).values
        assert np.array_equal(actual, expected), f"frame at {point} is not at {positions}"
        checked += 1
    return checked


def run_plan(RE: Any, writer: Any, name: str) -> dict[str, Any]:
    """Run one plan of :data:`PLANS` and describe the store it gave."""
    devs = devices()
    plan, _, _ = PLANS[name]
    RE(plan(devs))
    ds = open_primary(writer.stores[-1])
    # Motors that no coordinate names rest where the run left them.
    resting = {m.name: float(m.position) for m in (devs["m1"], devs["m2"], devs["m3"])}
    checked = frames_at_their_setpoints(ds, resting)
    geometry = ds.attrs["bluesky_zarr_geometry"]
    return {
        "plan": name,
        "dims": {d: int(ds.sizes[d]) for d in ds["cam_image"].dims[: -len(FRAME)]},
        "source": geometry["source"],
        "checked": checked,
        "events": int(ds["seq_num"].count()),
        "written": bool(ds["_written"].all()),
    }


def run_ophyd_async_spec_scan(RE: Any, writer: Any, directory: Path) -> dict[str, Any]:
    """spec_scan over ophyd-async's simulated stage (readbacks only), of its
    blob detector (HDF5 frames, stream_datum documents): a snaked 3x4 grid."""
    import bluesky.plan_stubs as bps
    from ophyd_async import sim
    from ophyd_async.core import init_devices

    from conftest import blob_detector, quick_sleep

    pattern = sim.PatternGenerator(sleep=quick_sleep())
    with init_devices():
        stage = sim.SimStage(pattern)
    det = blob_detector(Path(directory), pattern)
    RE(bps.mv(stage.x.velocity, 0, stage.y.velocity, 0))
    RE(spec_scan({det}, Line(stage.y, 0, 3, 3) * ~Line(stage.x, -2, 2, 4)))
    ds = open_primary(writer.stores[-1])
    return {
        "plan": "ophyd_async_spec_scan",
        "dims": {d: int(ds.sizes[d]) for d in ds["det"].dims[:-2]},
        "source": ds.attrs["bluesky_zarr_geometry"]["source"],
        "seq_num": ds["seq_num"].values.tolist(),
        "written": bool(ds["_written"].all()),
    }
