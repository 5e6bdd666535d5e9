"""``replay`` of recorded files holding runs that never stopped."""

from __future__ import annotations

import json
from pathlib import Path, PurePath
from typing import Any

import h5py
import numpy as np
from bluesky import RunEngine
from bluesky.plans import count, scan
from event_model import NumpyEncoder
from ophyd.sim import det, motor

from bluesky_zarr._cli import main

from conftest import open_stream, open_tree


def _record(RE: RunEngine, plan: Any) -> list[tuple[str, dict[str, Any]]]:
    docs: list[tuple[str, dict[str, Any]]] = []
    RE(plan, lambda name, doc: docs.append((name, doc)))
    return docs


def _jsonl(path: Path, docs: list[tuple[str, dict[str, Any]]]) -> Path:
    path.write_text("".join(json.dumps(item, cls=NumpyEncoder) + "\n" for item in docs))
    return path


def test_a_run_without_stop_document_is_kept_and_the_batch_goes_on(
    tmp_path: Path, RE: RunEngine, capsys
) -> None:
    # suitcase-jsonl writes one file per run; the RunEngine of the first was
    # killed (its file holds no stop document), the next ones ended well.
    killed = _record(RE, scan([det], motor, 0, 1, 3))[:-1]
    done = _record(RE, count([det], num=2))
    later = _record(RE, count([det], num=4))
    files = [
        _jsonl(tmp_path / "a-killed.jsonl", killed),
        _jsonl(tmp_path / "b-done.jsonl", done),
        # Several runs in one file, the first never stopped.
        _jsonl(tmp_path / "c-both.jsonl", killed[:3] + later),
    ]
    out = tmp_path / "out"
    assert main(["replay", *map(str, files), "--out", str(out), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "Replayed 3 file(s)" in captured.out, captured.out
    assert "no stop document" in captured.err
    lines = captured.out.splitlines()[1:]
    assert "a-killed.jsonl: scan" in lines[0]
    assert "3 of 3 points written, INCOMPLETE (no stop document)" in lines[0]
    assert "b-done.jsonl: count" in lines[1] and "2 of 2 points written, success" in lines[1]
    # The killed run again in c-both.jsonl: already written (incomplete).
    assert "c-both.jsonl: scan" in lines[2] and "skipped: already written" in lines[2]
    assert "c-both.jsonl: count" in lines[3] and "4 of 4 points written, success" in lines[3]
    stores = {open_tree(s).attrs["start"]["uid"]: s for s in out.glob("*.zarr")}
    assert len(stores) == 3
    killed_store = stores[killed[0][1]["uid"]]
    info = open_tree(killed_store).attrs["bluesky_zarr"]
    assert info["complete"] is False
    assert "no stop document" in info["incomplete_reason"]
    assert "failed" not in info["incomplete_reason"]
    np.testing.assert_array_equal(
        open_stream(stores[later[0][1]["uid"]])["det"].values,
        [doc["data"]["det"] for name, doc in later if name == "event"],
    )


def test_a_run_cut_short_in_one_file_and_whole_in_the_next_says_how_to_get_it_whole(
    tmp_path: Path, RE: RunEngine, capsys
) -> None:
    docs = _record(RE, scan([det], motor, 0, 1, 3))
    partial = _jsonl(tmp_path / "a-partial.jsonl", docs[:-2])
    whole = _jsonl(tmp_path / "b-whole.jsonl", docs)
    out = tmp_path / "out"
    assert main(["replay", str(partial), str(whole), "--out", str(out), "--no-progress"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "2 of 3 points written, INCOMPLETE (no stop document)" in lines[1]
    assert "skipped: already written from a-partial.jsonl, incomplete" in lines[2]
    assert "--overwrite" in lines[2]
    # As it says: the whole file alone, with --overwrite.
    assert main(["replay", str(whole), "--out", str(out), "--no-progress", "--overwrite"]) == 0
    (store,) = out.glob("*.zarr")
    assert open_tree(store).attrs["bluesky_zarr"]["complete"] is True
    assert bool(open_stream(store)["_written"].all())


def _detector_run(RE: RunEngine, directory: Path) -> list[tuple[str, dict[str, Any]]]:
    """A grid scan of ophyd-async's simulated detector, its frames in HDF5
    files in ``directory``."""
    import asyncio

    import bluesky.plan_stubs as bps
    from bluesky.plans import grid_scan
    from ophyd_async import sim
    from ophyd_async.core import StaticPathProvider, UUIDFilenameProvider, init_devices

    async def quick_sleep(seconds: float) -> None:
        await asyncio.sleep(0.002)

    pattern = sim.PatternGenerator(sleep=quick_sleep)
    with init_devices():
        stage = sim.SimStage(pattern)
        blob = sim.SimBlobDetector(
            StaticPathProvider(UUIDFilenameProvider(), PurePath(directory)), pattern
        )
    RE(bps.mv(stage.x.velocity, 0, stage.y.velocity, 0))
    return _record(RE, grid_scan([blob], stage.x, -1, 1, 2, stage.y, 0, 1, 2))


def test_replay_of_detector_files_moved_or_gone_has_the_flags_it_advises(
    tmp_path: Path, RE: RunEngine, capsys
) -> None:
    written = tmp_path / "beamline"
    written.mkdir()
    recorded = _jsonl(tmp_path / "scan.jsonl", _detector_run(RE, written))
    (h5,) = written.glob("*.h5")
    with h5py.File(h5, "r") as file:
        frames = np.asarray(file["/entry/data/data"][()])
    moved = tmp_path / "mounted here"
    written.rename(moved)

    out = tmp_path / "out"
    assert main(["replay", str(recorded), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "--external reference" in err and "--root-map" in err, err

    # Where the files are now...
    args = ["replay", str(recorded), "--no-progress", "--overwrite"]
    assert main([*args, "--out", str(out), "--root-map", f"{written}={moved}"]) == 0, (
        capsys.readouterr().err
    )
    ds = open_stream(next(out.glob("*.zarr")))
    assert bool(ds["_written"].all())
    for index in np.ndindex(2, 2):
        np.testing.assert_array_equal(
            ds["blob"].values[index], frames[int(ds["seq_num"].values[index]) - 1]
        )
    # ... or only the references, without reading them.
    refs = tmp_path / "refs"
    assert main([*args, "--out", str(refs), "--external", "reference"]) == 0
    group = open_tree(next(refs.glob("*.zarr")))["primary"]
    assert group.attrs["external"]["stream_resource"], group.attrs["external"]
