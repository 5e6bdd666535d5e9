"""A store (or its whole root directory) deleted while its run is written.

The writer reports it at the next document, or at the latest at the document
after its next frame write, with a package exception; it never recreates a
partial store (a ``primary/`` without the root group that makes it a store),
and it releases the store's lock so a later run of the same name is written.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

import pytest
from bluesky import RunEngine

from bluesky_zarr import ZarrWriter
from helpers.fault_helpers import (
    NAME,
    assert_absent_or_opens,
    assert_lock_released,
    assert_not_claimed_complete,
    assert_storage_error,
    assert_written_points_hold_their_frames,
    camera_scan,
)

DELETED = r"no such file|deleted|removed|missing|vanished|no longer exist|does not exist"
DELETE_AT = 8  # the 8th event comes after the deletion


@pytest.mark.parametrize("what", ["store", "root"])
def test_deleted_mid_run_is_reported_and_never_recreated(tmp_path: Path, what: str) -> None:
    root = tmp_path / "data"
    store = root / f"{NAME}.zarr"
    writer = ZarrWriter(root, name_template=NAME, flush_interval=None)
    events: list[int] = []

    def delete_mid_run(name: str, doc: dict[str, Any]) -> None:
        if name != "event":
            return
        events.append(doc["seq_num"])
        if doc["seq_num"] == DELETE_AT:
            writer.flush()  # points 1-7 are on disk, then they are gone
            shutil.rmtree(store if what == "store" else root)
        elif doc["seq_num"] == DELETE_AT + 1:
            # The frame of point 8 must now go to the deleted store.
            writer.flush()

    RE = RunEngine({})
    RE.subscribe(delete_mid_run)  # before the writer: it sees each document first
    RE.subscribe(writer)
    with pytest.raises(Exception) as info:
        RE(camera_scan())
    assert_storage_error(info.value, errno.ENOENT, DELETED)
    assert max(events) <= DELETE_AT + 1, (
        f"the deletion was reported only after events {events}"
    )
    assert list(writer.open_runs) == []
    if what == "root" and not root.exists():
        pass  # nothing was recreated at all
    elif assert_absent_or_opens(store):
        assert_not_claimed_complete(store)
        assert_written_points_hold_their_frames(store)
    assert_lock_released(root)

