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
from typing import Any

from .._errors import (
    MissingDependencyError,
    OptionError,
    StorageError,
    StoreExistsError,
)
from ..plan._names import store_name, store_path
from . import _zarr
from ._files import LocalFiles, fsync_directory, put_in_place
from ._lock import StoreLock
from ._records import INCOMPLETE, check_replaceable, parse_attributes, read_root_attributes

#: URL schemes served by object storage, and the extra that installs them.
REMOTE_SCHEMES = {"s3": "s3", "s3a": "s3"}


#: ``overwrite=`` value: replace only an unfinished store of the same run.
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
                fsync_directory(aside)
            put_in_place(aside, path)
            if self.durable:
                fsync_directory(path.parent)
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
        return f"{self.scheme}://{key}", parse_attributes(metadata)

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
                existing = parse_attributes(self.fs.cat_file(f"{key}/zarr.json"))
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
