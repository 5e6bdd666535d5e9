"""Bad documents and options are refused with this package's exceptions.

Each refusal names what was expected and what came, happens before the bad
document touches the store, and leaves the points written before it intact.
"""

from __future__ import annotations

import copy
import hashlib
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from bluesky import RunEngine
from bluesky.plans import count, grid_scan
from event_model import compose_run, pack_event_page
from ophyd.sim import SynGauss, det

import bluesky_zarr
from bluesky_zarr import ZarrWriter
from bluesky_zarr.sim import PointCamera, frame_at, motors

from conftest import open_stream

Docs = list[tuple[str, dict[str, Any]]]

FRAME = (6, 10)


@pytest.fixture(scope="module")
def grid_docs() -> Docs:
    """A recorded 3 x 4 grid scan of a camera and a scalar detector."""
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=FRAME, name="cam")
    docs: Docs = []
    RE = RunEngine({}, call_returns_result=False)
    RE.subscribe(lambda name, doc: docs.append((name, copy.deepcopy(doc))))
    RE(grid_scan([cam, det], wavelength, 400, 700, 3, position, 0, 5, 4))
    return docs


def events_of(docs: Docs) -> list[dict[str, Any]]:
    return [copy.deepcopy(d) for n, d in docs if n == "event"]


def start_good_run(tmp_path: Path, docs: Docs, good: int = 3) -> ZarrWriter:
    """A writer that has the run's start, descriptor and first ``good`` events."""
    writer = ZarrWriter(tmp_path)
    for name, doc in docs:
        if name in ("start", "descriptor"):
            writer(name, copy.deepcopy(doc))
    for event in events_of(docs)[:good]:
        writer("event", event)
    return writer


def assert_first_points_intact(writer: ZarrWriter, docs: Docs, good: int = 3) -> None:
    """Stop the run; the first ``good`` points read back as the camera took them."""
    writer("stop", copy.deepcopy(docs[-1][1]))
    ds = open_stream(writer.stores[0])
    written = ds["_written"].values.ravel()
    assert written[:good].all() and not written[good:].any()
    for event in events_of(docs)[:good]:
        point = np.unravel_index(event["seq_num"] - 1, ds["_written"].shape)
        frame = ds["cam_image"].values[point]
        np.testing.assert_array_equal(frame, event["data"]["cam_image"])
        positions = {m: event["data"][m] for m in ("wavelength", "position")}
        np.testing.assert_array_equal(frame, frame_at(positions, FRAME))
        assert ds["det"].values[point] == event["data"]["det"]


# ----------------------------------------------------------------- events


def _drop_timestamps(event: dict[str, Any]) -> None:
    del event["timestamps"]


def _data_true(event: dict[str, Any]) -> None:
    event["data"] = True


def _ragged_frame(event: dict[str, Any]) -> None:
    event["data"]["cam_image"] = [[1, 2, 3], [4, 5]]


def _seq_num_text(event: dict[str, Any]) -> None:
    event["seq_num"] = "4"


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (_drop_timestamps, bluesky_zarr.DocumentError, "lacks the field 'timestamps'"),
        (_data_true, bluesky_zarr.DocumentError, "'data' must be a mapping.*got True"),
        (_ragged_frame, bluesky_zarr.DataShapeError, "cam_image.*regular array.*\\[\\[1, 2, 3\\]"),
        (_seq_num_text, bluesky_zarr.DocumentError, "'seq_num' must be an integer, got '4'"),
    ],
    ids=["no-timestamps", "data-True", "ragged-frame", "seq_num-text"],
)
def test_bad_event_is_refused_and_earlier_points_stay(grid_docs, tmp_path, mutate, error, match):
    writer = start_good_run(tmp_path, grid_docs)
    bad = events_of(grid_docs)[3]
    mutate(bad)
    with pytest.raises(error, match=match):
        writer("event", bad)
    assert_first_points_intact(writer, grid_docs)


