"""Recorded documents fed as events and as event pages; order and data errors."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import numpy as np
import pytest
from bluesky.plans import grid_scan
from event_model import pack_event_page
from ophyd.sim import det

import bluesky_zarr
from bluesky_zarr import ZarrWriter
from bluesky_zarr.sim import PointCamera, motors

from conftest import assert_frames_match, open_stream

Docs = list[tuple[str, dict[str, Any]]]


def record_grid(RE, snake: bool = True) -> Docs:
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=(6, 10), name="cam")
    docs: Docs = []
    RE.subscribe(lambda name, doc: docs.append((name, copy.deepcopy(doc))))
    RE(grid_scan([cam, det], wavelength, 400, 700, 3, position, 0, 5, 4, snake_axes=snake))
    return docs


def as_pages(docs: Docs, page_size: int) -> Docs:
    """The same run with its events packed into event pages of ``page_size``."""
    out: Docs = []
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        for _, group in itertools.groupby(pending, key=lambda e: e["descriptor"]):
            group = list(group)
            for i in range(0, len(group), page_size):
                out.append(("event_page", pack_event_page(*group[i : i + page_size])))
        pending.clear()

    for name, doc in docs:
        if name == "event":
            pending.append(doc)
            continue
        flush()
        out.append((name, doc))
    flush()
    return out


@pytest.mark.parametrize("page_size", [None, 1, 5, 100])
def test_recorded_documents_as_events_and_pages(RE, tmp_path, page_size):
    docs = record_grid(RE)
    feed = docs if page_size is None else as_pages(docs, page_size)
    if page_size:
        assert any(name == "event_page" for name, _ in feed)
    writer = ZarrWriter(tmp_path)
    for name, doc in feed:
        writer(name, doc)
    ds = open_stream(writer.stores[0])
    motors_at = {"wavelength": "wavelength", "position": "position"}
    assert assert_frames_match(ds, "cam_image", motors_at, (6, 10)) == 12
    assert bool(ds["_written"].all())


def test_events_and_pages_give_identical_stores(RE, tmp_path):
    docs = record_grid(RE)
    stores = []
    for n, feed in enumerate([docs, as_pages(docs, 4)]):
        writer = ZarrWriter(tmp_path / str(n))
        for name, doc in feed:
            writer(name, doc)
        stores.append(open_stream(writer.stores[0]))
    for name in ["cam_image", "det", "seq_num", "time", "_written", "wavelength"]:
        np.testing.assert_array_equal(stores[0][name].values, stores[1][name].values)


def test_repeated_seq_num_overwrites_its_point(RE, tmp_path):
    docs = record_grid(RE, snake=False)
    events = [d for n, d in docs if n == "event"]
    replay = copy.deepcopy(events[5])
    replay["data"]["det"] = 123.0
    feed = [(n, d) for n, d in docs if n != "stop"] + [("event", replay)]
    feed.append(next((n, d) for n, d in docs if n == "stop"))
    writer = ZarrWriter(tmp_path)
    for name, doc in feed:
        writer(name, doc)
    ds = open_stream(writer.stores[0])
    assert ds["det"].values[1, 1] == 123.0
    assert sorted(ds["seq_num"].values.ravel().tolist()) == list(range(1, 13))


def start_of(docs: Docs) -> Docs:
    return [(n, d) for n, d in docs if n in ("start", "descriptor")]


def test_event_before_descriptor_is_refused(RE, tmp_path):
    docs = record_grid(RE)
    writer = ZarrWriter(tmp_path)
    writer(*docs[0])
    event = next(d for n, d in docs if n == "event")
    with pytest.raises(bluesky_zarr.DocumentOrderError, match="descriptor"):
        writer("event", event)


def test_documents_of_a_run_never_started_are_refused(RE, tmp_path):
    docs = record_grid(RE)
    writer = ZarrWriter(tmp_path)
    descriptor = next(d for n, d in docs if n == "descriptor")
    with pytest.raises(bluesky_zarr.DocumentOrderError, match="not started"):
        writer("descriptor", descriptor)
    with pytest.raises(bluesky_zarr.DocumentOrderError):
        writer("stop", docs[-1][1])


def test_second_start_with_same_uid_is_refused(RE, tmp_path):
    docs = record_grid(RE)
    writer = ZarrWriter(tmp_path)
    for name, doc in docs:
        writer(name, doc)
    with pytest.raises(bluesky_zarr.DocumentOrderError, match="uid"):
        writer("start", docs[0][1])
    assert len(writer.stores) == 1
    assert open_stream(writer.stores[0])["_written"].all()


def feed_with_bad_event(tmp_path, docs: Docs, mutate) -> tuple[ZarrWriter, Exception]:
    writer = ZarrWriter(tmp_path)
    events = [d for n, d in docs if n == "event"]
    for name, doc in start_of(docs):
        writer(name, doc)
    for event in events[:3]:
        writer("event", event)
    bad = copy.deepcopy(events[3])
    mutate(bad)
    with pytest.raises(bluesky_zarr.DocumentError) as info:
        writer("event", bad)
    for event in events[4:]:
        writer("event", event)
    writer("stop", docs[-1][1])
    return writer, info.value


def test_frame_of_wrong_shape_is_refused_and_nothing_lost(RE, tmp_path):
    docs = record_grid(RE, snake=False)

    def mutate(event):
        event["data"]["cam_image"] = np.zeros((5, 10), dtype="uint16")

    writer, error = feed_with_bad_event(tmp_path, docs, mutate)
    assert isinstance(error, bluesky_zarr.DataShapeError)
    assert "(6, 10)" in str(error) and "(5, 10)" in str(error)
    ds = open_stream(writer.stores[0])
    written = ds["_written"].values
    assert written.sum() == 11 and not written[0, 3]
    motors_at = {"wavelength": "wavelength", "position": "position"}
    checked = ds.where(ds["_written"], drop=False)
    assert np.isnan(checked["det"].values[0, 3])
    good = ds.isel(position=[0, 1, 2])
    assert assert_frames_match(good, "cam_image", motors_at, (6, 10)) == 9


def test_non_numeric_value_for_numeric_key_is_refused(RE, tmp_path):
    docs = record_grid(RE, snake=False)

    def mutate(event):
        event["data"]["det"] = "overflow"

    _, error = feed_with_bad_event(tmp_path, docs, mutate)
    assert isinstance(error, bluesky_zarr.DataTypeError)
    assert "det" in str(error) and "float64" in str(error)


def test_seq_num_beyond_scan_shape_is_refused(RE, tmp_path):
    docs = record_grid(RE, snake=False)

    def mutate(event):
        event["seq_num"] = 13

    _, error = feed_with_bad_event(tmp_path, docs, mutate)
    assert isinstance(error, bluesky_zarr.ScanIndexError)
    assert "13" in str(error) and "(3, 4)" in str(error)


def test_nan_and_inf_are_kept(RE, tmp_path):
    docs = record_grid(RE, snake=False)
    events = [d for n, d in docs if n == "event"]
    events[0]["data"]["det"] = float("nan")
    events[1]["data"]["det"] = float("inf")
    writer = ZarrWriter(tmp_path)
    for name, doc in docs:
        writer(name, doc)
    ds = open_stream(writer.stores[0])
    assert np.isnan(ds["det"].values[0, 0]) and np.isposinf(ds["det"].values[0, 1])
    assert bool(ds["_written"].all())


def test_large_arrays_in_configuration_stay_out_of_metadata(tmp_path):
    from event_model import compose_run

    run = compose_run()
    writer = ZarrWriter(tmp_path)
    writer("start", run.start_doc)
    frame = np.arange(200 * 200, dtype="uint16").reshape(200, 200)
    descriptor = run.compose_descriptor(
        name="primary",
        data_keys={"x": {"dtype": "number", "shape": [], "source": "s"}},
        configuration={
            "cam": {
                "data": {"cam_flatfield": frame, "cam_gain": np.array([1.5, 2.0])},
                "timestamps": {"cam_flatfield": 0.0, "cam_gain": 0.0},
                "data_keys": {
                    "cam_flatfield": {"dtype": "array", "shape": [200, 200], "source": "s"},
                    "cam_gain": {"dtype": "array", "shape": [2], "source": "s"},
                },
            }
        },
    )
    writer("descriptor", descriptor.descriptor_doc)
    writer("event", descriptor.compose_event(data={"x": 1.0}, timestamps={"x": 0.0}, seq_num=1))
    writer("stop", run.compose_stop())
    attrs = open_stream(writer.stores[0]).attrs["descriptors"][0]["configuration"]["cam"]["data"]
    assert attrs["cam_gain"] == [1.5, 2.0]
    assert "not stored in metadata" in attrs["cam_flatfield"]
    assert "(200, 200)" in attrs["cam_flatfield"]
