"""Refused documents are kept and counted; a store that lacks points says so.

ophyd runs a monitored signal's subscriptions on its own thread and only logs
their exceptions: an event the writer refuses there never reaches the
RunEngine. The writer must keep it verbatim in ``refused_documents.jsonl``,
count it, and not call the store complete when its streams hold fewer points
than the stop document's ``num_events``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bluesky import Msg, RunEngine
from bluesky import plan_stubs as bps
from bluesky.plans import grid_scan
from bluesky.preprocessors import monitor_during_wrapper
from ophyd import Signal

import bluesky_zarr
from bluesky_zarr import ZarrWriter
from bluesky_zarr.sim import PointCamera, motors

from conftest import assert_frames_match, open_stream, open_tree

MOTORS_AT = {"wavelength": "wavelength", "position": "position"}
REFUSED_FILE = "refused_documents.jsonl"

# Values set on the monitored signal, one per scan point. Each kind starts
# with the value the descriptor is made from, then mixes values that fit it
# with values that do not (which the writer must refuse).
MONITORED = {
    "array-of-another-length": (
        np.arange(5.0),
        [np.arange(5.0) + 1, np.arange(7.0), np.arange(5.0) + 2,
         np.arange(7.0) + 1, np.arange(5.0) + 3, np.arange(3.0)],
        lambda value: np.shape(value) != (5,),
    ),
    "string-where-a-number-was-declared": (
        1.5,
        [2.5, "overheated", 3.5, "overheated", 4.5, "sensor lost"],
        lambda value: isinstance(value, str),
    ),
}


def as_json(doc: Any) -> Any:
    """A document as JSON holds it: numpy arrays and scalars as plain values."""
    return json.loads(json.dumps(doc, default=lambda v: v.tolist()))


class Recorder:
    """Records every document (a deep copy, and the thread that emitted it)."""

    def __init__(self) -> None:
        self.docs: list[tuple[str, dict[str, Any], str]] = []

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        self.docs.append((name, copy.deepcopy(doc), threading.current_thread().name))

    def stop(self) -> dict[str, Any]:
        (stop,) = [doc for name, doc, _ in self.docs if name == "stop"]
        return stop

    def events(self, stream: str) -> list[tuple[dict[str, Any], str]]:
        descriptors = {
            doc["uid"] for name, doc, _ in self.docs
            if name == "descriptor" and doc["name"] == stream
        }
        return [
            (doc, thread) for name, doc, thread in self.docs
            if name == "event" and doc["descriptor"] in descriptors
        ]


def read_refused(store: Path) -> list[dict[str, Any]]:
    path = store / REFUSED_FILE
    assert path.is_file(), f"no {REFUSED_FILE} in {store}: {sorted(os.listdir(store))}"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_kept_verbatim(store: Path, refused: list[dict[str, Any]], key: str) -> None:
    """The file holds exactly the refused documents, as they were sent."""
    entries = read_refused(store)
    assert [e["name"] for e in entries] == ["event"] * len(refused)
    by_uid = {e["doc"]["uid"]: e for e in entries}
    assert sorted(by_uid) == sorted(doc["uid"] for doc in refused), (
        "the file does not hold the refused documents (and only them)"
    )
    for doc in refused:
        entry = by_uid[doc["uid"]]
        assert entry["doc"] == as_json(doc), f"event {doc['seq_num']} is not kept verbatim"
        kind, _, message = entry["error"].partition(": ")
        assert isinstance(getattr(bluesky_zarr, kind, None), type), entry["error"]
        assert issubclass(getattr(bluesky_zarr, kind), bluesky_zarr.BlueskyZarrError)
        assert key in message, f"the error does not name the data key: {entry['error']}"


def inspect_text(store: Path) -> str:
    """``bluesky-zarr inspect STORE``, run as a command on the package under test."""
    source = Path(bluesky_zarr.__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(source), *filter(None, [os.environ.get("PYTHONPATH")])]
    ))
    main = "__main__.py"
    module = "bluesky_zarr" if (source / "bluesky_zarr" / main).exists() else "bluesky_zarr._cli"
    result = subprocess.run(
        [sys.executable, "-m", module, "inspect", str(store)],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def shortfall_text(text: str) -> str:
    """What ``inspect`` says after ``complete  NO:``, up to the streams' table."""
    assert "complete  NO:" in text, f"inspect does not say the store is incomplete:\n{text}"
    after = text.split("complete  NO:", 1)[1]
    return after.split("\n\n", 1)[0]


