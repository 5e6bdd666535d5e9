"""``overwrite="incomplete"``: replace only an unfinished store of the same run.

What a service re-reading a run from a broker needs: the store the run began
(and never finished) is rewritten from the start; a finished store, another
run's store and a store a live writer holds are not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from bluesky.plans import count, grid_scan
from ophyd.sim import det

import bluesky_zarr
from bluesky_zarr import ZarrWriter
from bluesky_zarr.sim import PointCamera, motors
from bluesky_zarr.storage._lock import StoreLock

from conftest import assert_written_points_hold_their_frames

FRAME = (16, 16)


def record_grid(RE: Any) -> list[tuple[str, dict[str, Any]]]:
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=FRAME, name="cam")
    docs: list[tuple[str, dict[str, Any]]] = []
    RE(
        grid_scan([cam], wavelength, 400, 700, 3, position, 0, 5, 4),
        lambda name, doc: docs.append((name, doc)),
    )
    return docs


def attrs(store: Path) -> dict[str, Any]:
    return dict(json.loads((store / "zarr.json").read_text())["attributes"])


def test_an_unfinished_store_of_the_run_is_rewritten(RE, tmp_path):
    docs = record_grid(RE)
    first = ZarrWriter(tmp_path)
    for name, doc in docs[:8]:
        first(name, doc)
    first.close("the service stopped")
    (store,) = first.stores
    assert attrs(store)["bluesky_zarr"]["complete"] is False

    again = ZarrWriter(tmp_path, overwrite="incomplete")
    for name, doc in docs:
        again(name, doc)
    assert again.stores == [store]
    assert attrs(store)["bluesky_zarr"]["complete"] is True
    assert assert_written_points_hold_their_frames(store, FRAME).all()
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".zarr"] == [store.name]


def test_a_finished_store_is_never_rewritten(RE, tmp_path):
    docs = record_grid(RE)
    first = ZarrWriter(tmp_path)
    for name, doc in docs:
        first(name, doc)
    (store,) = first.stores
    before = (store / "zarr.json").read_bytes()
    again = ZarrWriter(tmp_path, overwrite="incomplete")
    with pytest.raises(bluesky_zarr.StoreExistsError, match="finished"):
        again(*docs[0])
    assert (store / "zarr.json").read_bytes() == before


def test_another_runs_store_is_not_replaced(RE, tmp_path):
    first = ZarrWriter(tmp_path, name_template="scan")
    for name, doc in record_grid(RE)[:5]:
        first(name, doc)
    first.close("stopped early")  # unfinished, but another run's
    (store,) = first.stores
    before = (store / "zarr.json").read_bytes()
    docs: list[tuple[str, dict[str, Any]]] = []
    RE(count([det], num=1), lambda name, doc: docs.append((name, doc)))
    with pytest.raises(bluesky_zarr.StoreExistsError, match="another run"):
        ZarrWriter(tmp_path, name_template="scan", overwrite="incomplete")(*docs[0])
    assert (store / "zarr.json").read_bytes() == before


def test_a_store_held_by_a_live_writer_is_not_taken(RE, tmp_path):
    docs = record_grid(RE)
    first = ZarrWriter(tmp_path)
    for name, doc in docs[:5]:
        first(name, doc)
    (store,) = first.stores
    with pytest.raises(bluesky_zarr.StoreLockedError):
        ZarrWriter(tmp_path, overwrite="incomplete")(*docs[0])
    for name, doc in docs[5:]:
        first(name, doc)
    assert attrs(store)["bluesky_zarr"]["complete"] is True
    StoreLock(store).release()  # free again once the run stopped


def test_bad_overwrite_value_is_refused(tmp_path):
    with pytest.raises(bluesky_zarr.OptionError, match="incomplete"):
        ZarrWriter(tmp_path, overwrite="sometimes")


def test_object_storage_rewrites_only_an_unfinished_store_of_the_run(
    RE, bucket, options
):
    import zarr

    docs = record_grid(RE)
    first = ZarrWriter(f"s3://{bucket}", storage_options=options)
    for name, doc in docs[:8]:
        first(name, doc)
    first.close("the service stopped")
    (url,) = first.stores
    again = ZarrWriter(f"s3://{bucket}", storage_options=options, overwrite="incomplete")
    for name, doc in docs:
        again(name, doc)
    assert again.stores == [url]
    root = zarr.open_group(url, mode="r", storage_options=options)
    assert root.attrs["bluesky_zarr"]["complete"] is True  # type: ignore[index,call-overload]
    assert bool(root["primary/_written"][:].all())  # type: ignore[index,union-attr]
    with pytest.raises(bluesky_zarr.StoreExistsError, match="finished"):
        ZarrWriter(f"s3://{bucket}", storage_options=options, overwrite="incomplete")(*docs[0])
