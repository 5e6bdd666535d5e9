"""``replay`` of a batch as recorded at a beamline: an ophyd v1 area detector
run (``AD_HDF5`` resource/datum, its frames in an HDF5 file) among others,
read with a handler given on the command line or declared by an installed
package; a run that cannot be read does not stop the batch; Ctrl-C ends the
replay with its stores finished.

The command runs as a user runs it: a real process, its handlers imported
from modules and entry points on its path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.plans import count, grid_scan
from event_model import NumpyEncoder, compose_run
from ophyd.sim import det

import bluesky_zarr
from bluesky_zarr._cli import main
from bluesky_zarr.sim import PointCamera, motors

from conftest import assert_frames_match, open_stream, open_tree

Docs = list[tuple[str, dict[str, Any]]]
SOURCE = Path(bluesky_zarr.__file__).resolve().parents[1]
FRAME = (6, 5)

#: A beamline's own handler module: reads an area detector's HDF5 frames and
#: notes each file it opens (so the test knows which handler read them).
HANDLERS = '''
import os
import time

import h5py


class FramesHandler:
    def __init__(self, path, frame_per_point=1):
        self.per_point = frame_per_point
        self.file = h5py.File(path, "r")
        with open(os.environ["HANDLER_LOG"], "a") as log:
            log.write(f"{type(self).__name__} {path}\\n")

    def __call__(self, point_number):
        start = point_number * self.per_point
        return self.file["/entry/data/data"][start : start + self.per_point]

    def close(self):
        self.file.close()


class GatedHandler(FramesHandler):
    """Waits, at its fourth point, until the test lets it go on."""

    def __call__(self, point_number):
        if point_number == 3:
            gate = os.environ["HANDLER_GATE"]
            open(gate + ".reached", "w").close()
            for _ in range(1200):  # a minute at most
                if os.path.exists(gate + ".release"):
                    break
                time.sleep(0.05)
        return super().__call__(point_number)
'''


def _jsonl(path: Path, docs: Docs) -> Path:
    """The documents as suitcase-jsonl writes them."""
    path.write_text("".join(json.dumps(item, cls=NumpyEncoder) + "\n" for item in docs))
    return path


def _record(plan: Any) -> Docs:
    docs: Docs = []
    RunEngine({})(plan, lambda name, doc: docs.append((name, doc)))
    return docs


def area_detector_run(directory: Path, spec: str = "AD_HDF5") -> tuple[Docs, np.ndarray]:
    """Documents of a 2 x 3 grid whose frames an ophyd v1 area detector wrote
    to one HDF5 file (written here with h5py), with a baseline stream; and
    the frames at each point of the grid."""
    frames = (np.arange(6 * FRAME[0] * FRAME[1], dtype="<u2") * 7 + 11).reshape(6, *FRAME)
    directory.mkdir(parents=True)
    with h5py.File(directory / "cam_000.h5", "w") as file:
        file.create_dataset("/entry/data/data", data=frames, chunks=(1, *FRAME))
    bundle = compose_run(metadata={
        "plan_name": "grid_scan", "scan_id": 2, "shape": [2, 3], "motors": ["a", "b"],
        "num_points": 6, "hints": {"dimensions": [(["a"], "primary"), (["b"], "primary")]},
    })
    docs: Docs = [("start", bundle.start_doc)]
    baseline = bundle.compose_descriptor(name="baseline", data_keys={
        "ring_current": {"source": "PV:ring", "dtype": "number", "shape": []},
    })
    docs.append(("descriptor", baseline.descriptor_doc))
    docs.append(("event", baseline.compose_event(
        data={"ring_current": 401.5}, timestamps={"ring_current": 0.0}, seq_num=1
    )))
    primary = bundle.compose_descriptor(name="primary", data_keys={
        "cam_image": {"source": "PV:cam", "dtype": "array", "dtype_numpy": "<u2",
                      "shape": list(FRAME), "external": "FILESTORE:"},
        "a": {"source": "sim", "dtype": "number", "shape": []},
        "b": {"source": "sim", "dtype": "number", "shape": []},
    })
    docs.append(("descriptor", primary.descriptor_doc))
    resource = bundle.compose_resource(
        spec=spec, root=str(directory), resource_path="cam_000.h5",
        resource_kwargs={"frame_per_point": 1},
    )
    docs.append(("resource", resource.resource_doc))
    expected = np.zeros((2, 3, *FRAME), dtype="<u2")
    for n, (a, b) in enumerate(np.ndindex(2, 3)):
        datum = resource.compose_datum(datum_kwargs={"point_number": n})
        docs.append(("datum", datum))
        docs.append(("event", primary.compose_event(
            data={"cam_image": datum["datum_id"], "a": float(a), "b": float(b)},
            timestamps={"cam_image": 0.0, "a": 0.0, "b": 0.0}, seq_num=n + 1,
            filled={"cam_image": False},
        )))
        expected[a, b] = frames[n]
    docs.append(("event", baseline.compose_event(
        data={"ring_current": 399.0}, timestamps={"ring_current": 0.0}, seq_num=2
    )))
    docs.append(("stop", bundle.compose_stop()))
    return docs, expected


def fly_run() -> Docs:
    """A run whose only stream is ``fly`` (no ``primary``)."""
    bundle = compose_run(metadata={"plan_name": "fly", "scan_id": 4})
    stream = bundle.compose_descriptor(name="fly", data_keys={
        "energy": {"source": "PV:mono", "dtype": "number", "shape": []},
    })
    docs: Docs = [("start", bundle.start_doc), ("descriptor", stream.descriptor_doc)]
    for n in range(4):
        docs.append(("event", stream.compose_event(
            data={"energy": 8000.0 + n}, timestamps={"energy": 0.0}, seq_num=n + 1
        )))
    docs.append(("stop", bundle.compose_stop()))
    return docs


def grid_run() -> Docs:
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=(8, 8), name="cam")
    return _record(grid_scan([cam], wavelength, 1, 2, 2, position, 0, 2, 3))


def handler_path(tmp_path: Path, entry_point: str | None = None) -> Path:
    """A directory holding the beamline's handler module, and, if
    ``entry_point`` is given, the metadata of an installed package that
    declares it (``SPEC = module:Class``) in the ``databroker.handlers`` group."""
    directory = tmp_path / ("installed" if entry_point else "handlers")
    directory.mkdir()
    (directory / "beamline_handlers.py").write_text(HANDLERS)
    if entry_point is not None:
        info = directory / "beamline_handlers-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: beamline-handlers\nVersion: 1.0\n"
        )
        (info / "entry_points.txt").write_text(f"[databroker.handlers]\n{entry_point}\n")
    return directory


def replay_command(
    args: list[str], tmp_path: Path, path: Path, **popen: Any
) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(SOURCE), str(path), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
        "HANDLER_LOG": str(tmp_path / "handlers.log"),
        "HANDLER_GATE": str(tmp_path / "gate"),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "bluesky_zarr._cli", "replay", *args, "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen,
    )


def stores_by_uid(out: Path) -> dict[str, Path]:
    return {open_tree(s).attrs["start"]["uid"]: s for s in out.glob("*.zarr")}


def summary_line(stdout: str, file: str) -> str:
    (line,) = [line for line in stdout.splitlines() if line.strip().startswith(file + ":")]
    return line


def test_a_batch_with_an_area_detector_run_in_the_middle_uses_the_handler_given(tmp_path):
    counted = _record(count([det], num=3))
    ad_docs, ad_frames = area_detector_run(tmp_path / "detector")
    files = [
        _jsonl(tmp_path / "1-count.jsonl", counted),
        _jsonl(tmp_path / "2-ad.jsonl", ad_docs),
        _jsonl(tmp_path / "3-grid.jsonl", grid_run()),
        _jsonl(tmp_path / "4-fly.jsonl", fly_run()),
    ]
    out = tmp_path / "out"
    process = replay_command(
        [*map(str, files), "--out", str(out),
         "--handler", "AD_HDF5=beamline_handlers:FramesHandler"],
        tmp_path, handler_path(tmp_path),
    )
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr

    # The handler given read the detector's file.
    log = (tmp_path / "handlers.log").read_text().splitlines()
    assert log == [f"FramesHandler {tmp_path / 'detector' / 'cam_000.h5'}"]
    stores = stores_by_uid(out)
    assert len(stores) == 4
    ad = open_stream(stores[ad_docs[0][1]["uid"]])
    np.testing.assert_array_equal(ad["cam_image"].values, ad_frames)
    assert bool(ad["_written"].all())
    assert open_tree(stores[ad_docs[0][1]["uid"]]).attrs["bluesky_zarr"]["complete"] is True

    # Every stream's points are counted; a run without a primary stream too.
    assert "Replayed 4 file(s), 4 run(s)" in stdout
    assert "3 of 3 points written, success" in summary_line(stdout, "1-count.jsonl")
    assert "6 of 6 points written (baseline 2 of 2), success" in (
        summary_line(stdout, "2-ad.jsonl")
    )
    assert "6 of 6 points written, success" in summary_line(stdout, "3-grid.jsonl")
    fly = summary_line(stdout, "4-fly.jsonl")
    assert "no primary stream; points written: fly 4 of 4, success" in fly
    assert "0 of" not in fly
    (fly_uid,) = [uid for uid, s in stores.items() if open_tree(s).attrs["start"]["plan_name"]
                  == "fly"]
    fly_store = stores[fly_uid]
    assert open_stream(fly_store, "fly")["energy"].values.tolist() == [8000, 8001, 8002, 8003]


def test_installed_handlers_are_used_and_a_run_without_one_does_not_stop_the_batch(tmp_path):
    ad_docs, ad_frames = area_detector_run(tmp_path / "detector")
    # A detector whose spec no handler reads here.
    other_docs, _ = area_detector_run(tmp_path / "other", spec="BEAMLINE_EIGER")
    grid = grid_run()
    files = [
        _jsonl(tmp_path / "1-ad.jsonl", ad_docs),
        _jsonl(tmp_path / "2-other.jsonl", other_docs),
        _jsonl(tmp_path / "3-grid.jsonl", grid),
    ]
    out = tmp_path / "out"
    installed = handler_path(tmp_path, "AD_HDF5 = beamline_handlers:FramesHandler")
    process = replay_command([*map(str, files), "--out", str(out)], tmp_path, installed)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 1
    assert "Traceback" not in stderr

    # The installed package's handler read the detector's file.
    log = (tmp_path / "handlers.log").read_text().splitlines()
    assert log == [f"FramesHandler {tmp_path / 'detector' / 'cam_000.h5'}"]
    stores = stores_by_uid(out)
    np.testing.assert_array_equal(
        open_stream(stores[ad_docs[0][1]["uid"]])["cam_image"].values, ad_frames
    )
    # The run nothing reads: its other streams written, its refused documents
    # kept in its store, the store not complete, the reason said, and the
    # batch went on to the next file.
    other = stores[other_docs[0][1]["uid"]]
    line = summary_line(stdout, "2-other.jsonl")
    assert "INCOMPLETE (no stop document)" not in line
    assert "baseline 2 of 2" in line and "success, INCOMPLETE: 13 document(s) REFUSED" in line
    assert "UnknownSpecError" in line and "'BEAMLINE_EIGER'" in line
    errors = stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("bluesky-zarr replay: error: 2-other.jsonl")
    assert "--handler BEAMLINE_EIGER=module:Class" in errors[0]
    kept = [json.loads(line) for line in (other / "refused_documents.jsonl").read_text()
            .splitlines()]
    # (The start document gives the grid's shape but not how it is walked:
    # the first event is held until the second shows the grid, so it is
    # refused, and kept as the run holds it, a page of one event, after the
    # second datum.)
    assert [entry["name"] for entry in kept] == (
        ["resource", "datum", "datum", "event_page"] + ["event", "datum"] * 4 + ["event"]
    )
    assert kept[3]["doc"]["seq_num"] == [1]
    info = open_tree(other).attrs["bluesky_zarr"]
    assert info["complete"] is False and info["refused_documents"] == 13
    assert open_stream(other, "baseline")["ring_current"].values.tolist() == [401.5, 399.0]
    assert not bool(open_stream(other)["_written"].any())
    grid_store = stores[grid[0][1]["uid"]]
    assert "6 of 6 points written, success" in summary_line(stdout, "3-grid.jsonl")
    assert assert_frames_match(
        open_stream(grid_store), "cam_image",
        {"wavelength": "wavelength", "position": "position"}, (8, 8),
    ) == 6


def test_area_detector_handlers_installed_from_pypi_read_the_frames(tmp_path, capsys):
    # area-detector-handlers declares its handlers as databroker does find them.
    from importlib.metadata import entry_points

    declared = {ep.name: ep.value for ep in entry_points(group="databroker.handlers")}
    assert declared["AD_HDF5"] == "area_detector_handlers.handlers:AreaDetectorHDF5Handler"
    docs, frames = area_detector_run(tmp_path / "detector")
    recorded = _jsonl(tmp_path / "ad.jsonl", docs)
    out = tmp_path / "out"
    assert main(["replay", str(recorded), "--out", str(out), "--no-progress"]) == 0, (
        capsys.readouterr().err
    )
    (store,) = out.glob("*.zarr")
    np.testing.assert_array_equal(open_stream(store)["cam_image"].values, frames)
    assert open_tree(store).attrs["bluesky_zarr"]["complete"] is True


def test_a_handler_that_cannot_be_imported_is_a_one_line_error(tmp_path, capsys):
    recorded = _jsonl(tmp_path / "ad.jsonl", area_detector_run(tmp_path / "detector")[0])
    for given, says in [
        ("AD_HDF5", "expected a handler as SPEC=module:Class"),
        ("AD_HDF5=no_such_module_here:Handler", "cannot import 'no_such_module_here'"),
        ("AD_HDF5=bluesky_zarr:NoSuchHandler", "'bluesky_zarr' has no 'NoSuchHandler'"),
    ]:
        with pytest.raises(SystemExit) as exit:
            main(["replay", str(recorded), "--out", str(tmp_path / "out"), "--handler", given])
        assert exit.value.code == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_ctrl_c_during_replay_finishes_the_stores_without_a_traceback(tmp_path):
    counted = _record(count([det], num=3))
    ad_docs, ad_frames = area_detector_run(tmp_path / "detector")
    files = [
        _jsonl(tmp_path / "1-count.jsonl", counted),
        _jsonl(tmp_path / "2-ad.jsonl", ad_docs),
        _jsonl(tmp_path / "3-grid.jsonl", grid_run()),
    ]
    out = tmp_path / "out"
    process = replay_command(
        [*map(str, files), "--out", str(out),
         "--handler", "AD_HDF5=beamline_handlers:GatedHandler"],
        tmp_path, handler_path(tmp_path),
    )
    reached = tmp_path / "gate.reached"
    for _ in range(1200):  # the handler is at the fourth point (a minute at most)
        if reached.exists() or process.poll() is not None:
            break
        time.sleep(0.05)
    assert reached.exists(), process.communicate()
    process.send_signal(signal.SIGINT)  # Ctrl-C, while a frame is being read
    (tmp_path / "gate.release").touch()
    stdout, stderr = process.communicate(timeout=300)

    assert process.returncode == 130
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "bluesky-zarr replay: interrupted (SIGINT)" in stderr
    assert "INTERRUPTED by SIGINT" in stdout
    assert "3 of 3 points written, success" in summary_line(stdout, "1-count.jsonl")
    assert "INTERRUPTED (SIGINT)" in summary_line(stdout, "2-ad.jsonl")
    assert "3-grid.jsonl" not in stdout  # not replayed

    stores = stores_by_uid(out)
    assert len(stores) == 2
    store = stores[ad_docs[0][1]["uid"]]
    info = open_tree(store).attrs["bluesky_zarr"]
    assert info["complete"] is False
    assert "interrupted (SIGINT)" in info["incomplete_reason"]
    assert "failed" not in info["incomplete_reason"]
    # The points read before the signal, and the one being read, are on disk.
    ds = open_stream(store)
    written = ds["_written"].values
    assert written.ravel().tolist() == [True] * 4 + [False] * 2
    for index in zip(*np.nonzero(written)):
        np.testing.assert_array_equal(ds["cam_image"].values[index], ad_frames[index])
    assert not list(out.glob(".*lock"))  # the lock released