def monitored_scan(signal: Signal, values: list[Any]) -> Any:
    """A 2 x 3 grid scan that sets ``signal`` before each point (from ophyd's
    thread, as a device would update it), with ``signal`` monitored."""
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=(8, 8), name="cam")
    queue = iter(values)

    def per_step(
        detectors: Any, step: Any, pos_cache: Any, take_reading: Any = None
    ) -> Generator[Msg, Any, None]:
        yield from bps.mv(signal, next(queue))
        yield from bps.one_nd_step(detectors, step, pos_cache, take_reading=take_reading)

    plan = grid_scan([cam], wavelength, 1, 2, 2, position, 0, 2, 3, per_step=per_step)
    return monitor_during_wrapper(plan, [signal])


def run(plan: Any, root: Path, **options: Any) -> tuple[ZarrWriter, Recorder]:
    writer = ZarrWriter(root, name_template="run", **options)
    recorder = Recorder()
    RE = RunEngine({})
    RE.subscribe(recorder)  # before the writer: it sees documents the writer refuses
    RE.subscribe(writer)
    RE(plan)
    return writer, recorder


@pytest.mark.parametrize("kind", list(MONITORED))
def test_monitor_events_refused_on_ophyds_thread_are_kept_and_counted(tmp_path, kind):
    first, values, unfit = MONITORED[kind]
    signal = Signal(name="spectrum", value=first)
    stream = "spectrum_monitor"
    plan = monitored_scan(signal, values)

    writer, recorder = run(plan, tmp_path)  # a monitor never aborts the run

    stop = recorder.stop()
    assert stop["exit_status"] == "success"
    events = recorder.events(stream)
    refused = [doc for doc, _ in events if unfit(doc["data"]["spectrum"])]
    accepted = [doc for doc, _ in events if not unfit(doc["data"]["spectrum"])]
    # The scenario: unfit values do arrive, on a thread that swallows errors.
    assert len(refused) >= 2 and accepted
    assert all(
        thread != "bluesky-run-engine" and thread != threading.main_thread().name
        for doc, thread in events if unfit(doc["data"]["spectrum"])
    )
    assert stop["num_events"][stream] == len(events)

    (store,) = writer.stores
    assert list(writer.open_runs) == []
    assert_kept_verbatim(store, refused, "spectrum")

    tree = open_tree(store)
    info = tree.attrs["bluesky_zarr"]
    assert tree.attrs["exit_status"] == "success"
    assert info["refused_documents"] == len(refused)
    assert info["complete"] is False, "the store claims completeness with refused events"
    assert info["missing"] == {
        stream: {"expected": stop["num_events"][stream], "written": len(accepted)}
    }
    assert stream in info["incomplete_reason"]

    # What was accepted is there, at its seq_num; the primary stream is whole.
    monitor = open_stream(store, stream)
    written = monitor["_written"].values
    stored = {
        int(s): monitor["spectrum"].values[i]
        for i, s in enumerate(monitor["seq_num"].values) if written[i]
    }
    assert sorted(stored) == [doc["seq_num"] for doc in accepted]
    for doc in accepted:
        np.testing.assert_array_equal(stored[doc["seq_num"]], doc["data"]["spectrum"])
    assert assert_frames_match(open_stream(store), "cam_image", MOTORS_AT, (8, 8)) == 6

    text = inspect_text(store)
    shortfall = shortfall_text(text)
    assert stream in shortfall
    assert str(stop["num_events"][stream]) in shortfall and str(len(accepted)) in shortfall
    assert REFUSED_FILE in text


def test_event_refused_on_the_run_engines_thread_aborts_and_is_kept(tmp_path):
    """A primary event the writer refuses raises in the RunEngine (the run
    ends with exit_status "fail"), and is still kept and counted."""
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=(8, 8), name="cam")

    def shrink_the_frame_after_3(name: str, doc: dict[str, Any]) -> None:
        # The descriptor said 8 x 8; from the 4th point the camera sends 4 x 4.
        if name == "event" and doc["seq_num"] == 3:
            cam.frame_shape = (4, 4)

    writer = ZarrWriter(tmp_path, name_template="run")
    recorder = Recorder()
    RE = RunEngine({})
    RE.subscribe(recorder)
    RE.subscribe(writer)
    RE.subscribe(shrink_the_frame_after_3)
    with pytest.raises(bluesky_zarr.DataShapeError, match="cam_image"):
        RE(grid_scan([cam], wavelength, 1, 2, 2, position, 0, 2, 3))

    stop = recorder.stop()
    assert stop["exit_status"] in ("fail", "abort")
    refused = [doc for doc, _ in recorder.events("primary") if doc["seq_num"] == 4]
    assert len(refused) == 1 and np.shape(refused[0]["data"]["cam_image"]) == (4, 4)
    (store,) = writer.stores
    assert list(writer.open_runs) == []
    assert_kept_verbatim(store, refused, "cam_image")

    tree = open_tree(store)
    info = tree.attrs["bluesky_zarr"]
    assert tree.attrs["exit_status"] == stop["exit_status"]
    assert info["refused_documents"] == 1
    assert info["complete"] is False
    expected = stop["num_events"]["primary"]
    assert info["missing"] == {"primary": {"expected": expected, "written": 3}}
    assert info["incomplete_reason"]
    assert int(open_stream(store)["_written"].sum()) == 3

    shortfall = shortfall_text(inspect_text(store))
    assert "primary" in shortfall


