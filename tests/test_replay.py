"""``bluesky-zarr replay``: files recorded by suitcase-jsonl and suitcase-msgpack."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import suitcase.jsonl
import suitcase.msgpack
from bluesky import RunEngine
from bluesky.plans import count, grid_scan
from ophyd.sim import det

from bluesky_zarr import ReplayError
from bluesky_zarr._cli import main
from bluesky_zarr.feeds._replay import read_documents
from bluesky_zarr.sim import PointCamera, frame_at, motors

from conftest import assert_frames_match, open_stream, open_tree

MOTORS_AT = {"wavelength": "wavelength", "position": "position"}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> dict[str, Any]:
    """A grid scan and a count from a real RunEngine, as suitcase files."""
    root = tmp_path_factory.mktemp("recorded")
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=(8, 8), name="cam")
    runs: list[list[tuple[str, dict[str, Any]]]] = []

    def collect(name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            runs.append([])
        runs[-1].append((name, doc))

    RE = RunEngine({})
    RE(grid_scan([cam, det], wavelength, 400, 700, 3, position, 0, 5, 4, snake_axes=True), collect)
    RE(count([det], num=3), collect)
    files = {}
    for kind, module in (("jsonl", suitcase.jsonl), ("msgpack", suitcase.msgpack)):
        for label, docs in zip(("grid", "count"), runs):
            (path,) = module.export(docs, root, file_prefix=f"{label}")["all"]
            files[f"{label}.{kind}"] = Path(path)
    return {"root": root, "files": files, "runs": runs}


def _check_grid_store(store: Path, complete: bool = True) -> None:
    ds = open_stream(store)
    assert ds["cam_image"].dims == ("wavelength", "position", "y", "x")
    assert ds["_written"].all()
    assert assert_frames_match(ds, "cam_image", MOTORS_AT, (8, 8)) == 12
    assert open_tree(store).attrs["bluesky_zarr"]["complete"] is complete


@pytest.mark.parametrize("kind", ["jsonl", "msgpack"])
def test_replay_writes_the_recorded_runs(recorded, kind, tmp_path, capsys):
    grid = recorded["files"][f"grid.{kind}"]
    gzipped = tmp_path / (grid.name + ".gz")
    gzipped.write_bytes(gzip.compress(grid.read_bytes()))
    out = tmp_path / "out"

    counted = recorded["files"][f"count.{kind}"]
    code = main(["replay", str(gzipped), str(counted), "--out", str(out)])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "100%" in captured.err  # the progress bar ran to the end
    assert "Replayed 2 file(s), 2 run(s)" in captured.out
    assert "grid_scan" in captured.out and "12 of 12 points written, success" in captured.out
    assert "count" in captured.out and "3 of 3 points written, success" in captured.out
    stores = sorted(out.glob("*.zarr"))
    assert len(stores) == 2
    _check_grid_store(stores[0])
    counted = open_stream(stores[1])
    expected = [doc["data"]["det"] for name, doc in recorded["runs"][1] if name == "event"]
    np.testing.assert_array_equal(counted["det"].values, expected)


def _cut_inside_event(path: Path, number: int, tmp_path: Path) -> tuple[Path, int]:
    """A copy of a .jsonl file that ends halfway through its ``number``-th event."""
    lines = path.read_bytes().splitlines(keepends=True)
    events = [i for i, line in enumerate(lines) if line.startswith(b'["event"')]
    cut = events[number - 1]
    truncated = tmp_path / ("truncated-" + path.name)
    truncated.write_bytes(b"".join(lines[:cut]) + lines[cut][: len(lines[cut]) // 2])
    return truncated, cut + 1


def test_truncated_jsonl_names_the_line_and_keeps_what_came_before(recorded, tmp_path, capsys):
    truncated, line = _cut_inside_event(recorded["files"]["grid.jsonl"], 6, tmp_path)
    out = tmp_path / "out"

    code = main(
        ["replay", str(recorded["files"]["count.jsonl"]), str(truncated), "--out", str(out)]
    )

    captured = capsys.readouterr()
    assert code == 1
    assert f"{truncated}, line {line}: not valid JSON (the file ends mid-line" in captured.err
    assert "count" in captured.out and "3 of 3 points written, success" in captured.out
    # The run the file leaves open: the points written before the cut are counted.
    assert "grid_scan" in captured.out
    assert "5 of 12 points written, INCOMPLETE (no stop document)" in captured.out
    stores = {open_tree(s).attrs["start"]["plan_name"]: s for s in out.glob("*.zarr")}
    assert open_tree(stores["count"]).attrs["bluesky_zarr"]["complete"] is True
    partial = stores["grid_scan"]
    info = open_tree(partial).attrs["bluesky_zarr"]
    assert info["complete"] is False and "replaying" in info["incomplete_reason"]
    ds = open_stream(partial)
    assert int(ds["_written"].sum()) == 5  # the five events before the cut
    for index in zip(*np.nonzero(ds["_written"].values)):
        positions = {m: float(ds[m][i]) for m, i in zip(MOTORS_AT, index)}
        np.testing.assert_array_equal(ds["cam_image"].values[index], frame_at(positions, (8, 8)))


def test_truncated_msgpack_names_the_byte_offset(recorded, tmp_path):
    data = recorded["files"]["grid.msgpack"].read_bytes()
    truncated = tmp_path / "grid.msgpack"
    truncated.write_bytes(data[: len(data) - 40])  # inside the stop document

    with pytest.raises(ReplayError, match=r"grid.msgpack, byte \d+: the file ends inside"):
        list(read_documents(truncated))
    assert main(["replay", str(truncated), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    (store,) = (tmp_path / "out").glob("*.zarr")
    _check_grid_store(store, complete=False)


def test_truncated_gzip_and_malformed_lines_are_clear_errors(recorded, tmp_path, capsys):
    compressed = gzip.compress(recorded["files"]["grid.jsonl"].read_bytes())
    cut = tmp_path / "grid.jsonl.gz"
    cut.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(ReplayError, match="grid.jsonl.gz, line .*gzip stream is truncated"):
        list(read_documents(cut))

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(["start", {"uid": "x"}]) + "\n" + json.dumps([1, 2, 3]) + "\n")
    expected = re.escape(f"{bad}, line 2: expected a [name, document]")
    with pytest.raises(ReplayError, match=expected):
        list(read_documents(bad))

    missing = tmp_path / "missing.jsonl"
    assert main(["replay", str(missing), "--out", str(tmp_path / "out")]) == 1
    assert f"{missing}: cannot open" in capsys.readouterr().err

    other = tmp_path / "run.h5"
    other.write_bytes(b"")
    with pytest.raises(ReplayError, match="unknown format"):
        list(read_documents(other))


def test_replaying_twice_skips_what_is_written_and_refuses_to_overwrite_another_run(
    recorded, tmp_path, capsys
):
    counted = recorded["files"]["count.jsonl"]
    out = tmp_path / "out"
    assert main(["replay", str(counted), "--out", str(out), "--no-progress"]) == 0
    (store,) = out.glob("*.zarr")
    capsys.readouterr()

    # The same run again: reported and skipped, its store untouched.
    before = (store / "zarr.json").read_bytes()
    assert main(["replay", str(counted), "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "0 run(s) into" in captured.out and "1 run(s) skipped" in captured.out
    assert f"skipped: already written (pass --overwrite to write it again) -> {store}" in (
        captured.out
    )
    assert (store / "zarr.json").read_bytes() == before

    # Another run whose name collides: refused, naming the command's flags.
    grid = recorded["files"]["grid.jsonl"]
    fixed = ["--name-template", "run", "--no-progress"]
    assert main(["replay", str(counted), "--out", str(out), *fixed]) == 0
    capsys.readouterr()
    assert main(["replay", str(grid), "--out", str(out), *fixed]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err
    assert "pass --overwrite or choose another --name-template" in err
    assert "overwrite=True" not in err and "name_template" not in err

    assert main(["replay", str(grid), "--out", str(out), *fixed, "--overwrite"]) == 0
    _check_grid_store(out / "run.zarr")


def test_a_run_in_two_files_is_written_once_and_the_batch_goes_on(recorded, tmp_path, capsys):
    grid = recorded["files"]["grid.jsonl"]
    gzipped = tmp_path / (grid.name + ".gz")
    gzipped.write_bytes(gzip.compress(grid.read_bytes()))
    counted = recorded["files"]["count.jsonl"]
    out = tmp_path / "out"

    code = main(["replay", str(grid), str(gzipped), str(counted), "--out", str(out)])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Replayed 3 file(s), 2 run(s) into" in captured.out
    assert "1 run(s) skipped" in captured.out
    lines = captured.out.splitlines()
    assert "grid.jsonl: grid_scan" in lines[1] and "12 of 12 points written" in lines[1]
    assert "grid.jsonl.gz: grid_scan" in lines[2]
    assert "skipped: already written from grid.jsonl" in lines[2]
    assert "count.jsonl: count" in lines[3] and "3 of 3 points written" in lines[3]
    stores = sorted(out.glob("*.zarr"))
    assert len(stores) == 2
    _check_grid_store(stores[0])
    counted_ds = open_stream(stores[1])
    expected = [doc["data"]["det"] for name, doc in recorded["runs"][1] if name == "event"]
    np.testing.assert_array_equal(counted_ds["det"].values, expected)


def test_a_run_kept_incomplete_is_skipped_saying_so(recorded, tmp_path, capsys):
    truncated, _ = _cut_inside_event(recorded["files"]["grid.jsonl"], 6, tmp_path)
    out = tmp_path / "out"
    assert main(["replay", str(truncated), "--out", str(out), "--no-progress"]) == 1
    capsys.readouterr()

    # The whole file later: the store already holds the run, incomplete.
    grid = recorded["files"]["grid.jsonl"]
    assert main(["replay", str(grid), "--out", str(out), "--no-progress"]) == 0
    out_text = capsys.readouterr().out
    assert "skipped: already written, incomplete: " in out_text
    assert "(pass --overwrite to write it again)" in out_text
    assert main(["replay", str(grid), "--out", str(out), "--no-progress", "--overwrite"]) == 0
    (store,) = out.glob("*.zarr")
    _check_grid_store(store)