def _page_seq_num_scalar(page: dict[str, Any]) -> None:
    page["seq_num"] = 4


def _shorten(field: str, key: str | None = None):
    def mutate(page: dict[str, Any]) -> None:
        column = page[field] if key is None else page[field][key]
        del column[-1]

    return mutate


def _lengthen(field: str, key: str | None = None):
    def mutate(page: dict[str, Any]) -> None:
        column = page[field] if key is None else page[field][key]
        column.append(column[-1])

    return mutate


@pytest.mark.parametrize(
    "mutate, match",
    [
        (_page_seq_num_scalar, "'seq_num' must be a list, one value per event, got 4"),
        (_shorten("uid"), "'uid' has 1 values but the page has 2 events"),
        (_lengthen("uid"), "'uid' has 3 values but the page has 2 events"),
        (_shorten("time"), "'time' has 1 values but the page has 2 events"),
        (_lengthen("seq_num"), "'uid' has 2 values but the page has 3 events"),
        (_shorten("data", "det"), "data\\['det'\\] has 1 values but the page has 2"),
        (_lengthen("data", "cam_image"), "data\\['cam_image'\\] has 3 values"),
        (_shorten("timestamps", "det"), "timestamps\\['det'\\] has 1 values"),
    ],
    ids=[
        "seq_num-scalar",
        "uid-short",
        "uid-long",
        "time-short",
        "seq_num-long",
        "data-short",
        "data-long",
        "timestamps-short",
    ],
)
def test_bad_event_page_is_refused_and_earlier_points_stay(grid_docs, tmp_path, mutate, match):
    writer = start_good_run(tmp_path, grid_docs)
    page = pack_event_page(*events_of(grid_docs)[3:5])
    mutate(page)
    with pytest.raises(bluesky_zarr.DocumentError, match=match):
        writer("event_page", page)
    assert_first_points_intact(writer, grid_docs)


# ------------------------------------------------------------ descriptors


def extra_descriptor(docs: Docs, data_key: dict[str, Any]) -> dict[str, Any]:
    """A descriptor of a second stream, ``extra``, with one data key ``v``."""
    primary = next(d for n, d in docs if n == "descriptor")
    descriptor = copy.deepcopy(primary)
    descriptor.update(uid="extra-descriptor", name="extra", data_keys={"v": data_key})
    descriptor["object_keys"] = {"v": ["v"]}
    return descriptor


@pytest.mark.parametrize(
    "data_key, error, match",
    [
        (
            {"dtype": "number", "dtype_numpy": "<f16", "shape": []},
            bluesky_zarr.DataTypeError,
            "data key 'v': dtype_numpy '<f16' \\(float128\\) cannot be stored",
        ),
        (
            {"dtype": "array", "dtype_numpy": "<c32", "shape": [4]},
            bluesky_zarr.DataTypeError,
            "data key 'v': dtype_numpy '<c32'",
        ),
        (
            {"dtype": "array", "dtype_numpy": "|V0", "shape": [4]},
            bluesky_zarr.DataTypeError,
            "data key 'v': dtype_numpy '\\|V0'",
        ),
        (
            {"dtype": "array", "dtype_numpy": "<u2", "shape": [2**20, 2**20]},
            bluesky_zarr.DocumentError,
            "shape \\[1048576, 1048576\\] makes 1099511627776 elements per frame, more than",
        ),
        (
            {"dtype": "array", "dtype_numpy": "<u2", "shape": [2.5, 4]},
            bluesky_zarr.DocumentError,
            "shape must hold whole numbers, got 2.5",
        ),
    ],
    ids=["float128", "complex256", "V0", "frame-2**40", "frame-2.5"],
)
def test_bad_descriptor_is_refused_before_its_group_is_made(
    grid_docs, tmp_path, data_key, error, match
):
    writer = start_good_run(tmp_path, grid_docs)
    tracemalloc.start()
    try:
        with pytest.raises(error, match=match):
            writer("descriptor", extra_descriptor(grid_docs, dict(data_key, source="SIM:v")))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20
    assert "extra" not in zarr.open_group(writer.stores[0], mode="r")
    for event in events_of(grid_docs)[3:5]:
        writer("event", event)
    assert_first_points_intact(writer, grid_docs, good=5)


