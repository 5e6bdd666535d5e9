"""``durable=True``: every file is flushed to the device before it counts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from bluesky.plans import grid_scan

import bluesky_zarr
from bluesky_zarr import ZarrWriter
from bluesky_zarr.sim import PointCamera, motors

from conftest import assert_frames_match, open_stream


def _fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the path behind every fsync'd descriptor, in order."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


@pytest.mark.parametrize("durable", [True, False])
def test_durable_writes_flush_every_file_and_directory(RE, tmp_path, monkeypatch, durable):
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=(16, 16), name="cam")
    writer = ZarrWriter(tmp_path, durable=durable, flush_interval=None)
    synced = _fsynced(monkeypatch)
    started: list[str] = []
    real_start = bluesky_zarr._storage.start_writeback

    def start_writeback(fd: int) -> None:
        started.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_start(fd)

    monkeypatch.setattr(bluesky_zarr._storage, "start_writeback", start_writeback)
    # Small files go with the kernel's next writeback; here the frames' shards
    # (4 frames of 512 bytes) pass the threshold, the masks do not.
    monkeypatch.setattr(bluesky_zarr._storage, "WRITEBACK_FROM_BYTES", 1024)
    RE.subscribe(writer)
    RE(grid_scan([cam], wavelength, 400, 700, 3, position, 0, 5, 4))

    (store,) = writer.stores
    ds = open_stream(Path(store))
    assert bool(ds["_written"].all())
    assert_frames_match(ds, "cam_image", {"wavelength": "wavelength", "position": "position"},
                        (16, 16))
    if not durable:
        # Nothing waits for the device; each file's writeback is started as
        # it is written (so the end of the run does not wait for all of it).
        assert synced == []
        frame_files = [
            p for p in Path(store).rglob("*") if "/cam_image/c/" in str(p) and p.is_file()
        ]
        assert frame_files
        assert sum(1 for p in started if "/cam_image/c/" in p) >= len(frame_files)
        assert not [p for p in started if "/_written/" in p or p.endswith("zarr.json")]
        return
    assert started == []
    # Every file in the store, at its final name, was flushed: it was
    # written under a temporary name, fsync'd, then renamed (the directory
    # fsync'd after the rename).
    files = [p for p in Path(store).rglob("*") if p.is_file()]
    flushed_dirs = {Path(p) for p in synced if Path(p).is_dir()}
    for path in files:
        assert path.parent in flushed_dirs, f"{path.parent} never fsync'd"
    chunk_files = [p for p in files if "/c/" in str(p)]
    assert chunk_files
    # One file fsync per write at least (temporary names), plus directories.
    assert sum(1 for p in synced if ".partial" in p) >= len(chunk_files)
    # The mask's last write comes after the last frame's data was flushed.
    last_data = max(i for i, p in enumerate(synced) if "/cam_image/c/" in p)
    last_mask = max(i for i, p in enumerate(synced) if "/_written/c/" in p)
    assert last_mask > last_data


def test_durable_must_be_a_bool(tmp_path):
    with pytest.raises(bluesky_zarr.OptionError, match="durable"):
        ZarrWriter(tmp_path, durable="yes")  # type: ignore[arg-type]
