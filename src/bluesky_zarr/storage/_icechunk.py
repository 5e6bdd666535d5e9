"""A run's store as an Icechunk repository (``external="virtual"``).

With ``external="virtual"`` a run's store is an `Icechunk
<https://icechunk.io>`_ repository: a storage root like the others
(:class:`~bluesky_zarr.storage._roots.RunStore`), on a local path or on S3.
Everything the documents carry is written into the repository's session as
into any other store, through :class:`SessionStore`, which lets writes run
together and a commit run alone; the repository is committed at the writer's
flush interval and at stop, and a reader sees the last commit. The detector
directories that virtual chunks point into are declared as virtual chunk
containers (:meth:`VirtualRepository.ensure_container`); the references
themselves are made by :mod:`bluesky_zarr.external._virtual`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import shutil
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .._errors import (
    MissingDependencyError,
    StorageError,
    StoreExistsError,
    WriteError,
)
from ..plan import store_name
from . import _amend, _zarr
from ._files import put_in_place
from ._lock import StoreLock
from ._records import exists_error, is_repository_listing, parse_attributes
from ._roots import FsspecRoot, LocalRoot, RunStore, is_url

#: The branch a run's repository is written on.
BRANCH = "main"

_quieted = False


def load_icechunk() -> Any:
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
    ic = load_icechunk()
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
    if is_url(location):
        return _s3_storage(str(location), storage_options or {})
    return load_icechunk().local_filesystem_storage(str(Path(location).resolve()))


def is_repository(
    location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> bool:
    """Whether ``location`` holds an Icechunk repository (a virtual run store)."""
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
        ic = load_icechunk()
    except MissingDependencyError:
        return False
    try:
        return bool(ic.Repository.exists(repository_storage(location, storage_options)))
    except Exception:  # noqa: BLE001 - not reachable as a repository: not one
        return False


def _authorized(storage: Any) -> dict[str, Any]:
    """Read access to the virtual chunk containers a run's repository declares
    (the detector directories its writer referenced), with no credentials."""
    ic = load_icechunk()
    config = ic.Repository.fetch_config(storage)
    containers = (config.virtual_chunk_containers or {}) if config is not None else {}
    return ic.containers_credentials(_local_access(containers))


def _local_access(prefixes: Iterable[str]) -> dict[str, Any]:
    """Read access without credentials to local (``file://``) containers:
    Icechunk 2.1 and later name it with a sentinel (its ``None`` is
    deprecated); Icechunk 1 takes ``None``."""
    credentials = getattr(load_icechunk(), "credentials", None)
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
    ic = load_icechunk()
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

    @property
    def current(self) -> Any:
        """The session's store written to now."""
        return self._store

    def switch(self, store: Any) -> None:
        """Go on with ``store``: the new session's, after a commit."""
        self._store = store

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
        self.store.switch(self.session.store)
        return snapshot

    def ensure_container(self, file: str) -> None:
        """Declare the directory of ``file`` as a virtual chunk container, so
        references into it are valid and readers can authorize it."""
        if any(Path(file).as_uri().startswith(p) for p in self.containers):
            return
        ic = load_icechunk()
        directory = _container_directory(os.path.dirname(file))
        prefix = Path(directory).as_uri().rstrip("/") + "/"
        with self.lock, self.store.gate.alone():
            # Committed first: the new configuration reopens the repository.
            self._commit("before declaring a detector directory")
            config = self.repo.config
            config.set_virtual_chunk_container(
                ic.VirtualChunkContainer(prefix, ic.local_filesystem_store(directory))
            )
            self.repo = load_icechunk().Repository.open(
                self.storage,
                config=config,
                authorize_virtual_chunk_access=_local_access(self.containers | {prefix}),
            )
            self.repo.save_config()
            self.session = self.repo.writable_session(BRANCH)
            self.store.switch(self.session.store)
            self.containers.add(prefix)

    def set_refs(self, array_path: str, specs: list[Any]) -> None:
        self.store.gate.enter()
        try:
            failed = self.store.current.set_virtual_refs(array_path, specs)
        finally:
            self.store.gate.leave()
        if failed:
            raise WriteError(
                f"{len(failed)} virtual chunk reference(s) of {array_path} were refused "
                f"(chunks {failed[:5]}...)"
            )


class _RepositoryStore(RunStore):
    """A run's store that is an Icechunk repository: files kept beside it
    (in its directory, or as objects beside its own on object storage),
    readers see its last commit."""

    def __init__(self, path: Path | str, repository: VirtualRepository, fs: Any) -> None:
        super().__init__(path, repository.store)
        self.repository = repository
        #: The object storage it is on (``None``: a local directory).
        self.fs = fs
        self._kept: dict[str, list[bytes]] = {}

    def keep(self, name: str, line: bytes) -> None:
        if isinstance(self.path, Path):
            if self.gone():
                raise FileNotFoundError(f"{self.path} no longer exists")
            with open(self.path / name, "ab") as file:
                file.write(line)
            return
        # Object storage has no append: the object is rewritten whole.
        lines = self._kept.setdefault(name, [])
        lines.append(line)
        self.fs.pipe_file(f"{str(self.path).partition('://')[2]}/{name}", b"".join(lines))

    def commit(self, message: str) -> None:
        self.repository.commit(message)

    def gone(self) -> bool:
        return isinstance(self.path, Path) and not self.path.is_dir()


class RepositoryRoot:
    """Each run's store an Icechunk repository (``external="virtual"``), in a
    local directory or under an ``s3://`` prefix (``base``, whose naming,
    locking and options it shares). A local repository is built aside and
    renamed into place, so it appears whole or not at all."""

    def __init__(self, base: LocalRoot | FsspecRoot) -> None:
        self.base = base

    @property
    def display(self) -> Path | str:
        return self.base.display

    def where(self, template: str, start: Mapping[str, Any]) -> Path | str:
        return self.base.where(template, start)

    def lock(self, template: str, start: Mapping[str, Any]) -> StoreLock | None:
        return self.base.lock(template, start)

    def existing_attributes(
        self, template: str, start: Mapping[str, Any]
    ) -> tuple[Path | str, dict[str, Any] | None]:
        location, _ = self.base.existing_attributes(template, start)
        if not is_repository(location, self._options()):
            return location, None
        root = read_root(location, self._options())
        return location, parse_attributes(root) if root is not None else {}

    def keep_after_end(self, store: Path | str, run_uid: str, line: bytes) -> None:
        fs = self.base.fs if isinstance(self.base, FsspecRoot) else None
        keep_in_repository(
            repository_storage(store, self._options()), store, fs, run_uid, line
        )

    def _options(self) -> dict[str, Any] | None:
        return self.base.storage_options if isinstance(self.base, FsspecRoot) else None

    def create_store(
        self, template: str, start: Mapping[str, Any], *, overwrite: bool | str, metadata: bytes
    ) -> RunStore:
        """Make the run's repository holding ``metadata`` as its root ``zarr.json``."""
        ic = load_icechunk()

        def first_commit(repo: Any) -> None:
            session = repo.writable_session(BRANCH)
            _zarr.put(session.store, "zarr.json", metadata)
            session.commit("start")

        if isinstance(self.base, LocalRoot):
            path = self.base.location(template, start)
            self.base.remove_leftovers(path)
            if path.exists() and not overwrite:
                raise exists_error(path)
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
            return _RepositoryStore(path, VirtualRepository(repo, ic_storage), None)
        base = self.base
        key = "/".join([base.prefix, *store_name(template, start)])
        url = f"{base.scheme}://{key}"
        ic_storage = repository_storage(url, base.storage_options)
        try:
            if ic.Repository.exists(ic_storage) or base.fs.exists(f"{key}/zarr.json"):
                if not overwrite:
                    raise exists_error(url)
                base.fs.rm(key, recursive=True)
            first_commit(ic.Repository.create(ic_storage))
            repo = ic.Repository.open(ic_storage)
        except StoreExistsError:
            raise
        except Exception as err:  # noqa: BLE001 - icechunk raises its own error types
            raise StorageError(f"cannot create the repository {url}: {err!r}") from err
        return _RepositoryStore(url, VirtualRepository(repo, ic_storage), base.fs)


def metadata_store(
    location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None
) -> Any:
    """A read-only store over the last commit of a run's repository, for its
    metadata and ``_written`` mask: no manifest is loaded ahead (a repository
    deleted while it is read would have Icechunk log the failure on stdout,
    inside ``ls --json``), no detector directory authorized."""
    ic = load_icechunk()
    config = ic.RepositoryConfig.default()
    config.manifest = ic.ManifestConfig(preload=ic.ManifestPreloadConfig(max_total_refs=0))
    repo = ic.Repository.open(repository_storage(location, storage_options), config=config)
    return repo.readonly_session(branch=BRANCH).store


def read_root(
    location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None
) -> bytes | None:
    """The root ``zarr.json`` of a repository's last commit (a run written
    with ``external="virtual"``); ``None`` if it has none."""
    return _zarr.get(metadata_store(location, storage_options), "zarr.json")


def keep_in_repository(
    repository: Any, store: Path | str, fs: Any, run_uid: str, line: bytes
) -> None:
    """Keep ``line`` beside the finished Icechunk repository of run
    ``run_uid`` (``repository``: its Icechunk storage; ``fs``: the object
    storage it is on, or ``None`` for a local one) and commit its amended root
    record."""
    lock = StoreLock(store) if isinstance(store, Path) else None
    try:
        ic = load_icechunk()
        repo = ic.Repository.open(repository)
        session = repo.writable_session(BRANCH)
        root = _zarr.open_group(session.store, mode="r+")
        attributes = _amend.amended(dict(root.attrs.asdict()), run_uid)
        if isinstance(store, Path):
            with open(store / _amend.REFUSED_FILE, "ab") as file:
                file.write(line)
        else:
            _amend.append_object(fs, f"{store.partition('://')[2]}/{_amend.REFUSED_FILE}", line)
        root.attrs.put(attributes)
        session.commit("a document refused after the run ended")
    finally:
        if lock is not None:
            lock.release()
