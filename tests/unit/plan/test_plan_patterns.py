"""Real bluesky plans whose start documents describe the grid differently."""

from __future__ import annotations

import numpy as np
import pytest
from bluesky.plans import grid_scan, list_grid_scan, spiral_square

from bluesky_zarr import ZarrWriter
from bluesky_zarr.sim import PointCamera, motors

from conftest import assert_frames_match, open_stream

FRAME = (5, 4)


def run(RE, tmp_path, plan_of):
    writer = ZarrWriter(tmp_path)
    RE.subscribe(writer)
    a, b = motors("a", "b")
    cam = PointCamera([a, b], shape=FRAME, name="cam")
    RE(plan_of(cam, a, b))
    return open_stream(writer.stores[0])


def test_grid_scan_with_snaking(RE, tmp_path):
    ds = run(
        RE, tmp_path, lambda cam, a, b: grid_scan([cam], a, 0, 2, 3, b, 5, 8, 4, snake_axes=True)
    )
    assert assert_frames_match(ds, "cam_image", {"a": "a", "b": "b"}, FRAME) == 12
    np.testing.assert_array_equal(ds["b"].values, np.linspace(5, 8, 4))


@pytest.mark.parametrize("b_positions", [[1.0, 2.0, 5.0, 9.0], [3.0, 1.0, 2.0, 0.5]],
                         ids=["uneven", "unsorted"])
def test_list_grid_scan_without_snaking(RE, tmp_path, b_positions):
    ds = run(
        RE, tmp_path, lambda cam, a, b: list_grid_scan([cam], a, [0, 1, 2], b, b_positions)
    )
    np.testing.assert_array_equal(ds["b"].values, b_positions)
    assert assert_frames_match(ds, "cam_image", {"a": "a", "b": "b"}, FRAME) == 12
    assert bool(ds["_written"].all())


def test_list_grid_scan_with_snaking(RE, tmp_path):
    ds = run(
        RE,
        tmp_path,
        lambda cam, a, b: list_grid_scan(
            [cam], a, [0, 1, 2], b, [1.0, 2.0, 5.0, 9.0], snake_axes=True
        ),
    )
    np.testing.assert_array_equal(ds["b"].values, [1.0, 2.0, 5.0, 9.0])
    assert assert_frames_match(ds, "cam_image", {"a": "a", "b": "b"}, FRAME) == 12


def test_spiral_square(RE, tmp_path):
    ds = run(
        RE,
        tmp_path,
        lambda cam, a, b: spiral_square([cam], b, a, 0, 0, 2, 2, 3, 3),
    )
    assert assert_frames_match(ds, "cam_image", {"a": "a", "b": "b"}, FRAME) == 9
    assert bool(ds["_written"].all())
