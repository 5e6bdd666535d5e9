"""Where stores live: a local directory or an S3-compatible bucket.

:func:`resolve_root` turns the ``directory`` given to the writer into a
storage root that claims a new store for a run exclusively (never taking over
another run's store) and names it for people (a path, or an ``s3://`` URL).
A store appears complete or not at all: its root group, attributes and
consolidated metadata are written in one step (a directory made aside and
renamed into place; one conditional object write on object storage).

Object storage goes through zarr's :class:`~zarr.storage.FsspecStore` with
``s3fs``: the same ``storage_options`` that ``xr.open_zarr`` takes to read the
store back, and, with none given, the standard AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``) as boto3 reads them.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import errno
import fcntl
import itertools
import json
import logging
import math
import mmap
import os
import secrets
import shutil
import threading
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import _zarr
from ._errors import (
    MissingDependencyError,
    OptionError,
    StorageError,
    StoreExistsError,
    StoreLockedError,
)
from ._plan import store_name, store_path

#: URL schemes served by object storage, and the extra that installs them.
REMOTE_SCHEMES = {"s3": "s3", "s3a": "s3"}


#: ``overwrite=`` value: replace only an unfinished store of the same run.
INCOMPLETE = "incomplete"


def _parse_attributes(metadata: bytes) -> dict[str, Any]:
    try:
        attributes = json.loads(metadata).get("attributes", {})
    except (ValueError, AttributeError):
        return {}
    return attributes if isinstance(attributes, dict) else {}


def read_root_attributes(path: Path) -> dict[str, Any] | None:
    """The root attributes of the store whose ``zarr.json`` is ``path``, None if
    there is none (an unreadable one gives ``{}``)."""
    try:
        return _parse_attributes(path.read_bytes())
    except FileNotFoundError:
        return None
    except OSError as err:
        raise StorageError(f"cannot read {path}: {err}") from err


def run_finished(attributes: Mapping[str, Any]) -> bool:
    """Whether a store's root attributes say its run was finished by its stop
    document (complete or not): such a store is final."""
    info = attributes.get("bluesky_zarr")
    complete = isinstance(info, Mapping) and info.get("complete") is True
    return complete or "stop" in attributes


def check_replaceable(
    location: str, attributes: Mapping[str, Any] | None, start: Mapping[str, Any]
) -> None:
    """Raise :class:`StoreExistsError` unless the existing store at ``location``
    (root ``attributes``) is an unfinished store of the run ``start`` begins."""
    stored = (attributes or {}).get("start")
    stored_uid = stored.get("uid") if isinstance(stored, Mapping) else None
    if stored_uid != start.get("uid"):
        raise StoreExistsError(
            f"{location} already exists and holds another run ({stored_uid!r}, not "
            f"{start.get('uid')!r}); refusing to overwrite it"
        )
    if run_finished(attributes or {}):
        raise StoreExistsError(
            f"{location} already holds the finished run {stored_uid!r}; a finished "
            f"store is never rewritten"
        )


class StoreLock:
    """An exclusive lock on a store path, held while a run writes it.

    ``flock`` on a hidden file beside the store: the kernel releases it if the
    process dies, so a killed writer leaves no stale lock behind. The holder
    unlinks the file before it unlocks, and a writer that locked a file checks
    that the file is still the one at the lock path (else it locked a file
    that a holder has just given up, and tries again): so at most one writer
    ever holds the lock of a path.
    """

    def __init__(self, store: Path) -> None:
        self.path = store.with_name(f".{store.name}.lock")
        self._fd: int | None = None
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            except OSError as err:
                raise StorageError(f"cannot lock {store}: {err}") from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise StoreLockedError(
                    f"{store} is being written by another writer; two writers cannot "
                    f"write one store"
                ) from None
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            locked = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (
                locked.st_dev,
                locked.st_ino,
            ):
                self._fd = fd
                return
            os.close(fd)

    def release(self) -> None:
        """Give the lock up (unlinking its file first); never raises."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only or vanished directory: the unlock below still frees it
        finally:
            os.close(self._fd)
            self._fd = None


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
                _fsync_directory(Path(folder))
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


def _fsync_directory(directory: Path) -> None:
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


