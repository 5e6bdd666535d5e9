"""A local store's files: each written whole, aside, and renamed into place.

:class:`LocalFiles` writes every file of a local store: to a temporary name,
in one call, then renamed, never making again a part of a store that was
deleted; large files around the page cache (``O_DIRECT``) straight from
page-aligned memory; ``fsync`` of files and directories in durable mode.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import itertools
import math
import mmap
import os
import secrets
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import (
    StorageError,
)


class LocalFiles:
    """The files of a local store, written so that a store never recreates a
    part of itself that was deleted.

    zarr's :class:`~zarr.storage.LocalStore` makes every missing parent
    directory of a key it writes: a store (or root directory) deleted during a
    run would come back as a few loose chunk files that no reader opens. Here
    a write needs the node it belongs to (a chunk its array's directory, a
    node's ``zarr.json`` its parent group's directory) and makes only the
    directories below it, one at a time, so a node deleted meanwhile is not
    made again. Each file is written to a temporary name and renamed; with
    ``durable`` set, it is also flushed to the device (``fsync``), and so is
    its directory, before the write returns.
    """

    #: fsync each file and its directory before a write returns.
    durable = False

    def __init__(self, root: Path | str, *, durable: bool = False) -> None:
        self.root = Path(root)
        self.durable = durable
        #: Directories (relative to the root) known to exist: made or found.
        self._made: set[str] = set()
        #: Whether large files are written around the page cache (until the
        #: file system refuses it).
        self._around_cache = _O_DIRECT != 0

    def write_parts(self, key: str, parts: Sequence[Any], *, exclusive: bool = False) -> None:
        """Write the concatenation of ``parts`` (buffers) as the value of ``key``,
        in one call, to a temporary file renamed into place."""
        directory, _, name = key.rpartition("/")
        try:
            try:
                self._write_file(directory, name, parts, exclusive)
            except FileNotFoundError:
                if directory not in self._made:
                    raise
                # A directory found before is gone: make its part below the
                # node again (never the node itself), or report the deletion.
                self._made.discard(directory)
                self._write_file(directory, name, parts, exclusive)
        except FileNotFoundError as err:
            raise StorageError(
                errno.ENOENT,
                f"the store {self.root} has been deleted or damaged during the run "
                f"({err.filename} is missing); not recreating it",
            ) from err

    def _write_file(
        self, directory: str, name: str, parts: Sequence[Any], exclusive: bool
    ) -> None:
        folder = self._directory(directory, name == "zarr.json")
        path = os.path.join(folder, name)
        # Unique within this process (a counter) and among processes (the pid).
        partial = os.path.join(folder, f".{name}.{os.getpid()}-{next(_PARTIALS)}.partial")
        size = sum(memoryview(p).nbytes for p in parts)
        around_cache = size >= AROUND_CACHE_FROM_BYTES and self._around_cache
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(partial, flags | (_O_DIRECT if around_cache else 0), 0o644)
        except OSError as err:
            if not around_cache or err.errno != errno.EINVAL:
                raise
            self._around_cache = around_cache = False  # not on this file system
            fd = os.open(partial, flags, 0o644)
        try:
            try:
                if around_cache:
                    if not write_around_cache(fd, parts):
                        self._around_cache = False
                else:
                    _write_all(fd, parts)
                if self.durable:
                    os.fsync(fd)
                elif not around_cache and size >= AROUND_CACHE_FROM_BYTES:
                    start_writeback(fd)
            finally:
                os.close(fd)
            if exclusive:
                os.link(partial, path)  # FileExistsError if it exists
                os.unlink(partial)
            else:
                os.replace(partial, path)
            if self.durable:
                fsync_directory(Path(folder))
        except BaseException:
            try:
                os.unlink(partial)
            except OSError:
                pass
            raise

    def _directory(self, directory: str, metadata: bool) -> str:
        """The directory of a key's file, made if missing below the node the
        key belongs to (a chunk's array, the parent group of a node whose
        ``zarr.json`` this is, else the directory itself), which must exist.
        Directories made or found once are remembered: a write into one that
        has gone since fails, and :meth:`write_parts` looks again."""
        folder = os.path.join(str(self.root), directory) if directory else str(self.root)
        if directory in self._made:
            return folder
        names = directory.split("/") if directory else []
        if "c" in names:
            depth = names.index("c")
        else:  # the node a zarr.json describes may be new
            depth = max(len(names) - 1, 0) if metadata else len(names)
        node = os.path.join(str(self.root), *names[:depth])
        if not os.path.isdir(node):
            raise FileNotFoundError(errno.ENOENT, "no such directory", node)
        for i in range(depth, len(names)):
            try:
                os.mkdir(os.path.join(node, *names[depth : i + 1]))
            except FileExistsError:
                pass
        self._made.add(directory)
        return folder


#: Numbers of temporary files, unique in this process.
_PARTIALS = itertools.count()


def _sync_file_range() -> Any:
    """Linux's ``sync_file_range`` from the C library, or ``None``."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()
#: ``SYNC_FILE_RANGE_WRITE``: start writing the file's dirty pages, do not wait.
_SYNC_FILE_RANGE_WRITE = 2


