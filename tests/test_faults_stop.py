"""Storage faults on a real (tmpfs) disk: at stop, mid-run and at start.

Each fault gives a package exception naming its cause, a store finalised as
far as the storage allows (never a partial one), and a released lock: a new
writer in the same process writes the same store name.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bluesky import RunEngine

import bluesky_zarr
from bluesky_zarr import ZarrWriter
from fault_helpers import (
    N_POINTS,
    NAME,
    Tmpfs,
    assert_absent_or_opens,
    assert_lock_released,
    assert_not_claimed_complete,
    assert_storage_error,
    assert_written_points_hold_their_frames,
    camera_scan,
    delete_tree,
    held_chunk_writes,
    mount_tmpfs,
)

from conftest import open_tree

DELETED = r"no such file|deleted|removed|missing|vanished|no longer exist|does not exist"


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Tmpfs]:
    yield from mount_tmpfs(tmp_path / "tmpfs")


def run_with_fault_at_stop(
    root: Path, fault: Callable[[Path], None]
) -> tuple[ZarrWriter, BaseException | None]:
    """Run the scan; ``fault(store)`` runs when the stop document comes,
    before the writer sees it, while every frame still waits to be written."""
    release = threading.Event()
    writer = ZarrWriter(
        root,
        name_template=NAME,
        flush_interval=None,
        max_buffer_bytes=64 << 20,
        store_wrapper=held_chunk_writes(release),
    )

    def at_stop(name: str, doc: dict[str, Any]) -> None:
        if name == "stop":
            try:
                fault(root / f"{NAME}.zarr")
            finally:
                release.set()

    RE = RunEngine({})
    RE.subscribe(at_stop)  # callbacks run in subscription order: before the writer
    RE.subscribe(writer)
    try:
        RE(camera_scan())
    except Exception as err:  # noqa: BLE001 - the test checks what it is
        return writer, err
    finally:
        release.set()
    return writer, None


STOP_FAULTS = {
    # (how, errno the error must name, what else may name the cause)
    "disk-full": (lambda fs, store: fs.fill(), errno.ENOSPC, None),
    # The kernel refuses to remount the whole tmpfs read-only while the writer
    # holds its lock file open for writing, so the store alone becomes read-only.
    "store-read-only": (lambda fs, store: fs.bind_read_only(store), errno.EROFS, None),
    "store-deleted": (lambda fs, store: delete_tree(store), errno.ENOENT, DELETED),
}


@pytest.mark.parametrize("fault", list(STOP_FAULTS))
def test_fault_at_stop_raises_keeps_a_valid_store_and_releases_the_lock(tmpfs, fault):
    how, code, words = STOP_FAULTS[fault]
    writer, err = run_with_fault_at_stop(tmpfs.path, lambda store: how(tmpfs, store))
    assert err is not None, "the stop's flush failed but the run ended without an error"
    assert_storage_error(err, code, words)
    assert list(writer.open_runs) == []

    store = tmpfs.path / f"{NAME}.zarr"
    if fault == "store-deleted":
        # Nothing to finalise; the writer must not have recreated a partial store.
        if assert_absent_or_opens(store):
            assert_not_claimed_complete(store)
    else:
        # Nothing could be written: the store keeps its last valid state.
        tmpfs.unbind()
        tmpfs.free()
        assert assert_absent_or_opens(store)
        assert_not_claimed_complete(store)
        assert_written_points_hold_their_frames(store)

    tmpfs.unbind()
    tmpfs.free()
    assert_lock_released(tmpfs.path)


def test_chunk_writes_refused_at_stop_are_recorded_in_the_store(tmpfs):
    """Only the camera's array directory is read-only (root ignores chmod, so a
    read-only bind mount stands in for a directory without write permission):
    the root metadata can still be written, so the stop is recorded in full."""
    writer, err = run_with_fault_at_stop(
        tmpfs.path, lambda store: tmpfs.bind_read_only(store / "primary" / "cam_image")
    )
    assert err is not None, "the camera's writes failed but the run ended without an error"
    assert_storage_error(err, errno.EROFS)
    assert list(writer.open_runs) == []
    tmpfs.unbind()

    store = tmpfs.path / f"{NAME}.zarr"
    tree = open_tree(store)
    assert tree.attrs["exit_status"] == "success"
    assert tree.attrs["stop"]["num_events"] == {"primary": N_POINTS}
    info = assert_not_claimed_complete(store)
    assert info["write_failures"], "the failed writes are not recorded"
    assert any("cam_image" in f for f in info["write_failures"])
    assert info["missing"] == {"primary": {"expected": N_POINTS, "written": 0}}
    assert "primary" in info["incomplete_reason"]
    assert not assert_written_points_hold_their_frames(store).any()
    assert_lock_released(tmpfs.path)


def mid_run_writer(root: Path, on_error: str) -> ZarrWriter:
    # A short flush interval: partial rows are written while the scan goes on.
    return ZarrWriter(root, name_template=NAME, flush_interval=0.05, on_error=on_error)


FILL_AT = 8  # the disk fills when the 8th event comes, before the writer sees it
FREE_AT = 13  # with on_error="log", space comes back at the 13th


@pytest.mark.parametrize("around_cache", [False, True], ids=["page-cache", "around-cache"])
@pytest.mark.parametrize("on_error", ["raise", "log"])
def test_disk_filling_mid_run(tmpfs, on_error, around_cache, monkeypatch):
    if around_cache:
        # Every file from 1 KiB (the frames' shards, the metadata) is written
        # around the page cache (O_DIRECT, which this tmpfs takes).
        monkeypatch.setattr(bluesky_zarr.storage._roots, "AROUND_CACHE_FROM_BYTES", 1024)
    writer = mid_run_writer(tmpfs.path, on_error)
    events: list[int] = []

    def fill_mid_run(name: str, doc: dict[str, Any]) -> None:
        if name != "event":
            return
        events.append(doc["seq_num"])
        if doc["seq_num"] == FILL_AT:
            writer.flush()  # points 1-7 are on disk before the disk fills
            tmpfs.fill()
        elif doc["seq_num"] == FILL_AT + 1:
            # Let the periodic flush try (and fail) to write point 8.
            time.sleep(0.5)
        elif doc["seq_num"] == FREE_AT:
            tmpfs.free()

    RE = RunEngine({})
    RE.subscribe(fill_mid_run)
    RE.subscribe(writer)
    store = tmpfs.path / f"{NAME}.zarr"
    if on_error == "raise":
        with pytest.raises(Exception) as info:
            RE(camera_scan())
        assert_storage_error(info.value, errno.ENOSPC)
        # Reported at the next document after the failed write, not at stop.
        assert len(events) <= FILL_AT + 2, f"the failure was reported only after {events}"
        assert list(writer.open_runs) == []
        tmpfs.free()
        assert assert_absent_or_opens(store)
        assert_not_claimed_complete(store)
    else:
        RE(camera_scan())
        assert len(events) == N_POINTS
        tree = open_tree(store)
        assert tree.attrs["exit_status"] == "success"
        info = assert_not_claimed_complete(store)
        failures = info["write_failures"]
        assert failures, "writes failed on a full disk but the store records no failure"
        assert any("No space left" in f or "ENOSPC" in f or "28" in f for f in failures)
    assert not list(store.rglob("*.partial")), "a failed write left its temporary file"
    written = assert_written_points_hold_their_frames(store)
    assert written.ravel()[: FILL_AT - 1].all(), "points written before the disk filled are lost"
    if on_error == "log" and written.sum() < N_POINTS:
        lacking = {"primary": {"expected": N_POINTS, "written": int(written.sum())}}
        assert info["missing"] == lacking
    assert_lock_released(tmpfs.path)


START_FAULTS = {
    "root-read-only": (lambda fs: fs.remount("ro"), lambda fs: fs.remount("rw"), errno.EROFS),
    "disk-full": (lambda fs: fs.fill(), lambda fs: fs.free(), errno.ENOSPC),
}


@pytest.mark.parametrize("fault", list(START_FAULTS))
def test_fault_at_start_raises_and_leaves_no_partial_store(tmpfs, fault):
    make, undo, code = START_FAULTS[fault]
    make(tmpfs)
    writer = ZarrWriter(tmpfs.path, name_template=NAME, flush_interval=None)
    RE = RunEngine({})
    RE.subscribe(writer)
    try:
        with pytest.raises(Exception) as info:
            RE(camera_scan())
    finally:
        undo(tmpfs)
    err = info.value
    if isinstance(err, bluesky_zarr.StoreExistsError):
        pass  # a refusal this package names is as good
    else:
        assert_storage_error(err, code)
    assert list(writer.open_runs) == []
    store = tmpfs.path / f"{NAME}.zarr"
    if assert_absent_or_opens(store):
        assert "start" in open_tree(store).attrs, f"{store} is left without its start document"
    assert_lock_released(tmpfs.path)