def test_an_ordinary_monitored_scan_is_complete_with_nothing_refused(tmp_path):
    """The control: nothing refused, nothing missing, no refused-documents file."""
    signal = Signal(name="spectrum", value=np.arange(5.0))
    plan = monitored_scan(signal, [np.arange(5.0) + i for i in range(6)])

    writer, recorder = run(plan, tmp_path)

    stop = recorder.stop()
    (store,) = writer.stores
    assert not (store / REFUSED_FILE).exists()
    tree = open_tree(store)
    info = tree.attrs["bluesky_zarr"]
    assert tree.attrs["exit_status"] == "success"
    assert info["complete"] is True
    assert info.get("refused_documents", 0) == 0
    assert not info.get("missing")
    assert "incomplete_reason" not in info
    for stream, n in stop["num_events"].items():
        assert int(open_stream(store, stream)["_written"].sum()) == n
    text = inspect_text(store)
    assert "complete  yes" in text and REFUSED_FILE not in text


def test_events_of_a_refused_descriptor_are_kept_and_name_its_refusal(tmp_path):
    from event_model import compose_run

    bundle = compose_run(metadata={"scan_id": 7})
    good = bundle.compose_descriptor(
        name="primary", data_keys={"x": {"dtype": "number", "shape": [], "source": "s"}}
    )
    bad = bundle.compose_descriptor(
        name="other",
        data_keys={"y": {"dtype": "number", "shape": [], "source": "s"}},
    )
    bad_doc = dict(bad.descriptor_doc)
    bad_doc["data_keys"] = {"y": {"dtype": "no-such-type", "shape": [], "source": "s"}}
    writer = ZarrWriter(tmp_path)
    writer("start", bundle.start_doc)
    writer("descriptor", good.descriptor_doc)
    writer("event", good.compose_event(data={"x": 1.5}, timestamps={"x": 0.0}, seq_num=1))
    with pytest.raises(bluesky_zarr.DocumentError, match="no-such-type"):
        writer("descriptor", bad_doc)
    lost = bad.compose_event(data={"y": 2.5}, timestamps={"y": 0.0}, seq_num=1)
    with pytest.raises(bluesky_zarr.DocumentOrderError, match="which was refused: .*no-such-type"):
        writer("event", lost)
    writer("stop", bundle.compose_stop())

    (store,) = writer.stores
    lines = [json.loads(line) for line in (Path(store) / REFUSED_FILE).read_text().splitlines()]
    assert [line["name"] for line in lines] == ["descriptor", "event"]
    assert lines[1]["doc"]["uid"] == lost["uid"] and lines[1]["doc"]["data"] == {"y": 2.5}
    info = open_tree(store).attrs["bluesky_zarr"]
    assert info["refused_documents"] == 2
    assert info["complete"] is False
    assert info["missing"] == {"other": {"expected": 1, "written": 0}}
    assert open_stream(store)["x"].values.tolist() == [1.5]


def recorded_grid_scan() -> list[tuple[str, dict[str, Any]]]:
    """The documents of a 2 x 3 grid scan of an 8 x 8 camera, as a RunEngine emits them."""
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=(8, 8), name="cam")
    recorder = Recorder()
    RE = RunEngine({})
    RE.subscribe(recorder)
    RE(grid_scan([cam], wavelength, 1, 2, 2, position, 0, 2, 3))
    return [(name, doc) for name, doc, _ in recorder.docs]


