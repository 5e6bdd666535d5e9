"""``bluesky-zarr ls``: the runs under a directory, one line each, newest first."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import boto3
import pytest
import zarr
from bluesky.plans import count, grid_scan
from bluesky.utils import Msg, RunEngineInterrupted
from moto.server import ThreadedMotoServer
from ophyd.sim import det

from bluesky_zarr import ZarrWriter
from bluesky_zarr._cli import main
from bluesky_zarr.catalog._ls import list_stores
from bluesky_zarr.sim import PointCamera, motors

from conftest import open_stream

SRC = Path(__file__).resolve().parents[1] / "src"
TEMPLATE = "{sample}/{scan_id:05d}"

# A run whose writer dies after four points: flushed, then the process ends
# without finishing the store (as a kill would).
KILLED_CHILD = textwrap.dedent(
    """
    import os, sys
    import bluesky.plan_stubs as bps
    from bluesky import RunEngine
    from bluesky.plans import grid_scan
    from ophyd.sim import det
    from bluesky_zarr import ZarrWriter
    from bluesky_zarr.sim import motors

    writer = ZarrWriter(sys.argv[1], name_template=sys.argv[2])
    RE = RunEngine({"scan_id": 9})
    RE.subscribe(writer)
    wavelength, position = motors("wavelength", "position")
    steps = 0

    def per_step(detectors, step, pos_cache):
        global steps
        if steps == 4:
            writer.flush()
            os._exit(0)
        steps += 1
        yield from bps.one_nd_step(detectors, step, pos_cache)

    RE(grid_scan([det], wavelength, 400, 700, 3, position, 0, 5, 4, per_step=per_step),
       sample="killed")
    """
)


def _pausing_after(points: int):
    """A grid_scan step that pauses the RunEngine after ``points`` points."""
    taken = 0

    def per_step(detectors, step, pos_cache):
        nonlocal taken
        if taken == points:
            yield Msg("pause", None, defer=False)
        taken += 1
        yield from bps.one_nd_step(detectors, step, pos_cache)

    return per_step


@pytest.fixture
def runs(tmp_path, RE) -> dict[str, Any]:
    """Stores written by real runs, oldest first: killed, complete, aborted, open."""
    root = tmp_path / "data"
    result = subprocess.run(
        [sys.executable, "-c", KILLED_CHILD, str(root), TEMPLATE],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), *sys.path])},
    )
    assert result.returncode == 0, result.stderr

    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=(4, 3), name="cam")
    writer = ZarrWriter(root, name_template=TEMPLATE)
    token = RE.subscribe(writer)
    RE.md["scan_id"] = 10
    RE(grid_scan([cam, det], wavelength, 400, 700, 3, position, 0, 5, 4), sample="Si")
    plan = grid_scan(
        [det], wavelength, 400, 700, 3, position, 0, 5, 4, per_step=_pausing_after(5)
    )
    with pytest.raises(RunEngineInterrupted):
        RE(plan, sample="Ge")
    RE.abort(reason="beam lost")
    RE.unsubscribe(token)

    # A run still being written: its documents so far, no stop yet.
    docs: list[tuple[str, dict[str, Any]]] = []
    RE(count([det], num=6), lambda name, doc: docs.append((name, doc)), sample="GaAs")
    live = ZarrWriter(root, name_template=TEMPLATE)
    events = 0
    for name, doc in docs:
        events += name == "event"
        if name == "stop" or events > 2:
            break
        live(name, doc)
    live.flush()
    stores = [*sorted(root.glob("killed/*.zarr")), *writer.stores, *live.stores]
    return {"root": root, "stores": stores, "live": live}


def test_ls_lists_every_run_newest_first(runs, capsys):
    root = runs["root"]
    try:
        assert main(["ls", str(root)]) == 0
    finally:
        runs["live"].close()
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header == [
        "STORE", "SCAN_ID", "PLAN", "STARTED", "SAMPLE", "SHAPE", "POINTS", "STATUS"
    ]
    rows = [line.split(None, 7) for line in lines[1:]]
    assert [row[0] for row in rows] == [
        "GaAs/00013.zarr", "Ge/00012.zarr", "Si/00011.zarr", "killed/00010.zarr"
    ]
    live, aborted, complete, killed = rows
    assert live[1:7] == ["13", "count", live[3], "GaAs", "growing", "2/6"]
    assert live[7] == "writing: a writer holds its lock"
    assert aborted[1:7] == ["12", "grid_scan", aborted[3], "Ge", "3x4", "5/12"]
    # The stop document's reason, if the RunEngine gave one, says why.
    reason = zarr.open_group(runs["stores"][2], mode="r").attrs["stop"]["reason"]
    assert aborted[7] == "abort" + (f": {reason}" if reason else "")
    assert complete[1:8] == ["11", "grid_scan", complete[3], "Si", "3x4", "12/12", "complete"]
    assert killed[1:7] == ["10", "grid_scan", killed[3], "killed", "3x4", "4/12"]
    assert killed[7].startswith("unfinished: no end recorded and no writer holds it")
    # The counts are those of the stores' own _written masks.
    for store, row in zip(reversed(runs["stores"]), rows):
        written = int(open_stream(store)["_written"].sum())
        assert row[6].split("/")[0] == str(written)


def test_ls_json_is_for_programs(runs, capsys):
    root = runs["root"]
    try:
        assert main(["ls", "--json", "--field", "sample", "--field", "plan_args", str(root)]) == 0
    finally:
        runs["live"].close()
    entries = json.loads(capsys.readouterr().out)
    assert [e["store"] for e in entries] == [str(s) for s in reversed(runs["stores"])]
    times = [e["time"] for e in entries]
    assert times == sorted(times, reverse=True)
    live, aborted, complete, killed = entries
    assert complete["state"] == "complete" and complete["why"] is None
    assert complete["written_points"] == complete["planned_points"] == 12
    assert complete["fields"]["sample"] == "Si"
    assert complete["fields"]["plan_args"]["args"][1:4] == [400, 700, 3]
    assert complete["scan_dims"] == ["wavelength", "position"]
    assert complete["scan_shape"] == [3, 4] and complete["exit_status"] == "success"
    assert aborted["state"] == "abort" and aborted["exit_status"] == "abort"
    assert aborted["why"] == (zarr.open_group(aborted["store"]).attrs["stop"]["reason"] or None)
    assert aborted["written_points"] == 5 and aborted["planned_points"] == 12
    assert live["state"] == "writing" and live["written_points"] == 2
    assert live["planned_points"] == 6 and live["scan_shape"] is None
    assert killed["state"] == "unfinished" and killed["written_points"] == 4
    assert killed["exit_status"] is None
    # After the live run is closed, its store records why it is incomplete.
    (entry,) = [e for e in list_stores(root) if e["scan_id"] == 13]
    assert entry["state"] == "incomplete" and entry["written_points"] == 2
    assert "closed before the run stopped" in entry["why"]


def test_ls_skips_other_zarr_stores_and_never_looks_inside_a_store(tmp_path, RE, capsys):
    root = tmp_path / "data"
    writer = ZarrWriter(root)
    RE.subscribe(writer)
    RE(count([det], num=2))
    (store,) = writer.stores
    # A plain Zarr group beside it, and one nested in the store itself.
    zarr.open_group(root / "plain.zarr", mode="w", zarr_format=3).create_array(
        "a", shape=(2,), dtype="i4"
    )
    zarr.open_group(store / "extra" / "inner.zarr", mode="w", zarr_format=3)
    (root / "empty" / "deeper").mkdir(parents=True)

    assert main(["ls", "--json", str(root)]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["store"] == str(store) and entry["name"] == store.name
    assert entry["plan_name"] == "count" and entry["written_points"] == 2

    # A store given itself is listed too.
    assert main(["ls", "--json", str(store)]) == 0
    assert [e["store"] for e in json.loads(capsys.readouterr().out)] == [str(store)]

    assert main(["ls", str(tmp_path / "missing")]) == 1
    assert f"{tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    assert main(["ls", str(root / "empty")]) == 0
    assert "no bluesky-zarr stores under" in capsys.readouterr().err


def test_ls_reports_an_unreadable_root_and_lists_the_rest(tmp_path, RE, capsys):
    writer = ZarrWriter(tmp_path)
    RE.subscribe(writer)
    RE(count([det], num=1))
    broken = tmp_path / "broken.zarr"
    broken.mkdir()
    (broken / "zarr.json").write_text("{ not json")

    assert main(["ls", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "broken.zarr: zarr.json is not valid JSON" in captured.err
    assert writer.stores[0].name in captured.out


@pytest.fixture
def s3(monkeypatch) -> Iterator[dict[str, Any]]:
    """A moto S3 server on 127.0.0.1, a bucket, and the options to reach it."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for name, value in (
            ("AWS_ENDPOINT_URL", endpoint),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_DEFAULT_REGION", "us-east-1"),
        ):
            monkeypatch.setenv(name, value)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket="runs"
        )
        options = {
            "key": "testing",
            "secret": "testing",
            "endpoint_url": endpoint,
            "client_kwargs": {"region_name": "us-east-1"},
        }
        yield {"bucket": "runs", "options": options}
    finally:
        server.stop()


