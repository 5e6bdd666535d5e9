"""The store opens with xarray while the run is going, and tells the truth."""

from __future__ import annotations

import numpy as np
from bluesky.plans import count, grid_scan

from bluesky_zarr import ZarrWriter
from bluesky_zarr.sim import PointCamera, frame_at, motors

from conftest import open_stream, open_tree


def test_store_opens_mid_run_and_written_points_hold_their_frames(RE, tmp_path):
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=(8, 8), name="cam")
    writer = ZarrWriter(tmp_path, flush_interval=None)
    seen: list[int] = []

    def check(name, doc):
        if name != "event":
            return
        (store,) = writer.open_runs
        if doc["seq_num"] % 3 == 0:
            writer.flush()
        ds = open_stream(store)
        assert ds["cam_image"].shape == (3, 4, 8, 8)
        written = ds["_written"].values
        for index in zip(*np.nonzero(written)):
            positions = {
                "wavelength": float(ds["wavelength"][index[0]]),
                "position": float(ds["position"][index[1]]),
            }
            np.testing.assert_array_equal(
                ds["cam_image"].values[index], frame_at(positions, (8, 8))
            )
        unwritten = ds["cam_image"].values[~written]
        assert (unwritten == 0).all()  # the fill value, never a stray frame
        if doc["seq_num"] % 3 == 0:
            assert written.sum() == doc["seq_num"]
        seen.append(int(written.sum()))
        tree = open_tree(store)
        assert tree.attrs["bluesky_zarr"]["complete"] is False

    RE.subscribe(writer)
    RE.subscribe(check)
    RE(grid_scan([cam], wavelength, 1, 3, 3, position, 0, 3, 4, snake_axes=True))
    assert seen[-1] >= 9 and len(seen) == 12
    assert open_tree(writer.stores[0]).attrs["bluesky_zarr"]["complete"] is True


def test_growing_store_opens_mid_run(RE, tmp_path):
    cam = PointCamera([], shape=(4, 4), name="cam")
    writer = ZarrWriter(tmp_path, flush_interval=None)
    lengths: list[int] = []

    def check(name, doc):
        if name == "event":
            writer.flush()
            (store,) = writer.open_runs
            ds = open_stream(store)
            # Every array of the stream agrees on the length of the growing
            # dimension, and it never claims points not yet measured.
            assert ds.sizes["time"] == doc["seq_num"]
            assert bool(ds["_written"].all())
            lengths.append(ds.sizes["time"])

    RE.subscribe(writer)
    RE.subscribe(check)
    RE(count([cam], 6))
    assert lengths == [1, 2, 3, 4, 5, 6]


def test_flush_interval_makes_slow_scans_visible(RE, tmp_path):
    import time

    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=(4, 4), name="cam")
    writer = ZarrWriter(tmp_path, flush_interval=0.05)
    written_at_check: list[int] = []

    def check(name, doc):
        if name == "event" and doc["seq_num"] == 2:
            (store,) = writer.open_runs
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                written = int(open_stream(store)["_written"].sum())
                if written == 2:
                    break
                time.sleep(0.02)
            written_at_check.append(written)

    RE.subscribe(writer)
    RE.subscribe(check)
    RE(grid_scan([cam], wavelength, 1, 2, 2, position, 0, 3, 4))
    assert written_at_check == [2]