@pytest.mark.filterwarnings(
    "ignore:The data type .* does not have a Zarr V3 specification:FutureWarning"
)
def test_raw_bytes_dtype_is_stored_readably(grid_docs, tmp_path):
    # zarr-python stores numpy void ("V8") as raw bytes; it warns that this
    # data type has no stable Zarr V3 specification yet (a FutureWarning whose
    # class moved between zarr-python releases, so it is matched by message).
    writer = start_good_run(tmp_path, grid_docs)
    writer(
        "descriptor",
        extra_descriptor(grid_docs, {"dtype": "array", "dtype_numpy": "V8", "shape": [],
                                     "source": "SIM:v"}),
    )
    sent = [np.frombuffer(bytes([n] * 4 + [255 - n] * 4), dtype="V8")[0] for n in range(3)]
    for n, value in enumerate(sent):
        writer(
            "event",
            {"uid": f"v{n}", "descriptor": "extra-descriptor", "seq_num": n + 1,
             "time": time.time(), "data": {"v": value}, "timestamps": {"v": time.time()}},
        )
    assert_first_points_intact(writer, grid_docs)
    stored = open_stream(writer.stores[0], "extra")["v"]
    assert stored.dtype == np.dtype("V8")
    assert [bytes(v) for v in stored.values] == [bytes(v) for v in sent]


# ------------------------------------------------------------ start documents


@pytest.mark.parametrize(
    "shape, match",
    [
        ([2**62, 4], "makes 18446744073709551616 scan points, more than the 134217728"),
        ([1e8, 1e8], "makes 10000000000000000 scan points"),
        ([2.5, 4], "must hold whole numbers, got 2.5"),
        (["3", 4], "must be a list of integers"),
        (7, "must be a list of integers, got 7"),
    ],
    ids=["2**62x4", "1e8x1e8", "2.5", "text", "scalar"],
)
def test_absurd_scan_shapes_are_refused_quickly_without_allocating(tmp_path, shape, match):
    run = compose_run(metadata={"scan_id": 1, "shape": shape, "motors": ["m1", "m2"]})
    writer = ZarrWriter(tmp_path)
    tracemalloc.start()
    began = time.perf_counter()
    try:
        with pytest.raises(bluesky_zarr.DocumentError, match=match):
            writer("start", run.start_doc)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - began < 1.0
    assert peak < 2**20
    assert list(tmp_path.iterdir()) == []


def test_a_motor_named_for_two_dimensions_is_the_documents_fault(tmp_path):
    hints = {"dimensions": [[["m1"], "primary"], [["m1"], "primary"]]}
    run = compose_run(metadata={"scan_id": 1, "shape": [3, 4], "hints": hints})
    writer = ZarrWriter(tmp_path)
    match = "'m1' for scan dimensions 0 and 1"
    with pytest.raises(bluesky_zarr.DocumentError, match=match) as info:
        writer("start", run.start_doc)
    assert not isinstance(info.value, bluesky_zarr.OptionError)
    assert list(tmp_path.iterdir()) == []
    # Names the user gives that repeat stay the user's fault.
    run = compose_run(metadata={"scan_id": 2, "shape": [3, 4], "motors": ["a", "b"]})
    with pytest.raises(bluesky_zarr.OptionError, match="distinct"):
        ZarrWriter(tmp_path, dims=["x", "x"])("start", run.start_doc)


# ------------------------------------------------------------ store names


