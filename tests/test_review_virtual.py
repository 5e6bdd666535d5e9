"""Stores written with ``external="virtual"`` (Icechunk repositories) as the
other commands meet them: ``ls``, ``inspect`` and ``replay``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.plans import count
from event_model import NumpyEncoder
from ophyd.sim import det

from bluesky_zarr import OptionError, TiledError, ZarrWriter, open_virtual
from bluesky_zarr._cli import main
from bluesky_zarr.catalog._ls import list_stores
from bluesky_zarr.catalog._tiled import register_store
from bluesky_zarr.feeds._replay import replay

SRC = Path(__file__).resolve().parents[1] / "src"
#: moto keeps one in-memory S3 for the whole process: a bucket of this file's own.
BUCKET = "review-virtual-runs"

# A virtual run whose writer dies after its fourth point is committed.
KILLED_CHILD = textwrap.dedent(
    """
    import os, sys
    from bluesky import RunEngine
    from bluesky.plans import count
    from ophyd.sim import det
    from bluesky_zarr import ZarrWriter

    writer = ZarrWriter(sys.argv[1], external="virtual", flush_interval=None)
    RE = RunEngine({"scan_id": 7})
    RE.subscribe(writer)

    def kill(name, doc):
        if name == "event" and doc["seq_num"] == 4:
            writer.flush()
            os._exit(0)

    RE.subscribe(kill)
    RE(count([det], num=10), sample="killed")
    """
)


def test_ls_and_inspect_list_virtual_runs_finished_or_killed(
    tmp_path: Path, RE: RunEngine, capsys
) -> None:
    child = subprocess.run(
        [sys.executable, "-c", KILLED_CHILD, str(tmp_path)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), *sys.path])},
    )
    assert child.returncode == 0, child.stderr
    writer = ZarrWriter(tmp_path, external="virtual")
    RE.md["scan_id"] = 8
    RE(count([det], num=3), writer, sample="done")
    entries = {e["fields"]["sample"]: e for e in list_stores(tmp_path)}
    assert set(entries) == {"killed", "done"}
    assert entries["done"]["state"] == "complete"
    assert (entries["done"]["written_points"], entries["done"]["planned_points"]) == (3, 3)
    # The killed run: its last commit holds four points, and no writer holds it.
    assert entries["killed"]["state"] == "unfinished"
    assert entries["killed"]["written_points"] == 4
    capsys.readouterr()
    assert main(["ls", str(tmp_path)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    killed = tmp_path / entries["killed"]["name"]
    assert main(["inspect", str(killed)]) == 0
    assert "written 4 of 4 points" in capsys.readouterr().out
    written = open_virtual(killed)["primary"]["_written"].values
    np.testing.assert_array_equal(written, [True] * 4)


def test_replaying_a_virtual_run_again_skips_it(tmp_path: Path, RE: RunEngine) -> None:
    docs: list[tuple[str, dict]] = []
    RE(count([det], num=3), lambda name, doc: docs.append((name, doc)))
    recorded = tmp_path / "run.jsonl"
    recorded.write_text("".join(json.dumps(d, cls=NumpyEncoder) + "\n" for d in docs))
    first = replay([recorded], tmp_path / "out", progress=False, external="virtual")
    (run,) = first.runs
    assert (run.written_points, run.planned_points) == (3, 3)
    again = replay([recorded], tmp_path / "out", progress=False, external="virtual")
    (run,) = again.runs
    assert run.skipped is not None and "already written" in run.skipped


def test_tiled_with_virtual_runs_is_refused_clearly(tmp_path: Path, RE: RunEngine) -> None:
    # Tiled reads Zarr arrays where they lie; an Icechunk repository holds none:
    # the combination is refused when the writer is made, not lost in the
    # background at each run.
    with pytest.raises(OptionError, match="external='virtual'"):
        ZarrWriter(tmp_path, external="virtual", tiled="http://127.0.0.1:9/api")
    writer = ZarrWriter(tmp_path, external="virtual")
    RE(count([det], num=2), writer)
    with pytest.raises(TiledError, match="Icechunk repository"):
        register_store(None, writer.stores[-1])


@pytest.fixture
def s3() -> Any:
    """A moto S3 server on 127.0.0.1 with a bucket; the writer's storage options."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="testing",
        aws_secret_access_key="testing", region_name="us-east-1",
    ).create_bucket(Bucket=BUCKET)
    try:
        yield {
            "key": "testing", "secret": "testing", "endpoint_url": endpoint,
            "client_kwargs": {"region_name": "us-east-1"},
        }
    finally:
        server.stop()


def test_ls_lists_virtual_runs_on_object_storage(RE: RunEngine, s3: Any) -> None:
    virtual = ZarrWriter(f"s3://{BUCKET}/beamline", storage_options=s3, external="virtual")
    RE(count([det], num=3), virtual, sample="virtual")
    plain = ZarrWriter(f"s3://{BUCKET}/beamline", storage_options=s3)
    RE(count([det], num=2), plain, sample="plain")
    entries = {e["fields"]["sample"]: e for e in list_stores(f"s3://{BUCKET}", s3)}
    assert set(entries) == {"virtual", "plain"}
    assert entries["virtual"]["state"] == "complete"
    assert entries["virtual"]["written_points"] == 3
    assert entries["virtual"]["name"] == str(virtual.stores[-1]).removeprefix(f"s3://{BUCKET}/")


def test_runs_of_samples_named_like_a_repositorys_directories_are_listed(
    tmp_path: Path, RE: RunEngine
) -> None:
    writer = ZarrWriter(tmp_path, name_template="{sample}/{scan_id:05d}")
    for sample in ("refs", "snapshots"):
        RE(count([det], num=2), writer, sample=sample)
    virtual = ZarrWriter(tmp_path / "refs", external="virtual", name_template="v{scan_id}")
    RE(count([det], num=2), virtual, sample="v")
    names = sorted(e["name"] for e in list_stores(tmp_path))
    assert names == ["refs/00001.zarr", "refs/v3.zarr", "snapshots/00002.zarr"]


def test_ls_json_stays_json_when_a_repositorys_manifests_are_gone(
    tmp_path: Path, RE: RunEngine
) -> None:
    # As when a repository is deleted while it is listed: its snapshot is read,
    # its manifests are not there. Icechunk logs such failures on stdout, from
    # its own threads (so the command runs in a process of its own).
    writer = ZarrWriter(tmp_path, external="virtual")
    RE(count([det], num=3), writer)
    (store,) = writer.stores
    assert isinstance(store, Path)
    for manifest in (store / "manifests").iterdir():
        manifest.unlink()
    listed = subprocess.run(
        [sys.executable, "-c", "import sys; from bluesky_zarr._cli import main; "
         "sys.exit(main(['ls', '--json', sys.argv[1]]))", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), *sys.path])},
    )
    assert listed.returncode == 0, listed.stderr
    (entry,) = json.loads(listed.stdout)
    assert entry["state"] == "complete"
