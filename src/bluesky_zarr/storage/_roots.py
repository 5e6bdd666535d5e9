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
import logging
import os
import secrets
import shutil
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from .._errors import (
    MissingDependencyError,
    OptionError,
    StorageError,
)
from ..plan import store_name, store_path
from . import _amend, _zarr
from ._files import LocalFiles, fsync_directory, put_in_place
from ._lock import StoreLock
from ._records import (
    INCOMPLETE,
    check_replaceable,
    exists_error,
    parse_attributes,
    read_root_attributes,
)

#: URL schemes served by object storage, and the extra that installs them.
REMOTE_SCHEMES = {"s3": "s3", "s3a": "s3"}


def is_url(root: str | os.PathLike[str]) -> bool:
    """Whether ``root`` names object storage (``s3://...``) rather than a directory."""
    return isinstance(root, str) and "://" in root


class RunStore:
    """One run's store as its writer holds it: where it is (``path``), the
    Zarr store its metadata and arrays go to (``zarr``), and what its kind of
    storage does besides: keep a file of its own with it (:meth:`keep`),
    make what was written visible to readers (:meth:`commit`, for a
    repository), tell whether it is still there (:meth:`gone`).

    ``repository`` is the Icechunk repository of a run written with
    ``external="virtual"`` (its virtual chunk references), else ``None``.
    """

    repository: Any = None

    def __init__(self, path: Path | str, zarr_store: Any) -> None:
        self.path = path
        self.zarr = zarr_store

    def keep(self, name: str, line: bytes) -> None:
        """Add ``line`` to the file ``name`` kept with the store (not a Zarr node)."""
        raise NotImplementedError

    def commit(self, message: str) -> None:
        """Make what was written so far visible to readers (a store's writes
        are as they are made: nothing to do but for a repository)."""

    def gone(self) -> bool:
        """Whether the store has been deleted since it was made."""
        return False


class _DirectoryStore(RunStore):
    """A store in a local directory: files kept in it are appended to."""

    path: Path

    def keep(self, name: str, line: bytes) -> None:
        if self.gone():
            raise FileNotFoundError(f"{self.path} no longer exists")
        with open(self.path / name, "ab") as file:
            file.write(line)

    def gone(self) -> bool:
        return not self.path.is_dir()


class _ObjectStore(RunStore):
    """A store on object storage, which has no append: a file kept with it is
    rewritten whole (its lines are held for that)."""

    def __init__(self, path: str, zarr_store: Any) -> None:
        super().__init__(path, zarr_store)
        self._kept: dict[str, list[bytes]] = {}

    def keep(self, name: str, line: bytes) -> None:
        lines = self._kept.setdefault(name, [])
        lines.append(line)
        _zarr.put(self.zarr, name, b"".join(lines))


class Root(Protocol):
    """Where runs' stores are made: a local directory, a bucket, a repository."""

    @property
    def display(self) -> Path | str:
        """The root as people name it (a path, or a URL)."""

    def where(self, template: str, start: Mapping[str, Any]) -> Path | str:
        """Where the run's store goes (nothing is made)."""

    def lock(self, template: str, start: Mapping[str, Any]) -> StoreLock | None:
        """Lock the run's store before it is made or replaced (``None`` where
        the store is claimed by a conditional write instead)."""

    def create_store(
        self, template: str, start: Mapping[str, Any], *, overwrite: bool | str, metadata: bytes
    ) -> RunStore:
        """Make the run's store, whole or not at all, holding ``metadata`` as
        its root ``zarr.json``."""

    def existing_attributes(
        self, template: str, start: Mapping[str, Any]
    ) -> tuple[Path | str, dict[str, Any] | None]:
        """The run's store location and the root attributes of a store already there."""

    def keep_after_end(self, store: Path | str, run_uid: str, line: bytes) -> None:
        """Keep a document refused after run ``run_uid`` ended in its finished
        store, and record it there (see :mod:`._amend`)."""


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

    def where(self, template: str, start: Mapping[str, Any]) -> Path:
        return store_path(self.directory, template, start)

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
    ) -> RunStore:
        """Make the run's store, holding ``metadata`` as its root ``zarr.json``.

        The store is built in a hidden directory beside its path and renamed
        into place: a reader (or a writer killed meanwhile) sees it whole or
        not at all. The caller holds the path's :class:`StoreLock`.
        """
        path = self.location(template, start)
        self.remove_leftovers(path)
        if path.exists() and overwrite == INCOMPLETE:
            check_replaceable(str(path), read_root_attributes(path / "zarr.json"), start)
        elif path.exists() and not overwrite:
            raise exists_error(path)
        aside = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
        try:
            aside.mkdir()
            (aside / "zarr.json").write_bytes(metadata)
            if self.durable:
                fsync_directory(aside)
            put_in_place(aside, path)
            if self.durable:
                fsync_directory(path.parent)
        except OSError as err:
            shutil.rmtree(aside, ignore_errors=True)
            raise StorageError(f"cannot create the store {path}: {err}") from err
        return _DirectoryStore(path, _zarr.LocalFilesStore(LocalFiles(path, durable=self.durable)))

    def keep_after_end(self, store: Path | str, run_uid: str, line: bytes) -> None:
        _amend.keep_local(Path(store), run_uid, line, self.durable)

    @staticmethod
    def remove_leftovers(path: Path) -> None:
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
        return f"{self.scheme}://{key}", parse_attributes(metadata)

    def create_store(
        self,
        template: str,
        start: Mapping[str, Any],
        *,
        overwrite: bool | str,
        metadata: bytes,
    ) -> RunStore:
        """Claim the run's prefix with a conditional write of its root
        ``zarr.json`` (``metadata``), then open it."""
        key = "/".join([self.prefix, *store_name(template, start)])
        url = f"{self.scheme}://{key}"
        try:
            if overwrite == INCOMPLETE and self.fs.exists(f"{key}/zarr.json"):
                existing = parse_attributes(self.fs.cat_file(f"{key}/zarr.json"))
                check_replaceable(url, existing, start)
                self.fs.rm(key, recursive=True)
            elif overwrite and self.fs.exists(f"{key}/zarr.json"):
                self.fs.rm(key, recursive=True)
            # If-None-Match: exactly one writer can create zarr.json.
            self.fs.pipe_file(f"{key}/zarr.json", metadata, mode="create")
        except FileExistsError:
            raise exists_error(url) from None
        except OSError as err:
            raise StorageError(f"cannot create the store {url}: {err}") from err
        return _ObjectStore(url, open_store(url, self.storage_options, read_only=False))

    def where(self, template: str, start: Mapping[str, Any]) -> str:
        return f"{self.scheme}://" + "/".join([self.prefix, *store_name(template, start)])

    def lock(self, template: str, start: Mapping[str, Any]) -> None:
        """Object storage claims a store with a conditional write: no lock."""
        return None

    def keep_after_end(self, store: Path | str, run_uid: str, line: bytes) -> None:
        _amend.keep_remote(self.fs, str(store), run_uid, line)


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