#: Files from this size on (shards of frames) are written around the page
#: cache; smaller ones (metadata, masks) go through it.
AROUND_CACHE_FROM_BYTES = 2**20

_O_DIRECT = getattr(os, "O_DIRECT", 0)

#: Alignment of the memory, offsets and lengths of writes around the page
#: cache: a page, which covers devices of 512-byte and 4 KiB sectors.
_ALIGN = mmap.PAGESIZE

#: Bytes copied into a worker's aligned buffer before each write, at most
#: (see :func:`limit_staging`).
STAGING_BYTES = 8 << 20

_staging = threading.local()


def limit_staging(nbytes: int) -> None:
    """Let this thread's buffer for writes around the cache (see
    :func:`write_around_cache`) hold ``nbytes`` (a part of its writer's memory
    bound), within ``STAGING_BYTES``; 1 MiB in threads that do not say."""
    _staging.limit = max(_ALIGN, min(STAGING_BYTES, nbytes - nbytes % _ALIGN))


def write_around_cache(fd: int, parts: Sequence[Any]) -> bool:
    """Write ``parts`` to ``fd``, opened with ``O_DIRECT``: from memory to the
    device in whole pages, the last partial page through the page cache.
    Parts that lie at page boundaries in memory (a block of frames: see
    :func:`aligned_empty`) are written as they are; others are copied into
    this thread's page-aligned buffer first. Returns whether the file system
    took the writes around the cache (else they went through it, the same).

    Through the cache, each page is allocated, copied and written back later
    by the kernel (measured: about 1 s of CPU for 40 files of 10.5 MB from
    two threads); here the device reads the memory directly. The file's data
    is on the device when the call returns (its metadata is not: that is
    ``durable=True``).
    """
    stage = getattr(_staging, "buffer", None)
    size = getattr(_staging, "limit", min(STAGING_BYTES, 1 << 20))
    if stage is None or stage.size != size:
        # Anonymous mappings start at a page boundary.
        stage = _staging.buffer = np.frombuffer(mmap.mmap(-1, size), dtype=np.uint8)
    filled = 0
    direct = True
    ready: list[Any] = []  # whole pages of the callers' memory, written as they are
    for part in parts:
        view = np.frombuffer(memoryview(part).cast("B"), dtype=np.uint8)
        if filled == 0 and view.ctypes.data % _ALIGN == 0:
            whole = view.size - view.size % _ALIGN
            if whole:
                ready.append(view[:whole].data)
            view = view[whole:]
            if not view.size:
                continue
        if ready:
            direct = _write_all(fd, ready, direct)
            ready = []
        while view.size:
            n = min(view.size, stage.size - filled)
            stage[filled : filled + n] = view[:n]  # numpy copies without the GIL
            filled += n
            view = view[n:]
            if filled == stage.size:
                direct = _write_all(fd, [stage.data], direct)
                filled = 0
    if ready:
        direct = _write_all(fd, ready, direct)
    whole = filled - filled % _ALIGN
    if whole:
        direct = _write_all(fd, [stage.data[:whole]], direct)
    if filled > whole:
        if direct:
            _through_cache(fd)
        _write_all(fd, [stage[whole:filled]])
    return direct


def _through_cache(fd: int) -> None:
    """Let the next writes to ``fd`` go through the page cache (clear ``O_DIRECT``)."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array whose memory starts at a page boundary, so
    that it is written around the page cache without a copy."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + _ALIGN, dtype=np.uint8)
    skip = -raw.ctypes.data % _ALIGN
    return raw[skip : skip + nbytes].view(dtype).reshape(shape)


def start_writeback(fd: int) -> None:
    """Start writing a file's data to the device without waiting for it
    (files written through the page cache, where it cannot be gone around).

    The kernel otherwise writes dirty pages back late and all at once, so the
    end of a run (or the next ``sync``) would wait for the whole scan. Nothing
    is promised about durability (that is ``durable=True``); where the call
    is missing, nothing happens.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def put_in_place(aside: Path, path: Path) -> None:
    """Rename the store made at ``aside`` to ``path``; a store already there
    (being overwritten) is moved aside first and then removed, so ``path``
    holds one whole store or the other at every moment."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{secrets.token_hex(4)}")
        path.rename(old)
        aside.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        aside.rename(path)


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, parts: Sequence[Any], around_cache: bool = False) -> bool:
    """Write every byte of ``parts`` to ``fd`` (``writev`` writes may be
    short). With ``around_cache`` (``fd`` opened with ``O_DIRECT``, the parts
    whole pages at page boundaries but at the end of the file), what the
    kernel refuses to take that way (a file system without it) goes through
    the page cache; returns whether the writes still go around it."""
    views = [memoryview(p).cast("B") for p in parts]
    views = [v for v in views if v.nbytes]
    while views:
        try:
            written = os.writev(fd, views[:1024])
        except OSError as err:
            if not around_cache or err.errno != errno.EINVAL:
                raise
            _through_cache(fd)
            around_cache = False
            continue
        while written:
            if written >= views[0].nbytes:
                written -= views[0].nbytes
                views.pop(0)
            else:
                views[0] = views[0][written:]
                written = 0
    return around_cache
