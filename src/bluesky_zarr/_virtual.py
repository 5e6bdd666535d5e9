"""Zero-copy stores: frames in detectors' HDF5 files as Icechunk virtual chunks.

With ``external="virtual"`` a run's store is an `Icechunk
<https://icechunk.io>`_ repository. Everything the documents carry (scalars,
coordinates, ``time``, ``seq_num``, ``_written``, attributes) is written
through zarr-python into the repository's session as in any other store. The
frames that stream_datum documents (and area-detector HDF5 datums) point to
are not read: each HDF5 chunk becomes a *virtual chunk*, a reference to its
byte range in the detector's file, placed at the grid point of its event
(snaking undone), so the cube reads like any other and no frame byte is
copied.

An HDF5 dataset maps when one point's frames are whole Zarr chunks:

* chunked one frame per chunk (or all the frames of one point per chunk),
  or a regular tiling of a frame, stored raw or with a filter whose bytes a
  Zarr V3 codec decodes as they are (Blosc, id 32001; Zstandard, id 32015);
* contiguous (frames at a fixed stride from the dataset's offset).

Anything else (gzip/deflate, whose zlib framing the V3 ``gzip`` codec does not
read; LZF; HDF5's shuffle; the LZ4 and bitshuffle plugins with their own
framing; checksums; chunks that span several points, such as a detector's
column of sums; a chunk stored with its filter skipped) is copied as in
``fill`` mode, per data key, and the stream group's ``virtual`` attribute
says which keys are referenced and which were copied, and why.

The repository is committed at the writer's flush interval and at stop; a
reader sees the last commit (:func:`open_virtual`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import os
import secrets
import shutil
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _zarr
from ._errors import (
    MissingDependencyError,
    StorageError,
    StoreExistsError,
    WriteError,
)

if TYPE_CHECKING:
    from ._external import ExternalRun, StreamKey
    from ._run import RunWriter
    from ._stream import StreamWriter

#: The branch a run's repository is written on.
BRANCH = "main"

#: HDF5 filter ids whose chunks Zarr V3 codecs decode as stored.
BLOSC_FILTER = "32001"
ZSTD_FILTER = "32015"

_BLOSC_CNAMES = {0: "blosclz", 1: "lz4", 2: "lz4hc", 4: "zlib", 5: "zstd"}
_BLOSC_SHUFFLES = {0: "noshuffle", 1: "shuffle", 2: "bitshuffle"}

#: Names HDF5 (h5py) gives filters that have no Zarr V3 codec reading their chunks.
_FILTER_NAMES = {
    "gzip": "gzip/deflate (zlib framing, which the Zarr V3 gzip codec does not read)",
    "lzf": "LZF (no Zarr V3 codec)",
    "shuffle": "HDF5 byte shuffle (no Zarr V3 codec)",
    "fletcher32": "Fletcher-32 checksums (no Zarr V3 codec)",
    "scaleoffset": "scale-offset (no Zarr V3 codec)",
    "szip": "szip (no Zarr V3 codec)",
    "32004": "the HDF5 LZ4 plugin (its own block framing, not numcodecs' LZ4)",
    "32008": "the bitshuffle plugin (its own block framing)",
}


_quieted = False


def _icechunk() -> Any:
    global _quieted
    try:
        import icechunk
    except ImportError as err:
        raise MissingDependencyError(
            "external='virtual' writes Icechunk repositories: pip install "
            "'bluesky-zarr[virtual]'"
        ) from err
    if not _quieted and "ICECHUNK_LOG" not in os.environ:
        # Icechunk warns on stdout, at every open of a local repository, that
        # the local file system is unsafe for concurrent commits: a run's
        # writer commits from one thread, and the warning would corrupt the
        # output of `bluesky-zarr inspect --json`. ICECHUNK_LOG overrides.
        icechunk.set_logs_filter(
            "icechunk::storage::object_store=error,icechunk_arrow_object_store=error,"
            "icechunk_storage::readback=error,warn"
        )
        _quieted = True
    return icechunk


# ------------------------------------------------------------------- storage
def _s3_storage(url: str, storage_options: Mapping[str, Any]) -> Any:
    """Icechunk S3 storage for ``s3://bucket/prefix``, from s3fs-style options."""
    ic = _icechunk()
    bucket, _, prefix = url.partition("://")[2].partition("/")
    options = dict(storage_options)
    client = dict(options.get("client_kwargs") or {})
    endpoint = options.get("endpoint_url") or client.get("endpoint_url")
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL")
    region = client.get("region_name") or options.get("region")
    region = region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    key = options.get("key")
    return ic.s3_storage(
        bucket=bucket,
        prefix=prefix.strip("/"),
        region=region or "us-east-1",
        endpoint_url=endpoint,
        allow_http=bool(endpoint and str(endpoint).startswith("http://")),
        force_path_style=bool(endpoint),
        access_key_id=key,
        secret_access_key=options.get("secret"),
        from_env=None if key else True,
    )


