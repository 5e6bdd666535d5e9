"""``bluesky-zarr inspect``: a store described for a person and for a program."""

from __future__ import annotations

import json
from typing import Any

import pytest
import zarr
from bluesky.plans import grid_scan
from ophyd.sim import det

from bluesky_zarr import NotAStoreError, ZarrWriter, export
from bluesky_zarr._cli import main
from bluesky_zarr.catalog._inspect import describe_store
from bluesky_zarr.sim import PointCamera, motors


@pytest.fixture
def scan_docs(RE) -> list[tuple[str, dict[str, Any]]]:
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=(8, 6), name="cam")
    docs: list[tuple[str, dict[str, Any]]] = []
    RE(
        grid_scan([cam, det], wavelength, 400, 700, 3, position, 0, 5, 4),
        lambda name, doc: docs.append((name, doc)),
    )
    return docs


def test_inspect_prints_run_streams_arrays_and_progress(scan_docs, tmp_path, capsys):
    writer = ZarrWriter(tmp_path, shards={"cam_image": (1, 4, 8, 6)})
    for name, doc in scan_docs:
        writer(name, doc)
    (store,) = writer.stores
    start = scan_docs[0][1]

    assert main(["inspect", str(store)]) == 0

    out = capsys.readouterr().out
    assert f"store     {store}" in out
    assert f"run       grid_scan  scan_id {start['scan_id']}  uid {start['uid']}" in out
    assert "scan      3 x 4  (wavelength, position)" in out
    assert "exit status: success" in out and "complete  yes" in out
    assert "primary  (wavelength: 3, position: 4)  written 12 of 12 points (100%)" in out
    (row,) = [line.split() for line in out.splitlines() if line.strip().startswith("cam_image")]
    image = zarr.open_array(store / "primary" / "cam_image", mode="r")
    assert image.chunks == (1, 1, 8, 6) and image.shards == (1, 4, 8, 6)
    assert " ".join(row) == (
        "cam_image wavelength, position, y, x 3 x 4 x 8 x 6 uint16 1 x 1 x 8 x 6 "
        "1 x 4 x 8 x 6 1.2 kB"  # 3 * 4 * 8 * 6 uint16
    )


def test_inspect_json_matches_the_store(scan_docs, tmp_path, capsys):
    (store,) = export(scan_docs, tmp_path)

    assert main(["inspect", "--json", str(store)]) == 0

    description = json.loads(capsys.readouterr().out)
    run = description["run"]
    assert run["uid"] == scan_docs[0][1]["uid"] and run["plan_name"] == "grid_scan"
    assert run["complete"] is True and run["exit_status"] == "success"
    primary = description["streams"]["primary"]
    assert primary["dims"] == {"wavelength": 3, "position": 4}
    assert primary["points"] == 12 and primary["written_points"] == 12
    group = zarr.open_group(store / "primary", mode="r")
    assert set(primary["arrays"]) == {name for name, _ in group.arrays()}
    for name, array in group.arrays():
        described = primary["arrays"][name]
        assert described["shape"] == list(array.shape)
        assert described["chunks"] == list(array.chunks)
        assert described["dims"] == list(array.metadata.dimension_names)
        assert described["dtype"] == str(array.dtype)


def test_inspect_shows_an_incomplete_run(scan_docs, tmp_path, capsys):
    # The first five points, then the document stream breaks off.
    events = 0
    cut = []
    for name, doc in scan_docs:
        events += name == "event"
        if events > 5 or name == "stop":
            break
        cut.append((name, doc))
    (store,) = export(cut, tmp_path)

    assert main(["inspect", str(store)]) == 0
    out = capsys.readouterr().out
    assert "complete  NO: the document stream ended before the run stopped" in out
    assert "written 5 of 12 points (42%)" in out

    assert main(["inspect", "--json", str(store)]) == 0
    description = json.loads(capsys.readouterr().out)
    assert description["run"]["complete"] is False
    assert description["run"]["exit_status"] is None
    assert description["streams"]["primary"]["written_points"] == 5


def test_inspect_refuses_what_is_not_a_store(scan_docs, tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 1
    assert f"{tmp_path} is not a Zarr V3 store" in capsys.readouterr().err

    def refused(path: Any) -> str:
        assert main(["inspect", str(path)]) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        return captured.err

    data = tmp_path / "data"
    (store,) = export(scan_docs, data, name_template="beamtime/run")
    err = refused(data)
    assert f"{data} is not a store but a directory holding 1 bluesky-zarr store(s)" in err
    assert f"list them with: bluesky-zarr ls {data}" in err

    for inner, what in ((store / "primary", "group"), (store / "primary" / "cam_image", "array")):
        err = refused(inner)
        assert f"{inner} is a Zarr {what} inside the bluesky-zarr store {store}" in err
        assert f"bluesky-zarr inspect {store}" in err

    plain = tmp_path / "plain.zarr"
    zarr.open_group(plain, mode="w", zarr_format=3).create_array("a", shape=(2,), dtype="i4")
    assert f"{plain} is a Zarr group but not a bluesky-zarr store" in refused(plain)
    v2 = tmp_path / "v2.zarr"
    zarr.open_group(v2, mode="w", zarr_format=2)
    assert f"{v2} is a Zarr V2 store" in refused(v2)
    assert f"{tmp_path / 'missing'} does not exist" in refused(tmp_path / "missing")
    assert "is a file, not a store" in refused(store / "zarr.json")

    with pytest.raises(NotAStoreError, match="directory holding 1 bluesky-zarr store"):
        describe_store(data)
