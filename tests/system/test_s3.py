"""Stores on S3-compatible object storage: a moto S3 server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from typing import Any

import pytest
import suitcase.jsonl
import xarray as xr
from bluesky.plans import grid_scan
from ophyd.sim import det

from bluesky_zarr import DocumentOrderError, StorageError, StoreExistsError, ZarrWriter, export
from bluesky_zarr._cli import main
from bluesky_zarr.sim import PointCamera, motors

from conftest import REPO, assert_frames_match

SRC = REPO / "src"
MOTORS_AT = {"wavelength": "wavelength", "position": "position"}
@pytest.fixture
def scan_docs(RE) -> list[tuple[str, dict[str, Any]]]:
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=(16, 12), name="cam")
    docs: list[tuple[str, dict[str, Any]]] = []
    RE(
        grid_scan([cam, det], wavelength, 400, 700, 3, position, 0, 5, 4, snake_axes=True),
        lambda name, doc: docs.append((name, doc)),
    )
    return docs


def _open(url: str, storage_options: dict[str, Any] | None = None) -> xr.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return xr.open_zarr(url, group="primary", storage_options=storage_options).load()


def test_writer_writes_a_live_scan_to_s3(RE, bucket, options):
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=(16, 12), name="cam")
    writer = ZarrWriter(f"s3://{bucket}/runs", storage_options=options)
    RE.subscribe(writer)

    (uid,) = RE(grid_scan([cam, det], wavelength, 400, 700, 3, position, 0, 5, 4))

    (url,) = writer.stores
    assert url == f"s3://{bucket}/runs/00001-{uid[:8]}.zarr"
    ds = _open(url, options)
    assert ds["cam_image"].dims == ("wavelength", "position", "y", "x")
    assert ds["_written"].all()
    assert assert_frames_match(ds, "cam_image", MOTORS_AT, (16, 12)) == 12
    tree = xr.open_datatree(url, engine="zarr", storage_options=options)
    assert tree.attrs["bluesky_zarr"]["complete"] is True


def test_aws_environment_variables_are_honoured(
    scan_docs, bucket, endpoint, monkeypatch, tmp_path, capsys
):
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    (recording,) = suitcase.jsonl.export(scan_docs, tmp_path)["all"]

    out = f"s3://{bucket}/replayed"
    assert main(["replay", str(recording), "--out", out, "--no-progress"]) == 0

    url = f"s3://{bucket}/replayed/00001-{scan_docs[0][1]['uid'][:8]}.zarr"
    assert url in capsys.readouterr().out
    assert assert_frames_match(_open(url), "cam_image", MOTORS_AT, (16, 12)) == 12
    assert main(["inspect", "--json", url]) == 0
    description = json.loads(capsys.readouterr().out)
    assert description["store"] == url
    assert description["streams"]["primary"]["written_points"] == 12


def test_a_store_on_s3_is_never_overwritten(scan_docs, bucket, options):
    (url,) = export(scan_docs, f"s3://{bucket}", storage_options=options)
    with pytest.raises(StoreExistsError, match="already exists"):
        export(scan_docs, f"s3://{bucket}", storage_options=options)
    assert export(scan_docs, f"s3://{bucket}", storage_options=options, overwrite=True) == [url]
    assert assert_frames_match(_open(url, options), "cam_image", MOTORS_AT, (16, 12)) == 12


def test_a_missing_bucket_is_a_clear_error(scan_docs, options):
    with pytest.raises(StorageError, match="cannot create the store s3://no-such-bucket/"):
        export(scan_docs, "s3://no-such-bucket/runs", storage_options=options)


def test_the_command_in_its_own_process_exits_cleanly(scan_docs, bucket, endpoint, options):
    (url,) = export(scan_docs, f"s3://{bucket}", storage_options=options)
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "PYTHONPATH": os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    result = subprocess.run(
        [sys.executable, "-m", "bluesky_zarr._cli", "inspect", url],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "written 12 of 12 points" in result.stdout
    assert result.stderr == ""  # no "Unclosed client session" at exit


def test_documents_of_an_ended_run_are_kept_in_its_store_on_s3(bucket, options, scan_docs):
    import fsspec

    writer = ZarrWriter(f"s3://{bucket}/runs", storage_options=options)
    for name, doc in scan_docs:
        writer(name, doc)
    (url,) = writer.stores
    again = [(name, doc) for name, doc in scan_docs if name in ("start", "event")][:3]
    for name, doc in again:
        with pytest.raises(DocumentOrderError):
            writer(name, doc)

    fs = fsspec.filesystem("s3", **options)
    kept = [json.loads(line) for line in fs.cat_file(
        f"{url.removeprefix('s3://')}/refused_documents.jsonl"
    ).decode().splitlines()]
    assert [(e["name"], e["doc"]["uid"]) for e in kept] == [
        (name, doc["uid"]) for name, doc in again
    ]
    tree = xr.open_datatree(url, engine="zarr", storage_options=options)
    info = tree.attrs["bluesky_zarr"]
    assert info["complete"] is False and info["refused_after_end"] == 3
    assert assert_frames_match(_open(url, options), "cam_image", MOTORS_AT, (16, 12)) == 12
