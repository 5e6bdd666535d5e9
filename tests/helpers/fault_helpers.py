"""Shared by the fault tests: the scan they run and the checks of a faulted store."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.plans import grid_scan
from zarr.storage import WrapperStore

import bluesky_zarr
from bluesky_zarr import ZarrWriter
from bluesky_zarr.sim import PointCamera, motors

import conftest
from conftest import assert_frames_match, open_stream, open_tree

#: The scan: 4 wavelengths x 5 positions, one 64 x 64 uint16 frame per point.
SHAPE = (64, 64)
N_WL, N_POS = 4, 5
N_POINTS = N_WL * N_POS
MOTORS_AT = {"wavelength": "wavelength", "position": "position"}
#: Store name of every faulted run (and of the run that checks its lock).
NAME = "run"


def camera_scan() -> Any:
    """A grid scan of a PointCamera (fresh devices: no state shared between runs)."""
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=SHAPE, name="cam")
    return grid_scan([cam], wavelength, 400, 700, N_WL, position, 0, 4, N_POS)


def error_chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions chained to it as causes."""
    chain = [err]
    while chain[-1].__cause__ is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__)
    return chain


def assert_storage_error(err: BaseException, code: int, words: str | None = None) -> None:
    """``err`` is this package's WriteError or StorageError naming its cause.

    The cause is named when an OSError with errno ``code`` is chained as the
    cause, or the message gives the errno's name or text, or (for causes that
    need not come with an errno, like a deleted directory) matches ``words``.
    """
    described = f"{type(err).__module__}.{type(err).__qualname__}: {err}"
    assert isinstance(err, (bluesky_zarr.WriteError, bluesky_zarr.StorageError)), (
        f"expected bluesky_zarr.WriteError or StorageError, got {described}"
    )
    message = str(err)
    chained = any(
        isinstance(e, OSError)
        and (e.errno == code or (code == errno.ENOENT and isinstance(e, FileNotFoundError)))
        for e in error_chain(err)[1:]
    )
    named = errno.errorcode[code] in message or os.strerror(code) in message
    matched = words is not None and re.search(words, message, re.IGNORECASE) is not None
    assert chained or named or matched, (
        f"{described} neither chains an OSError with errno {errno.errorcode[code]} "
        f"nor names it in its message"
    )


def assert_absent_or_opens(store: Path) -> bool:
    """The store is either gone, or a store that xarray opens (whole, and its
    ``primary`` group when that directory exists). Returns whether it exists."""
    if not store.exists():
        return False
    try:
        tree = open_tree(store)
    except Exception as err:  # noqa: BLE001 - report what is wrong with the store
        listing = sorted(str(p.relative_to(store)) for p in store.rglob("*"))[:12]
        pytest.fail(
            f"{store} exists but xarray cannot open it ({type(err).__name__}: {err}); "
            f"it holds {listing}"
        )
    if (store / "primary").exists():
        assert "primary" in tree.children, (
            f"{store}/primary exists but is not a group of the store"
        )
        open_stream(store)
    return True


def assert_written_points_hold_their_frames(store: Path) -> np.ndarray:
    """conftest's check of the written points, for this module's camera scan."""
    return conftest.assert_written_points_hold_their_frames(store, SHAPE)


def assert_not_claimed_complete(store: Path) -> dict[str, Any]:
    """The store opens, says it is not complete, and whatever it records of
    the stop is consistent. Returns its ``bluesky_zarr`` attribute."""
    tree = open_tree(store)
    info = tree.attrs["bluesky_zarr"]
    assert info["complete"] is False, f"a faulted store claims completeness: {info}"
    if "stop" in tree.attrs:
        assert tree.attrs.get("exit_status"), "the stop was recorded without its exit_status"
        assert info.get("incomplete_reason"), "an incomplete store does not say why"
    return info


def assert_lock_released(root: Path, name: str = NAME) -> Path:
    """A new writer in this process writes the same store name: the faulted
    run's lock is gone. Returns the new store."""
    writer = ZarrWriter(root, name_template=name, overwrite=True, flush_interval=None)
    RE = RunEngine({})
    RE.subscribe(writer)
    try:
        RE(camera_scan())
    except bluesky_zarr.StoreLockedError as err:
        pytest.fail(f"the faulted run still holds its lock: {err}")
    except Exception as err:
        if any(isinstance(e, bluesky_zarr.StoreLockedError) for e in _all_chained(err)):
            pytest.fail(f"the faulted run still holds its lock: {err!r}")
        raise
    (store,) = writer.stores
    assert Path(store) == root / f"{name}.zarr"
    tree = open_tree(Path(store))
    assert tree.attrs["bluesky_zarr"]["complete"] is True
    assert assert_frames_match(open_stream(Path(store)), "cam_image", MOTORS_AT, SHAPE) == N_POINTS
    return Path(store)


def _all_chained(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)


class HeldChunkWrites(WrapperStore):
    """Holds the camera's chunk writes until ``release`` is set.

    With it the frames reach the disk only once the fault is in place, in the
    stop's flush, whatever the scheduling of the writer's threads.
    """

    def __init__(self, store: Any, release: threading.Event) -> None:
        super().__init__(store)
        self.release = release

    def _with_store(self, store: Any) -> HeldChunkWrites:
        return type(self)(store, self.release)

    async def set(self, key: str, value: Any) -> None:
        if "cam_image/c." in key and not self.release.is_set():
            await asyncio.to_thread(self.release.wait, 30)
        await self._store.set(key, value)


def delete_tree(path: Path) -> None:
    """Delete ``path`` as a user would, but at once: it is renamed away first, so
    workers still writing into it cannot make the deletion itself fail (a plain
    ``rmtree`` races them: a directory emptied is refilled before it goes)."""
    gone = path.with_name(f".deleted-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    path.rename(gone)
    shutil.rmtree(gone, ignore_errors=True)


def held_chunk_writes(release: threading.Event) -> Any:
    return lambda store: HeldChunkWrites(store, release)


def run(*args: str) -> None:
    result = subprocess.run(list(args), capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()}")


class Tmpfs:
    """A small tmpfs to fill up or make read-only, unmounted at teardown."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.binds: list[Path] = []
        self.filler = path / "filler"

    def fill(self) -> None:
        """Take every free byte (until ENOSPC), as another process filling the disk."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            for size in (1 << 18, 1 << 12, 1):
                block = b"\xa5" * size
                try:
                    while True:
                        os.write(fd, block)
                except OSError as err:
                    if err.errno != errno.ENOSPC:
                        raise
        finally:
            os.close(fd)
        assert os.statvfs(self.path).f_bavail == 0

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def remount(self, mode: str) -> None:
        run("mount", "-o", f"remount,{mode}", str(self.path))

    def bind_read_only(self, directory: Path) -> None:
        """Make one directory (and what is below it) read-only, as a mount."""
        run("mount", "--bind", str(directory), str(directory))
        self.binds.append(directory)
        run("mount", "-o", "remount,bind,ro", str(directory))

    def unbind(self) -> None:
        while self.binds:
            directory = self.binds.pop()
            if subprocess.run(["umount", str(directory)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def mount_tmpfs(directory: Path) -> Iterator[Tmpfs]:
    """Mount a 4 MB tmpfs on ``directory`` (skipping when that is impossible)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    directory.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(directory)],
        capture_output=True, text=True,
    )
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    fs = Tmpfs(directory)
    try:
        yield fs
    finally:
        fs.unbind()
        # A writer that kept a file open (a lock it did not release) makes the
        # tmpfs busy: detach it lazily rather than leave it mounted.
        if subprocess.run(["umount", str(directory)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True)
