"""Real RunEngine scans with simulated devices, read back through xarray."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from bluesky.plans import count, grid_scan, list_scan, rel_grid_scan, scan
from bluesky.preprocessors import SupplementalData
from ophyd.sim import SynAxis, det, det1

from bluesky_zarr import ZarrWriter
from bluesky_zarr.sim import PointCamera, frame_at, motors

from conftest import assert_frames_match, open_stream, open_tree


@pytest.mark.parametrize("snake", [False, True])
def test_grid_scan_every_frame_at_its_setpoints(RE, tmp_path, snake):
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=(24, 32), name="cam")
    writer = ZarrWriter(tmp_path)
    RE.subscribe(writer)
    RE(grid_scan([cam, det], wavelength, 400, 700, 4, position, 0, 5, 5, snake_axes=snake))

    (store,) = writer.stores
    tree = open_tree(store)
    assert tree["primary"]["cam_image"].dims == ("wavelength", "position", "y", "x")
    ds = open_stream(store)
    assert ds["cam_image"].shape == (4, 5, 24, 32)
    np.testing.assert_allclose(ds["wavelength"], np.linspace(400, 700, 4))
    np.testing.assert_allclose(ds["position"], np.linspace(0, 5, 5))
    # The readback at each point equals the setpoint coordinate of that point:
    # the frame measured at setpoint j sits at index j, snaked or not.
    np.testing.assert_allclose(
        ds["position_readback"], np.broadcast_to(ds["position"].values, (4, 5))
    )
    checked = assert_frames_match(
        ds, "cam_image", {"wavelength": "wavelength", "position": "position"}, (24, 32)
    )
    assert checked == 20
    assert bool(ds["_written"].all())
    assert sorted(ds["seq_num"].values.ravel().tolist()) == list(range(1, 21))
    if snake:
        # Row 1 was measured backwards: its first setpoint was measured last.
        assert ds["seq_num"].values[1].tolist() == [10, 9, 8, 7, 6]
    assert ds["det"].dims == ("wavelength", "position")
    selected = ds["cam_image"].sel(wavelength=520, method="nearest")
    assert float(selected["wavelength"]) == pytest.approx(500.0)


def test_three_motor_grid_with_snaking(RE, tmp_path):
    a, b, c = motors("a", "b", "c")
    cam = PointCamera([a, b, c], shape=(8, 8), name="cam")
    writer = ZarrWriter(tmp_path)
    RE.subscribe(writer)
    RE(grid_scan([cam], a, 0, 2, 3, b, 0, 3, 4, c, 1, 2, 2, snake_axes=True))
    ds = open_stream(writer.stores[0])
    assert ds["cam_image"].dims == ("a", "b", "c", "y", "x")
    assert ds["cam_image"].shape == (3, 4, 2, 8, 8)
    assert assert_frames_match(ds, "cam_image", {"a": "a", "b": "b", "c": "c"}, (8, 8)) == 24
    for name in "abc":
        readback, setpoint = xr.broadcast(ds[f"{name}_readback"], ds[name])
        np.testing.assert_allclose(readback, setpoint.transpose(*readback.dims))


def test_inner_product_scan_grows_one_dimension(RE, tmp_path):
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=(8, 12), name="cam")
    writer = ZarrWriter(tmp_path)
    RE.subscribe(writer)
    RE(scan([cam, det], wavelength, 400, 500, position, 0, 1, 7))
    ds = open_stream(writer.stores[0])
    assert ds["cam_image"].dims == ("wavelength", "y", "x")
    assert ds["cam_image"].shape == (7, 8, 12)
    np.testing.assert_allclose(ds["wavelength"], np.linspace(400, 500, 7))
    # The second motor is a coordinate along the same dimension.
    assert "position" in ds.coords
    np.testing.assert_allclose(ds["position"], np.linspace(0, 1, 7))
    assert assert_frames_match(
        ds, "cam_image", {"wavelength": "wavelength", "position": "position"}, (8, 12)
    ) == 7
    assert ds["seq_num"].values.tolist() == list(range(1, 8))


def test_count_appends_along_time(RE, tmp_path):
    cam = PointCamera([], shape=(4, 6), dtype="float32", name="cam")
    writer = ZarrWriter(tmp_path)
    RE.subscribe(writer)
    RE(count([cam, det], 5))
    ds = open_stream(writer.stores[0])
    assert ds["cam_image"].dims == ("time", "y", "x")
    assert ds.sizes["time"] == 5
    assert ds["cam_image"].dtype == np.float32
    np.testing.assert_array_equal(
        ds["cam_image"].values, np.stack([frame_at({}, (4, 6), "float32")] * 5)
    )
    assert ds["seq_num"].values.tolist() == [1, 2, 3, 4, 5]
    # CF: xarray decodes time to datetime64; the steps are timedeltas.
    assert np.all(np.diff(ds["time"].values) > np.timedelta64(0, "ns"))
    assert bool(ds["_written"].all())


def test_list_scan(RE, tmp_path):
    (wavelength,) = motors("wavelength")
    cam = PointCamera([wavelength], shape=(5, 5), name="cam")
    writer = ZarrWriter(tmp_path)
    RE.subscribe(writer)
    points = [410.0, 455.5, 430.0, 600.0]
    RE(list_scan([cam], wavelength, points))
    ds = open_stream(writer.stores[0])
    assert ds["cam_image"].dims == ("wavelength", "y", "x")
    np.testing.assert_allclose(ds["wavelength"], points)
    assert assert_frames_match(ds, "cam_image", {"wavelength": "wavelength"}, (5, 5)) == 4


def test_two_cameras_of_different_shapes_and_a_scalar(RE, tmp_path):
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=(16, 20), name="cam")
    small = PointCamera([wavelength, position], shape=(6, 4), dtype="int32", name="small")
    writer = ZarrWriter(tmp_path)
    RE.subscribe(writer)
    RE(grid_scan([cam, small, det1], wavelength, 1, 2, 2, position, 0, 1, 3))
    ds = open_stream(writer.stores[0])
    assert ds["cam_image"].dims == ("wavelength", "position", "y", "x")
    assert ds["small_image"].dims == ("wavelength", "position", "small_image_y", "small_image_x")
    assert ds["small_image"].dtype == np.int32
    motors_at = {"wavelength": "wavelength", "position": "position"}
    assert assert_frames_match(ds, "cam_image", motors_at, (16, 20)) == 6
    assert assert_frames_match(ds, "small_image", motors_at, (6, 4), "int32") == 6
    assert ds["det1"].shape == (2, 3)
    assert np.isfinite(ds["det1"].values).all()


def test_baseline_stream_appends_along_time(RE, tmp_path):
    wavelength, position = motors("wavelength", "position")
    (temperature,) = motors("temperature")
    temperature.set(21.5)
    sd = SupplementalData(baseline=[temperature])
    RE.preprocessors.append(sd)
    cam = PointCamera([wavelength, position], shape=(4, 4), name="cam")
    writer = ZarrWriter(tmp_path)
    RE.subscribe(writer)
    RE(grid_scan([cam], wavelength, 1, 2, 2, position, 0, 1, 2))
    tree = open_tree(writer.stores[0])
    assert set(tree.children) == {"primary", "baseline"}
    baseline = open_stream(writer.stores[0], "baseline")
    assert baseline["temperature"].dims == ("time",)
    np.testing.assert_allclose(baseline["temperature"], [21.5, 21.5])
    assert baseline["seq_num"].values.tolist() == [1, 2]


def test_units_and_metadata(RE, tmp_path):
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=(4, 4), name="cam")
    writer = ZarrWriter(tmp_path)
    RE.subscribe(writer)
    RE(grid_scan([cam], wavelength, 1, 2, 2, position, 0, 1, 2), sample="LaB6")
    tree = open_tree(writer.stores[0])
    assert tree.attrs["start"]["sample"] == "LaB6"
    assert tree.attrs["stop"]["exit_status"] == "success"
    assert tree.attrs["exit_status"] == "success"
    assert tree.attrs["bluesky_zarr"]["complete"] is True
    # CF time: decoded to dates, float seconds since the epoch on disk.
    assert tree["primary"]["time"].dtype.kind == "M"
    assert tree["primary"]["time"].encoding["units"] == "seconds since 1970-01-01T00:00:00Z"
    import zarr

    group = zarr.open_group(writer.stores[0], mode="r")
    array = group["primary/cam_image"]
    assert array.metadata.dimension_names == ("wavelength", "position", "y", "x")
    assert array.attrs["_ARRAY_DIMENSIONS"] == ["wavelength", "position", "y", "x"]


def test_one_writer_many_runs(RE, tmp_path):
    (wavelength,) = motors("wavelength")
    cam = PointCamera([wavelength], shape=(4, 4), name="cam")
    writer = ZarrWriter(tmp_path)
    RE.subscribe(writer)
    RE(scan([cam], wavelength, 1, 2, 3))
    RE(scan([cam], wavelength, 3, 4, 2))
    assert len(writer.stores) == 2
    assert open_stream(writer.stores[0]).sizes["wavelength"] == 3
    assert open_stream(writer.stores[1]).sizes["wavelength"] == 2


def test_relative_grid_scan_with_readback_only_motors(RE, tmp_path):
    wavelength = SynAxis(name="wavelength", read_attrs=["readback"])
    position = SynAxis(name="position", read_attrs=["readback"])
    wavelength.set(500)
    position.set(10)
    cam = PointCamera([wavelength, position], shape=(4, 4), name="cam")
    writer = ZarrWriter(tmp_path)
    RE.subscribe(writer)
    RE(rel_grid_scan([cam], wavelength, -100, 100, 3, position, 0, 2, 2, snake_axes=True))
    ds = open_stream(writer.stores[0])
    # Coordinates are absolute positions (from the readbacks), not the
    # relative extents of the start document.
    np.testing.assert_allclose(ds["wavelength"], [400, 500, 600])
    np.testing.assert_allclose(ds["position"], [10, 12])
    motors_at = {"wavelength": "wavelength", "position": "position"}
    assert assert_frames_match(ds, "cam_image", motors_at, (4, 4)) == 6