def test_over_long_name_components_are_shortened_recognisably(RE, tmp_path):
    peak = SynGauss("peak", motors("m")[0], "m", center=0, Imax=1, sigma=1)
    writer = ZarrWriter(tmp_path, name_template="{sample}/{sample}-{scan_id}")
    RE.subscribe(writer)
    samples = ["LaB6-" + "x" * 245 + "-a", "LaB6-" + "x" * 245 + "-b"]
    for sample in samples:
        RE(count([peak], 2), sample=sample)

    first, second = writer.stores
    assert first.parent != second.parent and first.name != second.name
    for store, sample in zip(writer.stores, samples):
        directory, name = store.relative_to(tmp_path).parts
        assert len(directory.encode()) == 200 and len(name.encode()) == 200
        digest = hashlib.sha256(sample.encode()).hexdigest()[:8]
        assert directory == sample[:191] + "-" + digest
        assert name.startswith(sample[:150]) and name.endswith(".zarr")
        ds = open_stream(store)
        assert ds["peak"].values.tolist() == [1.0, 1.0]


def test_long_literal_text_is_shortened_by_bytes(tmp_path):
    template = "é" * 150 + "-{scan_id}"  # 300 bytes of UTF-8
    writer = ZarrWriter(tmp_path, name_template=template)
    run = compose_run(metadata={"scan_id": 7})
    writer("start", run.start_doc)
    writer("stop", run.compose_stop())
    (store,) = writer.stores
    assert len(store.name.encode()) <= 200
    assert store.name.startswith("é" * 90) and store.name.endswith(".zarr")


@pytest.mark.parametrize(
    "template, match",
    [
        ("{sample.real}", "not take attributes, got \\{sample.real\\}"),
        ("{plan_args[num].real}", "not take attributes"),
        ("{scan_id", "not a valid format string"),
        ("{scan_id}}", "not a valid format string"),
        ("{}-{uid}", "must name start document fields"),
        ("{0}", "must name start document fields"),
        ("{uid!x}", "unknown conversion"),
        ("{scan_id:{width.real}}", "not take attributes"),
    ],
)
def test_bad_name_templates_are_refused_when_the_writer_is_made(tmp_path, template, match):
    with pytest.raises(bluesky_zarr.OptionError, match=match):
        ZarrWriter(tmp_path, name_template=template)


@pytest.mark.parametrize(
    "template, match",
    [
        ("{sample[5]}", "IndexError"),
        ("{plan_args[nothing]}", "KeyError"),
        ("{scan_id[0]}", "TypeError"),
        ("{uid:05d}", "ValueError"),
    ],
)
def test_templates_that_do_not_fit_the_start_document(tmp_path, template, match):
    writer = ZarrWriter(tmp_path, name_template=template)
    run = compose_run(metadata={"scan_id": 1, "sample": "ab", "plan_args": {"num": 3}})
    with pytest.raises(bluesky_zarr.DocumentError, match=match):
        writer("start", run.start_doc)
    assert list(tmp_path.iterdir()) == []


def test_templates_may_index_into_the_start_document(tmp_path):
    writer = ZarrWriter(tmp_path, name_template="{plan_args[num]}-{sample[0]}-{scan_id}")
    run = compose_run(metadata={"scan_id": 1, "sample": "ab", "plan_args": {"num": 3}})
    writer("start", run.start_doc)
    writer("stop", run.compose_stop())
    assert writer.stores[0].name == "3-a-1.zarr"


# ------------------------------------------- fields the writer keys or names by


