"""``durable=True``: every file is flushed to the device before it counts."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bluesky.plans import grid_scan

import bluesky_zarr
from bluesky_zarr import ZarrWriter
from bluesky_zarr.sim import PointCamera, motors
from bluesky_zarr.storage._files import LocalFiles, aligned_empty, write_around_cache

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
    real_start = bluesky_zarr.storage._files.start_writeback
    around: list[str] = []
    real_around = bluesky_zarr.storage._files.write_around_cache

    def start_writeback(fd: int) -> None:
        started.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_start(fd)

    def write_around_cache(fd: int, parts: Any) -> bool:
        around.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_around(fd, parts)

    monkeypatch.setattr(bluesky_zarr.storage._files, "start_writeback", start_writeback)
    monkeypatch.setattr(bluesky_zarr.storage._files, "write_around_cache", write_around_cache)
    # Small files go through the page cache; here the frames' shards (4
    # frames of 512 bytes) pass the threshold, the masks do not.
    monkeypatch.setattr(bluesky_zarr.storage._files, "AROUND_CACHE_FROM_BYTES", 1024)
    RE.subscribe(writer)
    RE(grid_scan([cam], wavelength, 400, 700, 3, position, 0, 5, 4))

    (store,) = writer.stores
    ds = open_stream(Path(store))
    assert bool(ds["_written"].all())
    assert_frames_match(
        ds, "cam_image", {"wavelength": "wavelength", "position": "position"}, (16, 16)
    )
    frame_files = [p for p in Path(store).rglob("*") if "/cam_image/c." in str(p) and p.is_file()]
    assert frame_files
    # Each shard of frames is written around the page cache (on a file system
    # that takes it, as this one does), so nothing is left for the end of the
    # run to flush; small files (masks, metadata) go through the cache.
    assert sum(1 for p in around if "/cam_image/.c." in p) >= len(frame_files)
    assert not [p for p in around + started if "/_written/" in p or p.endswith("zarr.json")]
    assert started == []
    if not durable:
        assert synced == []  # nothing waits for the device
        return
    # Every file in the store, at its final name, was flushed: it was
    # written under a temporary name, fsync'd, then renamed (the directory
    # fsync'd after the rename).
    files = [p for p in Path(store).rglob("*") if p.is_file()]
    flushed_dirs = {Path(p) for p in synced if Path(p).is_dir()}
    for path in files:
        assert path.parent in flushed_dirs, f"{path.parent} never fsync'd"
    chunk_files = [p for p in files if "/c." in str(p)]
    assert chunk_files
    # One file fsync per write at least (temporary names), plus directories.
    assert sum(1 for p in synced if ".partial" in p) >= len(chunk_files)
    # The mask's last write comes after the last frame's data was flushed.
    last_data = max(i for i, p in enumerate(synced) if "/cam_image/.c." in p)
    last_mask = max(i for i, p in enumerate(synced) if "/_written/.c." in p)
    assert last_mask > last_data


def test_durable_must_be_a_bool(tmp_path):
    with pytest.raises(bluesky_zarr.OptionError, match="durable"):
        ZarrWriter(tmp_path, durable="yes")  # type: ignore[arg-type]


PAGE = 4096


def _parts(rng: np.random.Generator, kinds: str) -> list[Any]:
    """Buffers of the kinds named: ``a`` page-aligned whole pages (a block's
    frames), ``u`` unaligned, ``t`` aligned but not whole pages, ``b`` bytes."""
    parts: list[Any] = []
    for kind in kinds:
        if kind == "a":
            array = aligned_empty((int(rng.integers(1, 40)) * PAGE,), np.dtype(np.uint8))
        elif kind == "t":
            array = aligned_empty((int(rng.integers(1, 3 * PAGE)),), np.dtype(np.uint8))
        else:
            n = int(rng.integers(1, 3 * PAGE))
            array = np.empty(n + 1, dtype=np.uint8)[1:]
        array[...] = rng.integers(0, 256, array.shape, dtype=np.uint8)
        parts.append(array.tobytes() if kind == "b" else array)
    return parts


@pytest.mark.parametrize(
    "kinds", ["a", "aaa", "u", "uu", "auau", "ta", "at", "bbbb", "aub", "tttt", "ua" * 6]
)
def test_writes_around_the_cache_hold_exactly_the_bytes_given(tmp_path, monkeypatch, kinds):
    # A small staging buffer, so that copies fill it and wrap around.
    monkeypatch.setattr(bluesky_zarr.storage._files, "STAGING_BYTES", 2 * PAGE)
    monkeypatch.setattr(bluesky_zarr.storage._files._staging, "buffer", None, raising=False)
    rng = np.random.default_rng(abs(hash(kinds)) % 2**32)
    parts = _parts(rng, kinds)
    path = tmp_path / "file"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    try:
        assert write_around_cache(fd, parts)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(bytes(memoryview(p)) for p in parts)


def test_a_file_system_that_refuses_writes_around_the_cache_gets_them_through_it(
    tmp_path, monkeypatch
):
    real = os.writev
    refused: list[int] = []

    def writev(fd: int, buffers: Any) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers)

    monkeypatch.setattr(os, "writev", writev)
    monkeypatch.setattr(bluesky_zarr.storage._files, "AROUND_CACHE_FROM_BYTES", 1024)
    parts = _parts(np.random.default_rng(3), "auab")
    store = LocalFiles(tmp_path)
    (tmp_path / "a").mkdir()  # the array's directory
    store.write_parts("a/c/0", parts)
    store.write_parts("a/c/1", parts)
    expected = b"".join(bytes(memoryview(p)) for p in parts)
    assert (tmp_path / "a" / "c" / "0").read_bytes() == expected
    assert (tmp_path / "a" / "c" / "1").read_bytes() == expected
    assert len(refused) == 1, "the second file still tried to go around the cache"
