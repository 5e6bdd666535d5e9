"""Where stores live: a local directory or an S3-compatible bucket.

:func:`resolve_root` turns the ``directory`` given to the writer into a
storage root that claims a new store for a run exclusively (never taking over
another run's store), holding an empty Zarr V3 group from its first write, and
names it for people (a path, or an ``s3://`` URL).

Object storage goes through zarr's :class:`~zarr.storage.FsspecStore` with
``s3fs``: the same ``storage_options`` that ``xr.open_zarr`` takes to read the
store back, and, with none given, the standard AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``) as boto3 reads them.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from zarr.abc.store import Store
from zarr.storage import LocalStore

from ._errors import MissingDependencyError, OptionError, StorageError, StoreExistsError
from ._plan import store_name, store_path

#: URL schemes served by object storage, and the extra that installs them.
REMOTE_SCHEMES = {"s3": "s3", "s3a": "s3"}

# A claimed store starts as an empty Zarr V3 group: valid from the first byte.
_EMPTY_GROUP = json.dumps(
    {"zarr_format": 3, "node_type": "group", "attributes": {}}, indent=2
).encode()


def is_url(root: str | os.PathLike[str]) -> bool:
    """Whether ``root`` names object storage (``s3://...``) rather than a directory."""
    return isinstance(root, str) and "://" in root


class LocalRoot:
    """Stores as directories below a local root directory."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    @property
    def display(self) -> Path:
        return self.directory

    def location(self, template: str, start: Mapping[str, Any]) -> Path:
        """The path the run's store will have (its parent directory made)."""
        path = store_path(self.directory, template, start)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def create_store(
        self, template: str, start: Mapping[str, Any], *, overwrite: bool
    ) -> tuple[Path, Store]:
        """Make the run's store directory exclusively, holding an empty group."""
        path = self.location(template, start)
        try:
            path.mkdir()
        except FileExistsError:
            if not overwrite:
                raise StoreExistsError(
                    f"{path} already exists; refusing to overwrite another run "
                    f"(pass overwrite=True or choose another name_template)"
                ) from None
            shutil.rmtree(path)
            path.mkdir()
        (path / "zarr.json").write_bytes(_EMPTY_GROUP)
        return path, LocalStore(path)


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

    def create_store(
        self, template: str, start: Mapping[str, Any], *, overwrite: bool
    ) -> tuple[str, Store]:
        """Claim the run's prefix with a conditional write, then open it."""
        key = "/".join([self.prefix, *store_name(template, start)])
        url = f"{self.scheme}://{key}"
        try:
            if overwrite and self.fs.exists(f"{key}/zarr.json"):
                self.fs.rm(key, recursive=True)
            # If-None-Match: exactly one writer can create zarr.json.
            self.fs.pipe_file(f"{key}/zarr.json", _EMPTY_GROUP, mode="create")
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
    root: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> Root:
    """The storage root named by a directory or an ``s3://bucket/prefix`` URL."""
    if is_url(root):
        return FsspecRoot(str(root), storage_options)
    if storage_options:
        raise OptionError(
            f"storage_options= apply to object storage URLs (s3://...), not to the "
            f"local directory {str(root)!r}"
        )
    return LocalRoot(root)


def open_store(
    location: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    read_only: bool = True,
) -> Store:
    """A Zarr store for an existing store's directory or URL."""
    if not is_url(location):
        return LocalStore(Path(location), read_only=read_only)
    url = str(location)
    scheme = url.partition("://")[0]
    if scheme not in REMOTE_SCHEMES:
        raise OptionError(f"unsupported storage URL {url!r}")
    from zarr.storage import FsspecStore

    fs = _filesystem(scheme, dict(storage_options or {}), asynchronous=True)
    return FsspecStore(fs, path=url.partition("://")[2], read_only=read_only)


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
    from zarr.core.sync import sync

    for fs in list(_async_filesystems):
        creator = getattr(fs, "_s3creator", None)
        if creator is None:
            continue
        try:
            sync(creator.__aexit__(None, None, None), timeout=5)
        except Exception as err:  # noqa: BLE001 - best effort at interpreter exit
            logging.getLogger(__name__).debug("closing an S3 session failed: %r", err)