def test_ids_must_be_strings(grid_docs, tmp_path):
    start = copy.deepcopy(grid_docs[0][1])
    start["uid"] = [start["uid"]]
    writer = ZarrWriter(tmp_path)
    with pytest.raises(bluesky_zarr.DocumentError, match="start document: 'uid' must be a string"):
        writer("start", start)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("hints", {"dimensions": {"fields": ["m1"]}}, "must be a list of \\(fields, stream\\)"),
        ("hints", {"dimensions": [["m1", "primary"]]}, "entries must be \\(fields, stream\\)"),
        ("hints", {"dimensions": np.zeros((2, 2))}, "must be a list of \\(fields, stream\\)"),
        ("motors", np.array(["m1", "m2"]), "start\\['motors'\\] must be a list of names"),
        ("snaking", "yes", "start\\['snaking'\\] must be a list of booleans"),
        ("plan_pattern", ["outer_product"], "start\\['plan_pattern'\\] must be a name"),
    ],
)
def test_scan_fields_of_the_wrong_kind(tmp_path, field, value, match):
    run = compose_run(metadata={"scan_id": 1, "shape": [3, 4]})
    start = dict(run.start_doc, **{field: value})
    with pytest.raises(bluesky_zarr.DocumentError, match=match):
        ZarrWriter(tmp_path)("start", start)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "change, match",
    [
        ({"name": ""}, "'name' must name a stream"),
        ({"name": "a/b"}, "'name' must name a stream.*got 'a/b'"),
        ({"name": ".."}, "'name' must name a stream"),
        ({"name": ["extra"]}, "'name' must name a stream"),
        ({"data_keys": {"v": {"dtype": "number", "shape": [], "source": "x", "dims": True}}},
         "data key 'v': dims must be a list of names, got True"),
        ({"data_keys": {"v": {"dtype": ["number"], "shape": [], "source": "x"}}},
         "data key 'v': dtype must be one of number, integer, boolean, string, array"),
        ({"data_keys": {"v": {"dtype": "array", "shape": [2], "source": "x",
                              "dtype_numpy": np.zeros(2)}}},
         "data key 'v': dtype_numpy must be a numpy dtype string"),
        ({"data_keys": {"v": {"dtype": "array", "shape": [2], "source": "x",
                              "external": np.zeros(2)}}},
         "data key 'v': external must be a string"),
    ],
)
def test_descriptor_fields_of_the_wrong_kind(grid_docs, tmp_path, change, match):
    writer = start_good_run(tmp_path, grid_docs)
    descriptor = extra_descriptor(grid_docs, {"dtype": "number", "shape": [], "source": "x"})
    descriptor.update(change)
    with pytest.raises(bluesky_zarr.DocumentError, match=match):
        writer("descriptor", descriptor)
    assert list(zarr.open_group(writer.stores[0], mode="r").group_keys()) == ["primary"]
    assert_first_points_intact(writer, grid_docs)


def test_metadata_without_a_json_equivalent_is_kept_as_text(grid_docs, tmp_path):
    writer = start_good_run(tmp_path, grid_docs)
    stop = copy.deepcopy(grid_docs[-1][1])
    stop["exit_status"] = np.array(["success"])
    stop["reason"] = np.longdouble(2.5)
    writer("stop", stop)
    attrs = zarr.open_group(writer.stores[0], mode="r").attrs
    assert attrs["exit_status"] == ["success"]
    assert attrs["stop"]["reason"] == repr(np.longdouble(2.5))
    # The run was stopped after its first points: the store says what it lacks.
    info = attrs["bluesky_zarr"]
    assert info["complete"] is False
    assert info["missing"]["primary"]["written"] < info["missing"]["primary"]["expected"]


@pytest.mark.parametrize(
    "batch, match",
    [
        (lambda events: {events[3]["descriptor"]: 5}, "list of events, got 5"),
        (lambda events: {events[3]["descriptor"]: [5]}, "non-event 5"),
        (lambda events: {events[3]["descriptor"]: [{**events[3], "timestamps": None}]},
         "'timestamps' must be a mapping"),
    ],
    ids=["not-a-list", "not-an-event", "bad-event"],
)
def test_bad_legacy_bulk_events_are_refused(grid_docs, tmp_path, batch, match):
    writer = start_good_run(tmp_path, grid_docs)
    with pytest.raises(bluesky_zarr.DocumentError, match=match):
        writer("bulk_events", batch(events_of(grid_docs)))
    assert_first_points_intact(writer, grid_docs)