def is_url(root: str | os.PathLike[str]) -> bool:
    """Whether ``root`` names object storage (``s3://...``) rather than a directory."""
    return isinstance(root, str) and "://" in root


class LocalRoot:
    """Stores as directories below a local root directory."""

    def __init__(self, directory: str | os.PathLike[str], durable: bool = False) -> None:
        self.directory = Path(directory)
        self.durable = durable
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise StorageError(
                f"{self.directory} is a file, not a directory: the writer needs a "
                f"directory to hold its stores"
            ) from None
        except OSError as err:
            raise StorageError(
                f"cannot use {self.directory} as the stores' directory: {err}"
            ) from err

    @property
    def display(self) -> Path:
        return self.directory

    def location(self, template: str, start: Mapping[str, Any]) -> Path:
        """The path the run's store will have (its parent directory made)."""
        path = store_path(self.directory, template, start)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def existing_attributes(
        self, template: str, start: Mapping[str, Any]
    ) -> tuple[Path, dict[str, Any] | None]:
        """The run's store location and the root attributes of a store already
        there (None: there is none)."""
        path = store_path(self.directory, template, start)
        return path, read_root_attributes(path / "zarr.json")

    def lock(self, template: str, start: Mapping[str, Any]) -> StoreLock:
        """Lock the path of the run's store (before it is made or replaced)."""
        try:
            path = self.location(template, start)
        except OSError as err:
            raise StorageError(f"cannot make the directory of the run's store: {err}") from err
        return StoreLock(path)

    def create_store(
        self,
        template: str,
        start: Mapping[str, Any],
        *,
        overwrite: bool | str,
        metadata: bytes,
    ) -> tuple[Path, Any]:
        """Make the run's store, holding ``metadata`` as its root ``zarr.json``.

        The store is built in a hidden directory beside its path and renamed
        into place: a reader (or a writer killed meanwhile) sees it whole or
        not at all. The caller holds the path's :class:`StoreLock`.
        """
        path = self.location(template, start)
        self._remove_leftovers(path)
        if path.exists() and overwrite == INCOMPLETE:
            check_replaceable(str(path), read_root_attributes(path / "zarr.json"), start)
        elif path.exists() and not overwrite:
            raise StoreExistsError(
                f"{path} already exists; refusing to overwrite another run "
                f"(pass overwrite=True or choose another name_template)"
            )
        aside = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
        try:
            aside.mkdir()
            (aside / "zarr.json").write_bytes(metadata)
            if self.durable:
                _fsync_directory(aside)
            put_in_place(aside, path)
            if self.durable:
                _fsync_directory(path.parent)
        except OSError as err:
            shutil.rmtree(aside, ignore_errors=True)
            raise StorageError(f"cannot create the store {path}: {err}") from err
        return path, _zarr.LocalFilesStore(LocalFiles(path, durable=self.durable))

    @staticmethod
    def _remove_leftovers(path: Path) -> None:
        """Remove what a writer killed while making or replacing ``path`` left."""
        for pattern in (f".{path.name}.tmp-*", f".{path.name}.old-*"):
            for leftover in path.parent.glob(pattern):
                shutil.rmtree(leftover, ignore_errors=True)