def test_a_start_delivered_twice_while_its_run_is_open_is_kept_and_counted(tmp_path):
    docs = recorded_grid_scan()
    start = docs[0][1]
    writer = ZarrWriter(tmp_path, name_template="run")
    for n, (name, doc) in enumerate(docs):
        if n == 4:  # in the middle of the events: the start once more
            with pytest.raises(bluesky_zarr.DocumentOrderError, match="a second start"):
                writer("start", copy.deepcopy(start))
        writer(name, doc)

    store = tmp_path / "run.zarr"
    (entry,) = read_refused(store)
    assert entry["name"] == "start" and entry["doc"] == as_json(start)
    assert entry["error"].startswith("DocumentOrderError: a second start document")
    info = open_tree(store).attrs["bluesky_zarr"]
    assert info["refused_documents"] == 1
    assert info["complete"] is False
    assert "1 refused document(s)" in info["incomplete_reason"]
    # The run itself is written whole.
    assert assert_frames_match(open_stream(store), "cam_image", MOTORS_AT, (8, 8)) == 6
    assert "1 refused document(s)" in shortfall_text(inspect_text(store))


def test_documents_of_a_run_delivered_again_after_its_stop_are_kept_in_its_store(tmp_path):
    docs = recorded_grid_scan()
    writer = ZarrWriter(tmp_path, name_template="run")
    for name, doc in docs:
        writer(name, doc)
    store = tmp_path / "run.zarr"
    assert open_tree(store).attrs["bluesky_zarr"]["complete"] is True

    # The whole run delivered once more (a publisher sending it again): every
    # document is refused, since the run has ended, and kept in its store.
    again = [(name, doc) for name, doc in docs if name in ("start", "descriptor", "event", "stop")]
    for name, doc in again:
        with pytest.raises(bluesky_zarr.DocumentOrderError):
            writer(name, copy.deepcopy(doc))

    entries = read_refused(store)
    assert [(e["name"], e["doc"]) for e in entries] == [
        (name, as_json(doc)) for name, doc in again
    ]
    tree = open_tree(store)
    info = tree.attrs["bluesky_zarr"]
    assert info["refused_documents"] == len(again) == info["refused_after_end"]
    assert info["complete"] is False
    assert f"{len(again)} document(s) of this run came after it ended" in (
        info["incomplete_reason"]
    )
    # The store is the run's as it ended: its frames, its stop document.
    assert tree.attrs["stop"]["uid"] == docs[-1][1]["uid"]
    assert assert_frames_match(open_stream(store), "cam_image", MOTORS_AT, (8, 8)) == 6
    assert "came after it ended" in shortfall_text(inspect_text(store))
    # The lock taken to amend the store is released: another writer may take it.
    assert not list(tmp_path.glob(".*lock"))


def test_a_datum_of_a_resource_that_names_no_run_is_kept_with_the_run_open(tmp_path):
    from event_model import compose_run

    bundle = compose_run(metadata={"scan_id": 8})
    writer = ZarrWriter(tmp_path, name_template="run")
    writer("start", bundle.start_doc)
    # An old resource document: no run_start.
    resource = {"uid": "res-1", "spec": "NPY_SEQ", "root": str(tmp_path),
                "resource_path": "frames", "resource_kwargs": {}, "path_semantics": "posix"}
    writer("resource", resource)
    broken = {"resource": "res-1", "datum_kwargs": {"index": 0}}  # no datum_id
    with pytest.raises(bluesky_zarr.DocumentError, match="datum_id"):
        writer("datum", broken)
    writer("stop", bundle.compose_stop())

    (entry,) = read_refused(tmp_path / "run.zarr")
    assert entry["name"] == "datum" and entry["doc"] == broken
    info = open_tree(tmp_path / "run.zarr").attrs["bluesky_zarr"]
    assert info["refused_documents"] == 1 and info["complete"] is False


def test_a_start_delivered_again_after_a_virtual_run_ended_is_kept_beside_it(tmp_path):
    from bluesky_zarr.catalog._inspect import describe_store
    from bluesky_zarr.catalog._ls import list_stores

    docs = recorded_grid_scan()
    writer = ZarrWriter(tmp_path, name_template="run", external="virtual")
    for name, doc in docs:
        writer(name, doc)
    with pytest.raises(bluesky_zarr.DocumentOrderError, match="a second start"):
        writer("start", copy.deepcopy(docs[0][1]))

    store = tmp_path / "run.zarr"
    (entry,) = read_refused(store)
    assert entry["name"] == "start" and entry["doc"] == as_json(docs[0][1])
    (listed,) = list_stores(tmp_path)
    assert listed["state"] == "incomplete" and "came after it ended" in listed["why"]
    run = describe_store(store)["run"]
    assert run["refused_documents"] == 1 and run["complete"] is False
    assert describe_store(store)["streams"]["primary"]["written_points"] == 6
