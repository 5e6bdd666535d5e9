"""Every chunk/shard layout and buffer bound stores the same bytes; memory stays bounded."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import zarr
from bluesky import RunEngine
from bluesky.plans import grid_scan
from event_model import pack_event_page
from ophyd.sim import det

from bluesky_zarr import ZarrWriter
from bluesky_zarr.sim import PointCamera, frame_at, motors
from bluesky_zarr.write._buffer import MERGE_COPIES

from conftest import assert_frames_match, assert_times, open_stream

Docs = list[tuple[str, dict[str, Any]]]

WAVELENGTHS = np.linspace(400, 700, 3)
POSITIONS = np.linspace(0, 5, 4)
FRAME = (6, 8)
FRAME_BYTES = 6 * 8 * 2


def record_grid(frame: tuple[int, int], n_outer: int, n_inner: int) -> Docs:
    RE = RunEngine({}, call_returns_result=False)
    docs: Docs = []
    RE.subscribe(lambda name, doc: docs.append((name, copy.deepcopy(doc))))
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=frame, name="cam")
    RE(
        grid_scan(
            [cam, det], wavelength, 400, 700, n_outer, position, 0, 5, n_inner, snake_axes=True
        )
    )
    return docs


@pytest.fixture(scope="module")
def grid_docs() -> Docs:
    return record_grid(FRAME, 3, 4)


def point_of(event: dict[str, Any]) -> tuple[int, int]:
    """The grid point of an event, from the setpoints it reports."""
    data = event["data"]
    i = int(np.argmin(np.abs(WAVELENGTHS - data["wavelength_setpoint"])))
    j = int(np.argmin(np.abs(POSITIONS - data["position_setpoint"])))
    assert np.isclose(WAVELENGTHS[i], data["wavelength_setpoint"])
    assert np.isclose(POSITIONS[j], data["position_setpoint"])
    return i, j


@pytest.fixture(scope="module")
def reference(grid_docs, tmp_path_factory) -> dict[str, np.ndarray]:
    """The arrays a plain zarr store holds when each event is written at its point."""
    group = zarr.open_group(tmp_path_factory.mktemp("reference"), mode="w", zarr_format=3)
    arrays = {
        "cam_image": group.create_array(
            "cam_image", shape=(3, 4) + FRAME, dtype="uint16", chunks=(1, 1) + FRAME, fill_value=0
        ),
        "det": group.create_array(
            "det", shape=(3, 4), dtype="float64", chunks=(3, 4), fill_value=np.nan
        ),
        "seq_num": group.create_array(
            "seq_num", shape=(3, 4), dtype="int64", chunks=(3, 4), fill_value=0
        ),
        "time": group.create_array(
            "time", shape=(3, 4), dtype="float64", chunks=(3, 4), fill_value=np.nan
        ),
    }
    for name, event in grid_docs:
        if name != "event":
            continue
        i, j = point_of(event)
        arrays["cam_image"][i, j] = event["data"]["cam_image"]
        arrays["det"][i, j] = event["data"]["det"]
        arrays["seq_num"][i, j] = event["seq_num"]
        arrays["time"][i, j] = event["time"]
    result = {name: array[...] for name, array in arrays.items()}
    for i, j in np.ndindex(3, 4):
        expected = frame_at({"wavelength": WAVELENGTHS[i], "position": POSITIONS[j]}, FRAME)
        np.testing.assert_array_equal(result["cam_image"][i, j], expected)
    assert (result["seq_num"] > 0).all()
    return result


def as_pages(docs: Docs, size: int) -> Docs:
    out: Docs = []
    events = [d for n, d in docs if n == "event"]
    for name, doc in docs:
        if name == "event":
            if doc is events[0]:
                for at in range(0, len(events), size):
                    out.append(("event_page", dict(pack_event_page(*events[at : at + size]))))
            continue
        out.append((name, doc))
    return out


LAYOUTS: dict[str, dict[str, Any]] = {
    "default": {},
    "user-shards": {"shards": {"cam_image": (3, 2) + FRAME}},
    "outer-chunks": {"chunks": {"cam_image": (3, 1) + FRAME}},
    "outer-chunks-spilling": {
        "chunks": {"cam_image": (3, 1) + FRAME},
        "max_buffer_bytes": 4 * FRAME_BYTES,
        "flush_interval": None,
    },
    "split-frames-in-one-shard": {
        "chunks": {"cam_image": (1, 1, 3, 4)},
        "shards": {"cam_image": (3, 4) + FRAME},
        "max_buffer_bytes": 5 * FRAME_BYTES,
    },
    "uneven-chunks-and-scalars": {
        "chunks": {"cam_image": (2, 3, 5, 3), "det": (2, 3), "seq_num": (2, 1)},
        "max_buffer_bytes": 3 * FRAME_BYTES,
        "workers": 1,
    },
    "uncompressed": {"compressors": None},
    "uncompressed-one-byte-buffer": {
        "compressors": None,
        "max_buffer_bytes": 1,
        "flush_interval": None,
        "workers": 3,
    },
    "outer-chunks-timed-flush": {
        "chunks": {"cam_image": (3, 1) + FRAME},
        "flush_interval": 0.001,
    },
}


@pytest.mark.parametrize("page_size", [None, 5], ids=["events", "pages"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_stores_the_reference_bytes(
    grid_docs, reference, tmp_path, layout, page_size
):
    options = LAYOUTS[layout]
    feed = grid_docs if page_size is None else as_pages(grid_docs, page_size)
    writer = ZarrWriter(tmp_path, **options)
    for name, doc in feed:
        writer(name, doc)
    store = writer.stores[0]
    group = zarr.open_group(store, mode="r")["primary"]
    assert isinstance(group, zarr.Group)
    image = group["cam_image"]
    assert isinstance(image, zarr.Array)
    if "chunks" in options:
        assert image.chunks == options["chunks"]["cam_image"]
    if "shards" in options:
        assert image.shards == options["shards"]["cam_image"]
    ds = open_stream(store)
    for name, expected in reference.items():
        array = group[name]
        assert isinstance(array, zarr.Array)
        stored = array[...]
        assert stored.dtype == expected.dtype, name
        assert stored.shape == expected.shape, name
        assert stored.tobytes() == expected.tobytes(), name
        if name == "time":  # CF: xarray decodes it to dates
            assert_times(ds[name], expected)
        else:
            assert ds[name].values.tobytes() == expected.tobytes(), name
    assert bool(ds["_written"].all())
    np.testing.assert_array_equal(ds["wavelength"].values, WAVELENGTHS)
    np.testing.assert_array_equal(ds["position"].values, POSITIONS)


# ------------------------------------------------------------- memory bound
BIG_FRAME = (32, 32)
BIG_FRAME_BYTES = 32 * 32 * 2


@pytest.fixture(scope="module")
def big_grid_docs() -> Docs:
    return record_grid(BIG_FRAME, 4, 5)


def run_writer(docs: Docs, directory, **options: Any) -> tuple[Any, dict[str, Any]]:
    writer = ZarrWriter(directory, **options)
    for name, doc in docs:
        writer(name, doc)
    store = writer.stores[0]
    info = zarr.open_group(store, mode="r").attrs["bluesky_zarr"]
    assert isinstance(info, dict)
    return store, info


@pytest.mark.parametrize(
    "options, frames_per_block",
    [
        # All wavelengths of a position: a block completes only in the last
        # row, so four are open at once unless the bound makes them spill.
        ({"chunks": {"cam_image": (4, 1) + BIG_FRAME}}, 4),
        # The default layout: a shard is a row of positions.
        ({}, 5),
        # One frame per chunk, unsharded.
        ({"chunks": {"cam_image": (1, 1) + BIG_FRAME}}, 1),
    ],
    ids=["outer-chunks", "default-row-shards", "frame-chunks"],
)
@pytest.mark.parametrize("flush_interval", [None, 5.0])
def test_buffer_peak_stays_within_the_bound(
    big_grid_docs, tmp_path, options, frames_per_block, flush_interval
):
    # The bound covers a block and the copies made while writing (or merging) it.
    limit = ((1 + MERGE_COPIES) * frames_per_block + 1) * BIG_FRAME_BYTES
    store, info = run_writer(
        big_grid_docs,
        tmp_path / "bounded",
        max_buffer_bytes=limit,
        flush_interval=flush_interval,
        **options,
    )
    assert info["max_buffer_bytes"] == limit
    # At least one block was held in memory: the record is a real measurement.
    assert info["buffer_peak_bytes"] >= frames_per_block * BIG_FRAME_BYTES
    assert info["buffer_peak_bytes"] <= limit
    ds = open_stream(store)
    motors_at = {"wavelength": "wavelength", "position": "position"}
    assert assert_frames_match(ds, "cam_image", motors_at, BIG_FRAME) == 20
    assert bool(ds["_written"].all())
    assert info["streams"]["primary"]["written_points"] == 20


def test_outer_chunks_need_more_than_the_bound_without_it(big_grid_docs, tmp_path):
    """The bound does work: unbounded, the same layout holds more than it allows."""
    options = {"chunks": {"cam_image": (4, 1) + BIG_FRAME}, "flush_interval": None}
    unbounded_store, unbounded = run_writer(big_grid_docs, tmp_path / "unbounded", **options)
    limit = ((1 + MERGE_COPIES) * 4 + 1) * BIG_FRAME_BYTES
    assert unbounded["buffer_peak_bytes"] > limit
    store, bounded = run_writer(
        big_grid_docs, tmp_path / "bounded", max_buffer_bytes=limit, **options
    )
    assert bounded["buffer_peak_bytes"] <= limit
    unbounded_image = zarr.open_group(unbounded_store, mode="r")["primary/cam_image"]
    assert isinstance(unbounded_image, zarr.Array)
    ds = open_stream(store)
    np.testing.assert_array_equal(ds["cam_image"].values, unbounded_image[...])
    assert bool(ds["_written"].all())
