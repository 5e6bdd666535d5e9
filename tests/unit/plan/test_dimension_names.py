"""Scan dimensions and frame dimensions never share a name within one array."""

from __future__ import annotations

import pytest
import zarr
from bluesky.plans import grid_scan

from bluesky_zarr import ZarrWriter
from bluesky_zarr.sim import PointCamera, motors

from conftest import assert_frames_match, open_stream


@pytest.mark.parametrize(
    "frame",
    [
        (5, 6),
        (3, 4),
    ],
    ids=["sizes-differ", "sizes-equal"],
)
def test_motors_named_like_frame_dimensions(RE, tmp_path, frame):
    writer = ZarrWriter(tmp_path)
    RE.subscribe(writer)
    y, x = motors("y", "x")
    cam = PointCamera([y, x], shape=frame, name="cam")
    RE(grid_scan([cam], y, 0, 1, 3, x, 0, 1, 4))
    store = writer.stores[0]
    image = zarr.open_group(store, mode="r")["primary/cam_image"]
    assert isinstance(image, zarr.Array)
    names = image.metadata.dimension_names
    assert names is not None
    assert names[:2] == ("y", "x")
    assert len(set(names)) == 4, names
    ds = open_stream(store)
    assert assert_frames_match(ds, "cam_image", {"y": "y", "x": "x"}, frame) == 12