class FsspecRoot:
    """Stores as key prefixes below ``<scheme>://bucket/prefix`` (s3fs)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        scheme, _, rest = url.partition("://")
        if scheme not in REMOTE_SCHEMES:
            raise OptionError(
                f"unsupported storage URL {url!r}: expected a local directory or "
                f"one of {', '.join(s + '://' for s in REMOTE_SCHEMES)}"
            )
        parts = [p for p in rest.split("/") if p]
        if not parts or any(p in {".", ".."} for p in parts):
            raise OptionError(f"storage URL {url!r} must name a bucket (and a prefix)")
        self.scheme = scheme
        self.prefix = "/".join(parts)
        self.storage_options = dict(storage_options or {})
        self.fs = _filesystem(scheme, self.storage_options, asynchronous=False)

    @property
    def display(self) -> str:
        return f"{self.scheme}://{self.prefix}"

    def existing_attributes(
        self, template: str, start: Mapping[str, Any]
    ) -> tuple[str, dict[str, Any] | None]:
        """The run's store URL and the root attributes of a store already there
        (None: there is none)."""
        key = "/".join([self.prefix, *store_name(template, start)])
        try:
            metadata = self.fs.cat_file(f"{key}/zarr.json")
        except FileNotFoundError:
            return f"{self.scheme}://{key}", None
        except OSError as err:
            raise StorageError(f"cannot read {self.scheme}://{key}: {err}") from err
        return f"{self.scheme}://{key}", _parse_attributes(metadata)

    def create_store(
        self,
        template: str,
        start: Mapping[str, Any],
        *,
        overwrite: bool | str,
        metadata: bytes,
    ) -> tuple[str, Any]:
        """Claim the run's prefix with a conditional write of its root
        ``zarr.json`` (``metadata``), then open it."""
        key = "/".join([self.prefix, *store_name(template, start)])
        url = f"{self.scheme}://{key}"
        try:
            if overwrite == INCOMPLETE and self.fs.exists(f"{key}/zarr.json"):
                existing = _parse_attributes(self.fs.cat_file(f"{key}/zarr.json"))
                check_replaceable(url, existing, start)
                self.fs.rm(key, recursive=True)
            elif overwrite and self.fs.exists(f"{key}/zarr.json"):
                self.fs.rm(key, recursive=True)
            # If-None-Match: exactly one writer can create zarr.json.
            self.fs.pipe_file(f"{key}/zarr.json", metadata, mode="create")
        except FileExistsError:
            raise StoreExistsError(
                f"{url} already exists; refusing to overwrite another run "
                f"(pass overwrite=True or choose another name_template)"
            ) from None
        except OSError as err:
            raise StorageError(f"cannot create the store {url}: {err}") from err
        return url, open_store(url, self.storage_options, read_only=False)


Root = LocalRoot | FsspecRoot


def resolve_root(
    root: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    durable: bool = False,
) -> Root:
    """The storage root named by a directory or an ``s3://bucket/prefix`` URL."""
    if is_url(root):
        # An object is durable once its write returns.
        return FsspecRoot(str(root), storage_options)
    if storage_options:
        raise OptionError(
            f"storage_options= apply to object storage URLs (s3://...), not to the "
            f"local directory {str(root)!r}"
        )
    return LocalRoot(root, durable=durable)


def open_store(
    location: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    read_only: bool = True,
) -> Any:
    """A Zarr store for an existing store's directory or URL."""
    if not is_url(location):
        return _zarr.local_store(Path(location), read_only=read_only)
    url = str(location)
    scheme = url.partition("://")[0]
    if scheme not in REMOTE_SCHEMES:
        raise OptionError(f"unsupported storage URL {url!r}")
    fs = _filesystem(scheme, dict(storage_options or {}), asynchronous=True)
    return _zarr.fsspec_store(fs, url.partition("://")[2], read_only=read_only)


def _filesystem(scheme: str, options: dict[str, Any], *, asynchronous: bool) -> Any:
    try:
        import s3fs
    except ImportError:
        raise MissingDependencyError(
            f"writing to {scheme}:// needs s3fs: pip install 'bluesky-zarr[s3]'"
        ) from None
    # fsspec caches instances by their options: one client (and connection
    # pool) per bucket configuration for the life of the process, as readers
    # through xarray get too.
    fs = s3fs.S3FileSystem(asynchronous=asynchronous, **options)
    if asynchronous:
        _async_filesystems.add(fs)
    return fs


# s3fs closes the sessions of its synchronous instances when they are
# collected, not those of asynchronous ones (which zarr's FsspecStore drives on
# zarr's event loop): close them there at exit, while that loop still runs (its
# own exit handler was registered first, so runs after this one), or aiohttp
# reports them unclosed.
_async_filesystems: weakref.WeakSet[Any] = weakref.WeakSet()


@atexit.register
def _close_sessions() -> None:
    for fs in list(_async_filesystems):
        creator = getattr(fs, "_s3creator", None)
        if creator is None:
            continue
        try:
            _zarr.run(creator.__aexit__(None, None, None), timeout=5)
        except Exception as err:  # noqa: BLE001 - best effort at interpreter exit
            logging.getLogger(__name__).debug("closing an S3 session failed: %r", err)