def test_ls_lists_stores_on_s3(s3, RE, capsys):
    url = f"s3://{s3['bucket']}/beamtime"
    writer = ZarrWriter(url, name_template=TEMPLATE, storage_options=s3["options"])
    RE.subscribe(writer)
    wavelength, position = motors("wavelength", "position")
    RE(grid_scan([det], wavelength, 400, 700, 3, position, 0, 5, 2), sample="Si")
    RE(count([det], num=4), sample="Ge")
    first, second = writer.stores
    assert str(first).startswith(f"{url}/Si/")

    entries = list_stores(url, s3["options"])
    assert [e["store"] for e in entries] == [second, first]
    assert [e["name"] for e in entries] == [str(second)[len(url) + 1 :], "Si/00001.zarr"]
    assert [(e["written_points"], e["planned_points"]) for e in entries] == [(4, 4), (6, 6)]
    assert all(e["state"] == "complete" for e in entries)

    # The command, with the AWS environment variables a user would set.
    assert main(["ls", "--json", url]) == 0
    assert [e["store"] for e in json.loads(capsys.readouterr().out)] == [second, first]
    assert main(["inspect", url]) == 1
    assert f"list them with: bluesky-zarr ls {url}" in capsys.readouterr().err
    assert main(["ls", f"s3://{s3['bucket']}/nothing-here"]) == 1
    assert "does not exist" in capsys.readouterr().err
