"""External data: detectors that write files and emit documents pointing into them.

ophyd v1 detectors (``ophyd.sim``'s ``img``, ``SynSignalWithRegistry``) write
NPY files and emit resource/datum documents; ophyd-async detectors
(``SimBlobDetector``) write HDF5 files and emit stream_resource/stream_datum
documents. The frames read back through xarray must equal what the detector
wrote into its files, at the point where it wrote them.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import bluesky.plan_stubs as bps
import h5py
import numpy as np
import pytest
from bluesky.plans import count, grid_scan
from event_model import pack_datum_page, pack_event_page
from ophyd.sim import SynSignalWithRegistry, hw
from ophyd_async import sim
from ophyd_async.core import (
    init_devices,
)

import bluesky_zarr.external._data
from bluesky_zarr import (
    DocumentOrderError,
    ExternalFileError,
    ExternalIndexError,
    HandlerError,
    NpySequenceHandler,
    OptionError,
    UnknownSpecError,
    ZarrWriter,
)
from bluesky_zarr.sim import frame_at, motors

from conftest import (
    assert_frames_match,
    assert_times,
    blob_detector,
    by_kind,
    fly,
    iter_points,
    open_stream,
    open_tree,
    quick_sleep,
    record,
    step_scan_docs,
)

Docs = list[tuple[str, dict[str, Any]]]


# ------------------------------------------------------------ resource/datum
def npy_camera(watched: list[Any], save_path: Path, **kwargs: Any) -> SynSignalWithRegistry:
    """An ophyd v1 detector writing one NPY file per frame, each frame a
    function of where the motors are."""
    save_path.mkdir(exist_ok=True)
    return SynSignalWithRegistry(
        func=lambda: frame_at({m.name: m.position for m in watched}, (12, 16), "uint16"),
        name="cam",
        save_path=str(save_path),
        **kwargs,
    )


def npy_file_of(docs: Docs, seq_num: int, key: str) -> str:
    """The file the detector wrote the frame of event ``seq_num`` into."""
    (event,) = [e for e in by_kind(docs, "event") if e["seq_num"] == seq_num]
    (datum,) = [d for d in by_kind(docs, "datum") if d["datum_id"] == event["data"][key]]
    (resource,) = [r for r in by_kind(docs, "resource") if r["uid"] == datum["resource"]]
    stem = os.path.join(resource["root"], resource["resource_path"])
    return f"{stem}_{datum['datum_kwargs']['index']}.npy"


@pytest.mark.parametrize("snake", [False, True])
def test_ophyd_sim_img_grid_scan_fills_frames_from_their_npy_files(RE, tmp_path, snake):
    m1, m2 = motors("m1", "m2")
    img = hw(save_path=str(tmp_path / "img")).img
    (tmp_path / "img").mkdir()
    cam = npy_camera([m1, m2], tmp_path / "cam")
    docs = record(RE)
    writer = ZarrWriter(tmp_path / "data")
    RE.subscribe(writer)
    RE(grid_scan([img, cam], m1, 0, 2, 3, m2, 0, 4, 4, snake_axes=snake))

    ds = open_stream(writer.stores[0])
    assert ds["img"].dims == ("m1", "m2", "y", "x")
    assert ds["img"].shape == (3, 4, 10, 10)
    # Frames of another size get dimension names of their own.
    assert ds["cam"].dims == ("m1", "m2", "cam_y", "cam_x")
    assert bool(ds["_written"].all())
    for point in iter_points(ds, ["m1", "m2"]):
        seq_num = int(ds["seq_num"].isel(point))
        for key in ("cam", "img"):
            on_disk = np.load(npy_file_of(docs, seq_num, key))
            np.testing.assert_array_equal(ds[key].isel(point).values, on_disk)
    # ... and each frame is the one taken at its point's setpoints.
    assert assert_frames_match(ds, "cam", {"m1": "m1", "m2": "m2"}, (12, 16)) == 12
    external = ds.attrs["external"]
    assert external["mode"] == "fill"
    assert {r["spec"] for r in external["resource"]} == {"NPY_SEQ"}


def as_pages(docs: Docs) -> Iterator[tuple[str, dict[str, Any]]]:
    """The same documents with every event and datum as a page of one."""
    for name, doc in docs:
        if name == "event":
            yield "event_page", pack_event_page(doc)
        elif name == "datum":
            yield "datum_page", pack_datum_page(doc)
        else:
            yield name, doc


def test_recorded_npy_run_replayed_as_pages_gives_the_same_store(RE, tmp_path):
    m1, m2 = motors("m1", "m2")
    cam = npy_camera([m1, m2], tmp_path / "cam")
    docs = record(RE)
    RE(grid_scan([cam], m1, 0, 1, 2, m2, 0, 1, 3))
    writer = ZarrWriter(tmp_path / "data")
    for name, doc in as_pages(docs):
        writer(name, doc)
    ds = open_stream(writer.stores[0])
    assert bool(ds["_written"].all())
    assert assert_frames_match(ds, "cam", {"m1": "m1", "m2": "m2"}, (12, 16)) == 6


class TextSequenceHandler:
    """A handler of our own: one text file per frame, ``<path>_<n>.txt``."""

    def __init__(self, path: str, *, dtype: str) -> None:
        self.path = path
        self.dtype = dtype

    def __call__(self, index: int) -> np.ndarray:
        return np.loadtxt(f"{self.path}_{index}.txt", dtype=self.dtype, ndmin=2)


def test_handler_registry_reads_a_spec_of_ones_own(RE, tmp_path):
    m1, m2 = motors("m1", "m2")
    cam = npy_camera(
        [m1, m2],
        tmp_path / "cam",
        save_func=lambda path, array: np.savetxt(path, array, fmt="%d"),
        save_spec="TXT_SEQ",
        save_ext="txt",
    )
    docs = record(RE)
    RE(grid_scan([cam], m1, 0, 1, 2, m2, 0, 1, 2))
    for doc in by_kind(docs, "resource"):
        # Resource keyword arguments reach the handler.
        doc["resource_kwargs"] = {"dtype": "uint16"}
    writer = ZarrWriter(tmp_path / "data", handler_registry={"TXT_SEQ": TextSequenceHandler})
    for name, doc in docs:
        writer(name, doc)
    ds = open_stream(writer.stores[0])
    assert bool(ds["_written"].all())
    assert assert_frames_match(ds, "cam", {"m1": "m1", "m2": "m2"}, (12, 16)) == 4


class CorruptFrameHandler(NpySequenceHandler):
    """Reads NPY frames, but finds the third one corrupt."""

    def __call__(self, index: int) -> np.ndarray:
        if index == 2:
            raise ValueError("checksum mismatch in frame 2")
        return super().__call__(index)


def test_a_failing_handler_raises_handler_error_naming_the_datum(RE, tmp_path):
    m1, m2 = motors("m1", "m2")
    cam = npy_camera([m1, m2], tmp_path / "cam")
    writer = ZarrWriter(tmp_path / "data", handler_registry={"NPY_SEQ": CorruptFrameHandler})
    RE.subscribe(writer)
    with pytest.raises(HandlerError, match="checksum mismatch in frame 2") as info:
        RE(grid_scan([cam], m1, 0, 1, 2, m2, 0, 1, 2))
    assert "CorruptFrameHandler" in str(info.value)
    assert "'index': 2" in str(info.value)
    ds = open_stream(writer.stores[0])
    assert ds["_written"].values.tolist() == [[True, True], [False, False]]
    np.testing.assert_array_equal(
        ds["cam"].values[0, 1], frame_at({"m1": 0.0, "m2": 1.0}, (12, 16), "uint16")
    )


def test_missing_npy_file_raises_and_earlier_points_stay_written(RE, tmp_path):
    m1, m2 = motors("m1", "m2")

    def save_dropping_the_fourth(path: str, array: np.ndarray) -> None:
        if not path.endswith("_3.npy"):
            np.save(path, array)

    cam = npy_camera([m1, m2], tmp_path / "cam", save_func=save_dropping_the_fourth)
    writer = ZarrWriter(tmp_path / "data")
    RE.subscribe(writer)
    with pytest.raises(ExternalFileError, match=r"_3\.npy") as info:
        RE(grid_scan([cam], m1, 0, 1, 2, m2, 0, 1, 3))
    assert isinstance(info.value, OSError)
    assert "external='reference'" in str(info.value)

    ds = open_stream(writer.stores[0])
    assert ds["_written"].values.tolist() == [[True, True, True], [False, False, False]]
    for point in iter_points(ds, ["m1", "m2"]):
        if bool(ds["_written"].isel(point)):
            positions = {"m1": float(ds["m1"][point["m1"]]), "m2": float(ds["m2"][point["m2"]])}
            np.testing.assert_array_equal(
                ds["cam"].isel(point).values, frame_at(positions, (12, 16), "uint16")
            )
    assert writer.stores[0].joinpath("zarr.json").exists()


def test_unknown_spec_is_refused_with_the_specs_that_are_known(RE, tmp_path):
    m1, m2 = motors("m1", "m2")
    cam = npy_camera([m1, m2], tmp_path / "cam", save_spec="NPY_SEQ_FROM_ELSEWHERE")
    writer = ZarrWriter(tmp_path / "data")
    token = RE.subscribe(writer)
    with pytest.raises(UnknownSpecError, match="NPY_SEQ_FROM_ELSEWHERE") as info:
        RE(grid_scan([cam], m1, 0, 1, 2, m2, 0, 1, 2))
    RE.unsubscribe(token)
    assert "registered: ['NPY_SEQ']" in str(info.value)
    assert "handler_registry=" in str(info.value)
    ds = open_stream(writer.stores[0])
    assert not bool(ds["_written"].any())

    # The same detector with the handler registered under that spec: filled.
    writer = ZarrWriter(
        tmp_path / "data2", handler_registry={"NPY_SEQ_FROM_ELSEWHERE": NpySequenceHandler}
    )
    RE.subscribe(writer)
    RE(grid_scan([cam], m1, 0, 1, 2, m2, 0, 1, 2))
    ds = open_stream(writer.stores[0])
    assert assert_frames_match(ds, "cam", {"m1": "m1", "m2": "m2"}, (12, 16)) == 4


def test_reference_mode_records_datums_that_lead_to_the_frames(RE, tmp_path):
    m1, m2 = motors("m1", "m2")
    cam = npy_camera([m1, m2], tmp_path / "cam")
    writer = ZarrWriter(tmp_path / "data", external="reference")
    RE.subscribe(writer)
    RE(grid_scan([cam], m1, 0, 1, 2, m2, 0, 1, 3))

    ds = open_stream(writer.stores[0])
    # Nothing was read: the frames are not in the store and no point claims them.
    assert not bool(ds["_written"].any())
    assert "cam" not in ds  # its dtype only a frame could tell
    np.testing.assert_array_equal(ds["seq_num"], [[1, 2, 3], [4, 5, 6]])
    refs = ds.attrs["external"]
    assert refs["mode"] == "reference"
    (resource,) = refs["resource"]
    datums = {d["datum_id"]: d for d in refs["datum"]}
    column = refs["event_datum"]["cam"]
    assert column["seq_num"] == [1, 2, 3, 4, 5, 6]
    # The references are enough to read each frame later, where the files are.
    handler = NpySequenceHandler(os.path.join(resource["root"], resource["resource_path"]))
    for seq_num, datum_id in zip(column["seq_num"], column["datum_id"]):
        point = dict(zip(["m1", "m2"], np.argwhere(ds["seq_num"].values == seq_num)[0]))
        positions = {"m1": float(ds["m1"][point["m1"]]), "m2": float(ds["m2"][point["m2"]])}
        frame = handler(**datums[datum_id]["datum_kwargs"])
        np.testing.assert_array_equal(frame, frame_at(positions, (12, 16), "uint16"))


def test_root_map_finds_files_moved_since_they_were_written(RE, tmp_path):
    m1, m2 = motors("m1", "m2")
    cam = npy_camera([m1, m2], tmp_path / "cam")
    docs = record(RE)
    RE(grid_scan([cam], m1, 0, 1, 2, m2, 0, 1, 2))
    (tmp_path / "cam").rename(tmp_path / "mounted")
    writer = ZarrWriter(
        tmp_path / "data", root_map={str(tmp_path / "cam"): str(tmp_path / "mounted")}
    )
    for name, doc in docs:
        writer(name, doc)
    ds = open_stream(writer.stores[0])
    assert assert_frames_match(ds, "cam", {"m1": "m1", "m2": "m2"}, (12, 16)) == 4


def test_datum_of_an_unknown_resource_is_refused(tmp_path, RE):
    m1, m2 = motors("m1", "m2")
    cam = npy_camera([m1, m2], tmp_path / "cam")
    docs = record(RE)
    RE(grid_scan([cam], m1, 0, 1, 2, m2, 0, 1, 2))
    writer = ZarrWriter(tmp_path / "data")
    with pytest.raises(DocumentOrderError, match="resource"):
        for name, doc in docs:
            if name != "resource":
                writer(name, doc)


# ----------------------------------------------- stream_resource/stream_datum


def hdf5_rows(docs: Docs, key: str) -> np.ndarray:
    """Everything the detector wrote into the dataset of data key ``key``."""
    (sres,) = [s for s in by_kind(docs, "stream_resource") if s["data_key"] == key]
    with h5py.File(urlparse(sres["uri"]).path, "r") as file:
        return file[sres["parameters"]["dataset"]][()]


@pytest.mark.parametrize("snake", [False, True])
def test_ophyd_async_blob_detector_step_scan_over_sim_motors(RE, tmp_path, snake):
    pattern = sim.PatternGenerator(sleep=quick_sleep())
    with init_devices():
        stage = sim.SimStage(pattern)
    det = blob_detector(tmp_path, pattern)
    RE(bps.mv(stage.x.velocity, 0, stage.y.velocity, 0))
    docs = record(RE)
    writer = ZarrWriter(tmp_path / "data")
    RE.subscribe(writer)
    RE(grid_scan([det], stage.x, -2, 2, 3, stage.y, 0, 3, 4, snake_axes=snake))

    (descriptor,) = by_kind(docs, "descriptor")
    assert descriptor["data_keys"]["det"]["shape"] == [1, 240, 320]
    assert descriptor["data_keys"]["det"]["external"] == "STREAM:"
    ds = open_stream(writer.stores[0])
    # The declared frames-per-point dimension of 1 is not kept.
    assert ds["det"].dims == ("stage-x", "stage-y", "y", "x")
    assert ds["det"].dtype == np.uint8
    assert ds["det-sum"].dims == ("stage-x", "stage-y")
    assert bool(ds["_written"].all())
    frames, sums = hdf5_rows(docs, "det"), hdf5_rows(docs, "det-sum")
    assert frames.shape == (12, 240, 320)
    assert len({int(s) for s in sums}) > 6, "frames should differ from point to point"
    for point in iter_points(ds, ["stage-x", "stage-y"]):
        row = int(ds["seq_num"].isel(point)) - 1
        np.testing.assert_array_equal(ds["det"].isel(point).values, frames[row])
        assert int(ds["det-sum"].isel(point)) == sums[row]
        # The frame is the one taken where the motors were at that point.
        assert float(ds["stage-x_readback"].isel(point)) == pytest.approx(
            float(ds["stage-x"][point["stage-x"]])
        )
        assert float(ds["stage-y_readback"].isel(point)) == pytest.approx(
            float(ds["stage-y"][point["stage-y"]])
        )
    assert {s["data_key"] for s in ds.attrs["external"]["stream_resource"]} == {
        "det",
        "det-sum",
    }


@pytest.mark.parametrize("frames_per_event", [1, 3])
def test_ophyd_async_fly_acquisition_appends_many_frames(
    RE, tmp_path, monkeypatch, frames_per_event
):
    # Read two events at a time: a stream_datum of many events takes several reads.
    monkeypatch.setattr(
        bluesky_zarr.external._data, "READ_BATCH_BYTES", 2 * frames_per_event * 240 * 320
    )
    positions = itertools.count(0.0, 0.37)
    pattern = sim.PatternGenerator()
    pattern.sleep = quick_sleep(lambda: pattern.set_x(next(positions)))
    det = blob_detector(tmp_path, pattern)
    docs = record(RE)
    writer = ZarrWriter(tmp_path / "data")
    RE.subscribe(writer)
    RE(fly(det, 16, frames_per_event))

    assert not by_kind(docs, "event"), "a fly scan of stream data emits no events"
    spans = [d["seq_nums"]["stop"] - d["seq_nums"]["start"] for d in by_kind(docs, "stream_datum")]
    assert sum(spans) == 2 * 16  # det and det-sum
    assert max(spans) > 1, "some stream_datum should span several events"
    ds = open_stream(writer.stores[0])
    frames, sums = hdf5_rows(docs, "det"), hdf5_rows(docs, "det-sum")
    assert frames.shape == (16 * frames_per_event, 240, 320)
    assert len({int(s) for s in sums}) > 8, "frames should differ from one another"
    if frames_per_event == 1:
        assert ds["det"].dims == ("time", "y", "x")
        np.testing.assert_array_equal(ds["det"].values, frames)
        np.testing.assert_array_equal(ds["det-sum"].values, sums)
    else:
        assert ds["det"].dims == ("time", "frame", "y", "x")
        np.testing.assert_array_equal(
            ds["det"].values, frames.reshape(16, frames_per_event, 240, 320)
        )
        np.testing.assert_array_equal(ds["det-sum"].values, sums.reshape(16, frames_per_event))
    np.testing.assert_array_equal(ds["seq_num"], np.arange(1, 17))
    assert bool(ds["_written"].all())
    # No event says when the points were taken.
    assert bool(np.isnan(ds["time"].values).all())


def test_fly_acquisition_in_reference_mode_keeps_points_unwritten(RE, tmp_path):
    pattern = sim.PatternGenerator(sleep=quick_sleep())
    det = blob_detector(tmp_path, pattern)
    writer = ZarrWriter(tmp_path / "data", external="reference")
    RE.subscribe(writer)
    RE(fly(det, 10, 1))
    ds = open_stream(writer.stores[0])
    # The points exist (their seq_num is known) but hold no frame.
    np.testing.assert_array_equal(ds["seq_num"], np.arange(1, 11))
    assert ds["det"].shape == (10, 240, 320)
    assert not bool(ds["_written"].any())
    refs = ds.attrs["external"]
    covered = sorted(
        n
        for d in refs["stream_datum"]
        for n in range(d["seq_nums"]["start"], d["seq_nums"]["stop"])
    )
    assert covered == sorted(list(range(1, 11)) * 2)  # det and det-sum


def test_count_of_a_stream_only_detector_takes_times_from_its_events(RE, tmp_path):
    pattern = sim.PatternGenerator(sleep=quick_sleep())
    det = blob_detector(tmp_path, pattern)
    docs = record(RE)
    writer = ZarrWriter(tmp_path / "data")
    RE.subscribe(writer)
    RE(count([det], 3))
    events = by_kind(docs, "event")
    assert [e["data"] for e in events] == [{}, {}, {}]
    ds = open_stream(writer.stores[0])
    assert_times(ds["time"], [e["time"] for e in events])
    np.testing.assert_array_equal(ds["det"], hdf5_rows(docs, "det"))
    assert bool(ds["_written"].all())


def test_stream_datum_beyond_the_file_raises_and_earlier_points_stay(RE, tmp_path):
    docs = step_scan_docs(RE, tmp_path, points=4)
    frames = hdf5_rows(docs, "det")
    writer = ZarrWriter(tmp_path / "data")
    events = 0
    with pytest.raises(ExternalIndexError, match=r"rows 40\.\.41 .* holds 4 rows") as info:
        for name, doc in docs:
            if name == "stream_datum" and events == 2:
                doc = {**doc, "indices": {"start": 40, "stop": 41}}
            writer(name, doc)
            events += name == "event"
    assert isinstance(info.value, IndexError)
    writer("stop", by_kind(docs, "stop")[0])
    ds = open_stream(writer.stores[0])
    assert ds["_written"].values.tolist() == [True, True, False, False]
    np.testing.assert_array_equal(ds["det"].values[:2], frames[:2])


def test_unreadable_hdf5_file_raises_or_is_referenced(RE, tmp_path):
    docs = step_scan_docs(RE, tmp_path)
    elsewhere = {str(tmp_path / "detector"): "/beamline/data/not-mounted-here"}
    writer = ZarrWriter(tmp_path / "data", root_map=elsewhere)
    with pytest.raises(ExternalFileError, match="not-mounted-here") as info:
        for name, doc in docs:
            writer(name, doc)
    assert "external='reference'" in str(info.value)
    writer("stop", by_kind(docs, "stop")[0])
    assert not bool(open_stream(writer.stores[0])["_written"].any())

    writer = ZarrWriter(tmp_path / "data2", root_map=elsewhere, external="reference")
    for name, doc in docs:
        writer(name, doc)
    ds = open_stream(writer.stores[0])
    assert ds["det"].shape == (3, 240, 320)
    assert not bool(ds["_written"].any())
    assert not ds["det"].values.any()
    refs = ds.attrs["external"]
    assert {s["data_key"] for s in refs["stream_resource"]} == {"det", "det-sum"}
    assert len(refs["stream_datum"]) == 6
    # The recorded references lead to the frames.
    frames = hdf5_rows(docs, "det")
    (sres,) = [s for s in refs["stream_resource"] if s["data_key"] == "det"]
    with h5py.File(urlparse(sres["uri"]).path, "r") as file:
        dataset = file[sres["parameters"]["dataset"]]
        for datum in refs["stream_datum"]:
            if datum["stream_resource"] == sres["uid"]:
                rows = slice(datum["indices"]["start"], datum["indices"]["stop"])
                np.testing.assert_array_equal(dataset[rows], frames[rows])


def test_shape_with_unknown_sizes_takes_the_frames_shape(RE, tmp_path):
    docs = step_scan_docs(RE, tmp_path)
    for name, doc in docs:
        if name == "descriptor":
            doc["data_keys"]["det"]["shape"] = [1, None, None]
    writer = ZarrWriter(tmp_path / "data")
    for name, doc in docs:
        writer(name, doc)
    ds = open_stream(writer.stores[0])
    assert ds["det"].dims == ("stage-x", "y", "x")
    np.testing.assert_array_equal(ds["det"].values, hdf5_rows(docs, "det"))
    assert bool(ds["_written"].all())


def test_stream_datum_before_its_stream_resource_is_refused(RE, tmp_path):
    docs = step_scan_docs(RE, tmp_path)
    writer = ZarrWriter(tmp_path / "data")
    with pytest.raises(DocumentOrderError, match="stream_resource"):
        for name, doc in docs:
            if name != "stream_resource":
                writer(name, doc)


@pytest.mark.parametrize(
    "options",
    [
        {"external": "skip"},
        {"handler_registry": {"NPY_SEQ": "not a class"}},
        {"handler_registry": ["NPY_SEQ"]},
        {"root_map": {"/a": 1}},
    ],
)
def test_bad_external_options_are_refused(tmp_path, options):
    with pytest.raises(OptionError):
        ZarrWriter(tmp_path, **options)


def test_stream_datum_frames_are_read_off_the_run_engines_thread(RE, tmp_path, monkeypatch):
    from bluesky_zarr.write._stream import StreamWriter

    placed_on: list[str] = []
    put_frames = StreamWriter.put_frames

    def recording(self: StreamWriter, key: str, index: Any, values: Any) -> None:
        placed_on.append(threading.current_thread().name)
        put_frames(self, key, index, values)

    monkeypatch.setattr(StreamWriter, "put_frames", recording)
    docs = step_scan_docs(RE, tmp_path, points=4)
    writer = ZarrWriter(tmp_path / "data")
    for name, doc in docs:
        writer(name, doc)

    # Every batch of rows was read and placed by the reader thread, not by the
    # thread that handed the documents in (the RunEngine's, in a real scan).
    assert placed_on and set(placed_on) == {"bluesky-zarr-reader-0"}
    ds = open_stream(writer.stores[0])
    assert bool(ds["_written"].all())
    np.testing.assert_array_equal(ds["det"].values, hdf5_rows(docs, "det"))


def test_a_failed_background_read_is_kept_and_raised_at_the_next_document(
    RE, tmp_path, monkeypatch
):
    from bluesky_zarr.external._data import ExternalData

    docs = step_scan_docs(RE, tmp_path, points=4)
    read_rows = ExternalData._read_rows
    calls = [0]

    def failing_second(self: ExternalData, *args: Any) -> Any:
        batches = read_rows(self, *args)
        calls[0] += 1
        if calls[0] != 2:
            return batches

        def broken() -> Any:
            raise OSError(5, "Input/output error")
            yield  # pragma: no cover - a generator that fails when read

        return broken()

    monkeypatch.setattr(ExternalData, "_read_rows", failing_second)
    writer = ZarrWriter(tmp_path / "data")
    with pytest.raises(ExternalFileError, match="reading the frames of stream_datum") as info:
        for name, doc in docs:
            writer(name, doc)
            if name == "stream_datum":
                writer.flush()  # the read has happened (or failed) by now
    assert isinstance(info.value.__cause__, OSError)
    writer("stop", by_kind(docs, "stop")[0])
    store = Path(writer.stores[0])
    lines = (store / "refused_documents.jsonl").read_text().splitlines()
    kept = [json.loads(line) for line in lines]
    # The stream_datum whose frames could not be read is kept, verbatim.
    failed = by_kind(docs, "stream_datum")[1]
    assert [line["doc"] for line in kept if line["name"] == "stream_datum"] == [failed]
    # Its point is not claimed; the store says it lacks something.
    ds = open_stream(store)
    assert not ds["_written"].values[failed["seq_nums"]["start"] - 1]
    assert open_tree(store).attrs["bluesky_zarr"]["complete"] is False