def repository_storage(
    location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> Any:
    """Icechunk storage for a repository's directory or ``s3://`` URL."""
    from ._storage import is_url

    if is_url(location):
        return _s3_storage(str(location), storage_options or {})
    return _icechunk().local_filesystem_storage(str(Path(location).resolve()))


def is_repository_listing(
    directories: set[str], files: set[str], has_branch: Callable[[], bool]
) -> bool:
    """Whether a directory holding ``directories`` and ``files`` is an
    Icechunk repository (a virtual run's store), not a Zarr node nor a
    directory of runs that a name template happened to name alike.

    Icechunk 2 keeps one table of contents (the file ``repo``) beside its
    ``snapshots``; Icechunk 1 keeps each branch as ``refs/branch.<name>``
    (``has_branch`` looks there, only when needed: a listing more).
    """
    if "snapshots" not in directories or "zarr.json" in files:
        return False
    if "repo" in files:
        return True
    if "refs" not in directories:
        return False
    try:
        return has_branch()
    except OSError:
        return False


def is_repository(
    location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> bool:
    """Whether ``location`` holds an Icechunk repository (a virtual run store)."""
    from ._storage import is_url

    if not is_url(location):
        path = Path(location)
        try:
            entries = list(os.scandir(path))
        except OSError:
            return False
        return is_repository_listing(
            {e.name for e in entries if e.is_dir()},
            {e.name for e in entries if e.is_file()},
            lambda: any(n.startswith("branch.") for n in os.listdir(path / "refs")),
        )
    try:
        ic = _icechunk()
    except MissingDependencyError:
        return False
    try:
        return bool(ic.Repository.exists(repository_storage(location, storage_options)))
    except Exception:  # noqa: BLE001 - not reachable as a repository: not one
        return False


def _authorized(storage: Any) -> dict[str, Any]:
    """Read access to the virtual chunk containers a run's repository declares
    (the detector directories its writer referenced), with no credentials."""
    ic = _icechunk()
    config = ic.Repository.fetch_config(storage)
    containers = (config.virtual_chunk_containers or {}) if config is not None else {}
    return ic.containers_credentials(_local_access(containers))


def _local_access(prefixes: Iterable[str]) -> dict[str, Any]:
    """Read access without credentials to local (``file://``) containers:
    Icechunk 2.1 and later name it with a sentinel (its ``None`` is
    deprecated); Icechunk 1 takes ``None``."""
    credentials = getattr(_icechunk(), "credentials", None)
    access = getattr(credentials, "LocalFileSystemAccess", None)
    return {prefix: access for prefix in prefixes}


def virtual_store(
    location: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    snapshot: str | None = None,
) -> Any:
    """A read-only Zarr store over a virtual run's last commit (or ``snapshot``),
    with its detector directories authorized for reading."""
    ic = _icechunk()
    storage = repository_storage(location, storage_options)
    try:
        repo = ic.Repository.open(storage, authorize_virtual_chunk_access=_authorized(storage))
    except Exception as err:  # noqa: BLE001 - icechunk raises its own error types
        raise StorageError(f"{location} is not an Icechunk repository: {err}") from err
    if snapshot is not None:
        session = repo.readonly_session(snapshot_id=snapshot)
    else:
        session = repo.readonly_session(branch=BRANCH)
    return session.store


def _container_directory(directory: str) -> str:
    """The directory to declare as a virtual chunk container for files in
    ``directory``: itself, or its nearest parent whose ``file://`` URL needs no
    percent-encoding. (Icechunk 1.1 matches no chunk against a container
    whose URL holds an escape such as ``%20``, from a space, ``#`` or a
    non-ASCII letter; a parent's container serves the files below it.)"""
    path = Path(directory)
    for candidate in (path, *path.parents):
        if candidate.as_uri() == "file://" + candidate.as_posix():
            return str(candidate)
    return path.anchor


def open_virtual(
    location: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    snapshot: str | None = None,
    **kwargs: Any,
) -> Any:
    """Open a run written with ``external="virtual"`` as an xarray DataTree.

    Parameters
    ----------
    location
        The run's repository: the path in ``writer.stores`` (or its ``s3://`` URL).
    storage_options
        For object storage: the writer's ``storage_options`` (key, secret,
        endpoint_url).
    snapshot
        A commit id; by default the last commit of the run (while the run goes,
        the snapshot of its last flush).
    kwargs
        Passed on to :func:`xarray.open_datatree`.
    """
    import xarray as xr

    store: Any = virtual_store(location, storage_options, snapshot=snapshot)
    kwargs.setdefault("consolidated", False)
    return xr.open_datatree(store, engine="zarr", **kwargs)


# -------------------------------------------------------------- commit gate
class _Gate:
    """Lets writes into the session run together and a commit run alone."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.active = 0
        self.committing = False

    async def enter_async(self) -> None:
        # On zarr's event loop: never block it; poll while a commit runs.
        while True:
            with self.cond:
                if not self.committing:
                    self.active += 1
                    return
            await asyncio.sleep(0.001)

    def enter(self) -> None:
        with self.cond:
            while self.committing:
                self.cond.wait()
            self.active += 1

    def leave(self) -> None:
        with self.cond:
            self.active -= 1
            if not self.active:
                self.cond.notify_all()

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        with self.cond:
            while self.committing:
                self.cond.wait()
            self.committing = True
            while self.active:
                self.cond.wait()
        try:
            yield
        finally:
            with self.cond:
                self.committing = False
                self.cond.notify_all()


class SessionStore(_zarr.WrapperStore[Any]):
    """The run's store: the current writable session's store, which a commit
    replaces (a committed Icechunk session is read-only). Writes wait while a
    commit runs, and a commit waits for the writes under way."""

    def __init__(self, store: Any, gate: _Gate | None = None) -> None:
        super().__init__(store)
        self.gate = gate or _Gate()

    def _with_store(self, store: Any) -> SessionStore:
        return type(self)(store, self.gate)

    # zarr-python names the store (str) when it makes an array object. The
    # session's own name waits for the session, which a commit holds on
    # another thread (Icechunk 2, without letting the interpreter go): a
    # name of its own never touches the session.
    def __str__(self) -> str:
        return f"icechunk-session://{id(self.gate):x}"

    def __repr__(self) -> str:
        return f"SessionStore({self})"

    def with_read_only(self, read_only: bool = False) -> Any:
        # The same store for the writer (a copy would keep a session that a
        # commit makes read-only); a reader's view of the current session.
        if read_only == self.read_only:
            return self
        return self._store.with_read_only(read_only)

    @property
    def supports_consolidated_metadata(self) -> bool:
        return False

    async def set(self, key: str, value: Any) -> None:
        await self.gate.enter_async()
        try:
            await self._store.set(key, value)
        finally:
            self.gate.leave()

    async def set_if_not_exists(self, key: str, value: Any) -> None:
        await self.gate.enter_async()
        try:
            await self._store.set_if_not_exists(key, value)
        finally:
            self.gate.leave()

    async def _set_many(self, values: Iterable[tuple[str, Any]]) -> None:
        for key, value in values:
            await self.set(key, value)

    async def delete(self, key: str) -> None:
        await self.gate.enter_async()
        try:
            await self._store.delete(key)
        finally:
            self.gate.leave()

    async def delete_dir(self, prefix: str) -> None:
        await self.gate.enter_async()
        try:
            await self._store.delete_dir(prefix)
        finally:
            self.gate.leave()


class VirtualRepository:
    """The Icechunk repository of one run: its session, commits and the
    directories (virtual chunk containers) its references point into."""

    def __init__(self, repo: Any, storage: Any) -> None:
        self.repo = repo
        self.storage = storage
        self.session = repo.writable_session(BRANCH)
        self.store = SessionStore(self.session.store)
        self.containers: set[str] = set(repo.config.virtual_chunk_containers or {})
        self.commits = 0
        self.lock = threading.Lock()
        #: Object storage: its file system and the repository's prefix, for
        #: files kept beside the repository (not Zarr keys).
        self.beside: tuple[Any, str] | None = None

    def put_beside(self, name: str, data: bytes) -> None:
        """Write an object ``name`` beside the repository's own (object storage;
        a local repository's directory takes files directly)."""
        if self.beside is None:
            raise StorageError(f"no place beside the repository for {name}")
        fs, key = self.beside
        fs.pipe_file(f"{key}/{name}", data)

    def commit(self, message: str) -> str | None:
        """Commit what the session holds (if anything) and go on in a new one."""
        with self.lock, self.store.gate.alone():
            return self._commit(message)

    def _commit(self, message: str) -> str | None:
        if not self.session.has_uncommitted_changes:
            return None
        try:
            snapshot: str = self.session.commit(message)
        except Exception as err:  # noqa: BLE001 - icechunk raises its own error types
            raise WriteError(f"committing the run's repository failed: {err!r}") from err
        self.commits += 1
        self.session = self.repo.writable_session(BRANCH)
        self.store._store = self.session.store
        return snapshot

    def ensure_container(self, file: str) -> None:
        """Declare the directory of ``file`` as a virtual chunk container, so
        references into it are valid and readers can authorize it."""
        if any(Path(file).as_uri().startswith(p) for p in self.containers):
            return
        ic = _icechunk()
        directory = _container_directory(os.path.dirname(file))
        prefix = Path(directory).as_uri().rstrip("/") + "/"
        with self.lock, self.store.gate.alone():
            # Committed first: the new configuration reopens the repository.
            self._commit("before declaring a detector directory")
            config = self.repo.config
            config.set_virtual_chunk_container(
                ic.VirtualChunkContainer(prefix, ic.local_filesystem_store(directory))
            )
            self.repo = _icechunk().Repository.open(
                self.storage,
                config=config,
                authorize_virtual_chunk_access=_local_access(self.containers | {prefix}),
            )
            self.repo.save_config()
            self.session = self.repo.writable_session(BRANCH)
            self.store._store = self.session.store
            self.containers.add(prefix)

    def set_refs(self, array_path: str, specs: list[Any]) -> None:
        self.store.gate.enter()
        try:
            failed = self.store._store.set_virtual_refs(array_path, specs)
        finally:
            self.store.gate.leave()
        if failed:
            raise WriteError(
                f"{len(failed)} virtual chunk reference(s) of {array_path} were refused "
                f"(chunks {failed[:5]}...)"
            )


def create_repository(
    run: RunWriter, doc: Mapping[str, Any], metadata: bytes
) -> tuple[Path | str, Any]:
    """Make the run's repository holding ``metadata`` as its root ``zarr.json``;
    sets ``run.virtual``. Locally it is built aside and renamed into place, so
    it appears whole or not at all."""
    from ._storage import LocalRoot, put_in_place

    ic = _icechunk()
    storage = run.storage
    options = run.options

    def first_commit(repo: Any) -> None:
        session = repo.writable_session(BRANCH)
        _zarr.put(session.store, "zarr.json", metadata)
        session.commit("start")

    if isinstance(storage, LocalRoot):
        path = storage.location(options.name_template, doc)
        storage._remove_leftovers(path)
        if path.exists() and not options.overwrite:
            raise StoreExistsError(
                f"{path} already exists; refusing to overwrite another run "
                f"(pass overwrite=True or choose another name_template)"
            )
        aside = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
        try:
            first_commit(ic.Repository.create(ic.local_filesystem_storage(str(aside))))
            put_in_place(aside, path)
            ic_storage = ic.local_filesystem_storage(str(path.resolve()))
            repo = ic.Repository.open(ic_storage)
        except OSError as err:
            shutil.rmtree(aside, ignore_errors=True)
            raise StorageError(f"cannot create the repository {path}: {err}") from err
        except Exception as err:  # noqa: BLE001 - icechunk raises its own error types
            shutil.rmtree(aside, ignore_errors=True)
            raise StorageError(
                errno.EIO, f"cannot create the repository {path}: {err!r}"
            ) from err
    else:
        from ._plan import store_name

        url = f"{storage.scheme}://" + "/".join([storage.prefix, *store_name(
            options.name_template, doc
        )])
        ic_storage = repository_storage(url, storage.storage_options)
        try:
            key = url.partition("://")[2]
            if ic.Repository.exists(ic_storage) or storage.fs.exists(f"{key}/zarr.json"):
                if not options.overwrite:
                    raise StoreExistsError(
                        f"{url} already exists; refusing to overwrite another run "
                        f"(pass overwrite=True or choose another name_template)"
                    )
                storage.fs.rm(key, recursive=True)
            first_commit(ic.Repository.create(ic_storage))
            repo = ic.Repository.open(ic_storage)
        except StoreExistsError:
            raise
        except Exception as err:  # noqa: BLE001 - icechunk raises its own error types
            raise StorageError(f"cannot create the repository {url}: {err!r}") from err
        run.virtual = VirtualRepository(repo, ic_storage)
        run.virtual.beside = (storage.fs, key)
        return url, run.virtual.store
    run.virtual = VirtualRepository(repo, ic_storage)
    return path, run.virtual.store


# ------------------------------------------------------------ frame mapping
@dataclass
class _KeyState:
    """What was decided for one data key of one stream."""

    #: The Zarr chunk shape and codec configuration its array was laid out
    #: with for references (None: the key is copied).
    chunks: tuple[int, ...] | None = None
    codecs: Any = None
    #: Why some (or all) of its frames were copied.
    copied: str | None = None


@dataclass
class _Layout:
    """How one HDF5 dataset maps onto Zarr chunks of one data key."""

    frame_chunks: tuple[int, ...]
    compressors: tuple[Any, ...]
    endian: str | None
    codecs_id: str


@dataclass
class VirtualFrames:
    """Turns the rows that stream_datum (and area-detector datum) documents
    name into virtual chunks."""

    run: ExternalRun
    keys: dict[tuple[str, str], _KeyState] = field(default_factory=dict)

    def place(
        self,
        stream: StreamWriter,
        key: str,
        dataset: Any,
        path: str,
        info: StreamKey,
        per_index: int,
        start: int,
        stop: int,
        index: tuple[np.ndarray, ...],
    ) -> str | None:
        """Reference the frames of events ``start..stop`` at the points ``index``.

        Returns None when they are referenced, else why they must be copied
        (the caller copies them).
        """
        specs = self.prepare(stream, key, dataset, path, info, per_index, start, stop, index)
        if isinstance(specs, str):
            return specs
        self.apply(stream, key, [path], specs, index)
        return None

    def settled_copied(self, stream: StreamWriter, key: str) -> bool:
        """Whether the key's frames are copied from now on."""
        state = self.keys.get((stream.name, key))
        return state is not None and state.chunks is None and state.copied is not None

    def prepare(
        self,
        stream: StreamWriter,
        key: str,
        dataset: Any,
        path: str,
        info: StreamKey,
        per_index: int,
        start: int,
        stop: int,
        index: tuple[np.ndarray, ...],
    ) -> list[Any] | str:
        """The virtual chunks of events ``start..stop`` (at the points ``index``),
        the key's array laid out for them; or why they must be copied."""
        state = self.keys.setdefault((stream.name, key), _KeyState())
        if state.chunks is None and state.copied is not None:
            return state.copied
        spec = next(s for s in stream.layout.arrays.values() if s.key == key)
        keeps = (
            not info.squeezed
            and info.declared is not None
            and len(info.declared) == dataset.ndim
        )
        layout, why = _dataset_layout(dataset, per_index, keeps)
        reason = why if layout is None else _dtype_mismatch(spec.dtype, dataset.dtype)
        if layout is None or reason is not None:
            return self._copied(stream, key, state, reason or "unknown")
        row_shape = tuple(dataset.shape[1:])
        frame_chunks = layout.frame_chunks
        chunks = (1,) * stream.n_scan + frame_chunks
        if state.chunks is None:
            frame = ((per_index,) if keeps else ()) + row_shape
            relaid = self._lay_out(stream, spec, chunks, layout, np.empty(frame, dataset.dtype))
            if relaid is not None:
                return self._copied(stream, key, state, relaid)
            state.chunks, state.codecs = chunks, layout.codecs_id
            self._record(stream)
        elif (state.chunks, state.codecs) != (chunks, layout.codecs_id):
            return self._copied(
                stream, key, state,
                f"{path}: chunks or filters differ from the first file's "
                f"({chunks} {layout.codecs_id} against {state.chunks} {state.codecs})",
            )
        specs, reason = _chunk_specs(
            dataset, path, per_index, keeps, layout, start, stop, index, row_shape
        )
        if reason is not None:
            return self._copied(stream, key, state, reason)
        return specs

    def apply(
        self,
        stream: StreamWriter,
        key: str,
        paths: list[str],
        specs: list[Any],
        index: tuple[np.ndarray, ...],
    ) -> None:
        """Store prepared virtual chunks of files ``paths`` and mark their points."""
        virtual = self.run.virtual
        assert virtual is not None
        if stream.growing and index[0].size:
            stream.ensure_length(int(index[0].max()) + 1)
        for path in paths:
            virtual.ensure_container(os.path.abspath(path))
        spec = next(s for s in stream.layout.arrays.values() if s.key == key)
        sink = stream.sinks[spec.name]
        virtual.set_refs("/" + sink.array.path, specs)
        if index[0].size:
            lo = [int(ix.min()) for ix in index]
            hi = [int(ix.max()) + 1 for ix in index]
            filled = np.zeros([h - lo_ for lo_, h in zip(lo, hi)], dtype=bool)
            filled[tuple(ix - lo_ for ix, lo_ in zip(index, lo))] = True
            region = tuple(slice(lo_, h) for lo_, h in zip(lo, hi))
            stream.mark_on_disk(sink, region, filled)
        return None

    def _copied(self, stream: StreamWriter, key: str, state: _KeyState, reason: str) -> str:
        if state.copied != reason:
            state.copied = reason
            self._record(stream)
        return reason

    def _record(self, stream: StreamWriter) -> None:
        """Write the stream group's ``virtual`` attribute: the keys referenced,
        and the keys copied with why."""
        states = {k: s for (name, k), s in self.keys.items() if name == stream.name}
        attrs: dict[str, Any] = {
            "referenced": sorted(k for k, s in states.items() if s.chunks is not None),
            "copied": {k: s.copied for k, s in sorted(states.items()) if s.copied},
        }
        with self.run.meta_lock:
            stream.group = self.run.metadata.set_attributes(stream.name, {"virtual": attrs})
            self.run.metadata.consolidate()

    def _lay_out(
        self,
        stream: StreamWriter,
        spec: Any,
        chunks: tuple[int, ...],
        layout: _Layout,
        sample: np.ndarray,
    ) -> str | None:
        """Make the key's array anew with one point's frames per chunk and the
        codecs of the file; returns why not, if its frames were placed before."""
        from ._buffer import ArraySink
        from ._layout import fill_value_for

        with self.run.buffer_lock, self.run.meta_lock:
            sink = stream.sinks.get(spec.name)
            if sink is None:
                sink = stream._create_pending(spec, sample)
            if sink.blocks or sink.submitted or stream.on_disk[spec.name].any():
                return (
                    "frames of this key were copied before the first that can be "
                    "referenced"
                )
            old = sink.array
            # The file's byte order (the machine's, for a native dtype).
            serializer: dict[str, Any] = {"name": "bytes"}
            if old.dtype.itemsize > 1:
                serializer["configuration"] = {"endian": layout.endian or sys.byteorder}
            array = self.run.metadata.add_array(
                f"{stream.name}/{spec.name}",
                shape=old.shape,
                dtype=old.dtype,
                chunks=chunks,
                shards=None,
                serializer=serializer,
                compressors=layout.compressors,
                fill_value=fill_value_for(sink.dtype),
                dimension_names=old.metadata.dimension_names,
                attributes=dict(old.attrs),
            )
            stream.sinks[spec.name] = ArraySink(sink.spec, array, stream.n_scan)
            self.run.metadata.consolidate()
        return None


def _dtype_mismatch(dtype: np.dtype | None, stored: np.dtype) -> str | None:
    if dtype is None:
        return None
    if dtype.kind != stored.kind or dtype.itemsize != stored.itemsize:
        return (
            f"the file stores {stored} where the descriptor declares {dtype}: its "
            f"bytes cannot be read as they are"
        )
    return None


def _codecs(filters: Mapping[str, Any], dtype: np.dtype) -> tuple[tuple[Any, ...], str] | str:
    """Zarr V3 codecs reading chunks stored with these HDF5 ``filters``, or why
    there are none."""
    if not filters:
        return (), "raw"
    if len(filters) > 1:
        names = ", ".join(_FILTER_NAMES.get(k, f"filter {k}") for k in filters)
        return f"HDF5 filter pipeline {names} has no Zarr V3 codec chain"
    ((name, options),) = filters.items()
    options = tuple(options) if isinstance(options, (tuple, list)) else (options,)
    if name == ZSTD_FILTER:
        level = int(options[0]) if options else 0
        zstd = {"name": "zstd", "configuration": {"level": level, "checksum": False}}
        return (zstd,), f"zstd:{level}"
    if name == BLOSC_FILTER:
        # cd_values: reserved, version, typesize, bytes, clevel, shuffle, compressor.
        clevel = int(options[4]) if len(options) > 4 else 5
        shuffle: Any = _BLOSC_SHUFFLES.get(int(options[5]) if len(options) > 5 else 1, "shuffle")
        cname: Any = _BLOSC_CNAMES.get(int(options[6]) if len(options) > 6 else 0, "blosclz")
        codec = {
            "name": "blosc",
            "configuration": {
                "typesize": dtype.itemsize,
                "cname": cname,
                "clevel": clevel,
                "shuffle": shuffle,
                "blocksize": 0,
            },
        }
        return (codec,), f"blosc:{cname}:{clevel}:{shuffle}"
    return (
        f"HDF5 filter {_FILTER_NAMES.get(name, f'{name} (no Zarr V3 codec)')} has no "
        f"Zarr V3 codec that reads its chunks"
    )


def _dataset_layout(dataset: Any, per_index: int, keeps: bool) -> tuple[_Layout | None, str]:
    """How the dataset's chunks map to Zarr chunks of one point, or why not."""
    row_shape = tuple(dataset.shape[1:])
    dtype = np.dtype(dataset.dtype)
    if dtype.kind not in "biuf" or dtype.hasobject:
        return None, f"HDF5 dtype {dtype} is not a plain number"
    endian = {">": "big", "<": "little"}.get(dtype.byteorder)
    chunks = dataset.chunks
    if chunks is None:
        if not keeps and per_index != 1:
            return None, f"{per_index} frames per point in a key that keeps one"
        frame = (1,) + row_shape if keeps else row_shape
        return _Layout(frame, (), endian, "raw"), ""
    codecs = _codecs(dataset._filters, dtype)
    if isinstance(codecs, str):
        return None, codecs
    compressors, codecs_id = codecs
    first, tile = int(chunks[0]), tuple(int(c) for c in chunks[1:])
    if first == 1:
        frame = ((1,) if keeps else ()) + tile
    elif keeps and first == per_index:
        frame = (first,) + tile
    else:
        return None, (
            f"HDF5 chunks of {first} rows span several points ({per_index} frame(s) a "
            f"point): a Zarr chunk holds one point"
        )
    return _Layout(frame, compressors, endian, codecs_id), ""


def _chunk_specs(
    dataset: Any,
    path: str,
    per_index: int,
    keeps: bool,
    layout: _Layout,
    start: int,
    stop: int,
    index: tuple[np.ndarray, ...],
    row_shape: tuple[int, ...],
) -> tuple[list[Any], str | None]:
    """The virtual chunk specs of events ``start..stop``, or why they cannot be made."""
    ic = _icechunk()
    location = Path(path).resolve().as_uri()
    specs = []
    tiles = tuple(
        math.ceil(n / c) for n, c in zip(row_shape, layout.frame_chunks[-len(row_shape):])
    ) if row_shape else ()
    if dataset.chunks is None:
        offset = dataset.id.get_offset()
        if offset is None:
            return [], f"{path}: the contiguous dataset holds no data yet"
        row_bytes = math.prod(row_shape) * dataset.dtype.itemsize
        for e in range(stop - start):
            point = [int(ix[e]) for ix in index]
            for f in range(per_index):
                row = (start + e) * per_index + f
                chunk = point + ([f] if keeps else []) + [0] * len(row_shape)
                specs.append(ic.VirtualChunkSpec(
                    index=chunk, location=location, offset=offset + row * row_bytes,
                    length=row_bytes,
                ))
        return specs, None
    rows_per_chunk = int(dataset.chunks[0])
    tile_shape = layout.frame_chunks[-len(row_shape):] if row_shape else ()
    get = dataset.id.get_chunk_info_by_coord
    for e in range(stop - start):
        point = [int(ix[e]) for ix in index]
        for f in range(0, per_index, rows_per_chunk):
            row = (start + e) * per_index + f
            for tile in np.ndindex(*tiles) if tiles else [()]:
                where = (row,) + tuple(t * c for t, c in zip(tile, tile_shape))
                stored = get(where)
                if stored.byte_offset is None:
                    return [], f"{path}: rows {row} of the dataset have no chunk on disk yet"
                if stored.filter_mask:
                    return [], (
                        f"{path}: a chunk was stored with its filter skipped "
                        f"(filter mask {stored.filter_mask})"
                    )
                frame_index = [f // rows_per_chunk] if keeps else []
                specs.append(ic.VirtualChunkSpec(
                    index=point + frame_index + list(tile), location=location,
                    offset=int(stored.byte_offset), length=int(stored.size),
                ))
    return specs, None
