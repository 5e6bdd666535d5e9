"""Documents refused after their run ended, kept in the run's finished store.

A run's documents may come after its stop (a start delivered twice, an event
sent late, a second stop). The writer refuses them (the run is over), and,
as for every refused document, keeps them verbatim in the run's
``refused_documents.jsonl`` and counts them. The store is then amended: its
root attributes count the document (``bluesky_zarr.refused_documents``,
``bluesky_zarr.refused_after_end``) and no longer claim the store complete,
since documents of its run are not in it.

A local store is locked while it is amended (as while it was written), and
amended only if it still holds that run; object storage has no lock (the
object is read, changed and written back). An Icechunk repository
(``external="virtual"``) gets the file beside it and a commit of the new
attributes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import _spec, _zarr
from ._errors import StorageError
from ._storage import FsspecRoot, LocalFiles, Root, StoreLock, _fsync_directory

logger = logging.getLogger(__name__)

#: The file that keeps refused documents (the same name as RunWriter's).
REFUSED_FILE = "refused_documents.jsonl"


def keep_after_end(
    storage: Root, store: Path | str, run_uid: str, line: bytes, virtual: bool
) -> None:
    """Append ``line`` (one refused document, as JSON) to the refused file of
    the finished store of run ``run_uid`` and amend its root record.

    Never raises (the caller is raising the refusal itself): a store that is
    gone, held by another writer, or holds another run now is left alone and
    the failure is logged.
    """
    try:
        if virtual:
            _keep_in_repository(storage, store, run_uid, line)
        elif isinstance(store, Path):
            _keep_local(store, run_uid, line, getattr(storage, "durable", False))
        elif isinstance(storage, FsspecRoot):
            _keep_remote(storage, store, run_uid, line)
        else:
            raise StorageError(f"no way to amend {store}")
    except Exception as err:  # noqa: BLE001 - logged; the refusal is raised anyway
        logger.error(
            "bluesky-zarr: cannot keep a document refused after run %s ended in its "
            "store %s: %r", run_uid, store, err,
        )


def amended(attributes: Mapping[str, Any], run_uid: str) -> dict[str, Any]:
    """Root attributes that count one more document refused after the run ended."""
    start = attributes.get("start")
    if not isinstance(start, Mapping) or start.get("uid") != run_uid:
        stored = start.get("uid") if isinstance(start, Mapping) else None
        raise StorageError(
            f"the store now holds another run ({stored!r}, not {run_uid!r}); left alone"
        )
    info = dict(attributes.get("bluesky_zarr") or {})
    if "reason_at_end" not in info:
        # What the run's end recorded, kept apart from what came after it.
        info["reason_at_end"] = info.get("incomplete_reason")
    late = int(info.get("refused_after_end") or 0) + 1
    info["refused_after_end"] = late
    info["refused_documents"] = int(info.get("refused_documents") or 0) + 1
    info["refused_file"] = REFUSED_FILE
    info["complete"] = False
    reasons = [
        info["reason_at_end"],
        f"{late} document(s) of this run came after it ended and were refused; they "
        f"are kept in {REFUSED_FILE}",
    ]
    info["incomplete_reason"] = "; ".join(r for r in reasons if r)
    return {**attributes, "bluesky_zarr": info}


def _root_text(root: Mapping[str, Any]) -> bytes:
    return _spec.dumps(root, _zarr.json_indent()).encode()


def _keep_local(store: Path, run_uid: str, line: bytes, durable: bool) -> None:
    lock = StoreLock(store)  # StoreLockedError: another writer has taken the store
    try:
        root = json.loads((store / "zarr.json").read_bytes())
        root["attributes"] = amended(root.get("attributes") or {}, run_uid)
        with open(store / REFUSED_FILE, "ab") as file:
            file.write(line)
            if durable:
                file.flush()
                os.fsync(file.fileno())
        if durable:
            _fsync_directory(store)
        LocalFiles(store, durable=durable).write_parts("zarr.json", [_root_text(root)])
    finally:
        lock.release()


def _keep_remote(storage: FsspecRoot, store: str, run_uid: str, line: bytes) -> None:
    key = store.partition("://")[2]
    root = json.loads(storage.fs.cat_file(f"{key}/zarr.json"))
    root["attributes"] = amended(root.get("attributes") or {}, run_uid)
    try:
        kept = storage.fs.cat_file(f"{key}/{REFUSED_FILE}")
    except FileNotFoundError:
        kept = b""
    storage.fs.pipe_file(f"{key}/{REFUSED_FILE}", kept + line)
    storage.fs.pipe_file(f"{key}/zarr.json", _root_text(root))


def _keep_in_repository(storage: Root, store: Path | str, run_uid: str, line: bytes) -> None:
    from ._virtual import BRANCH, _icechunk, repository_storage

    lock = StoreLock(store) if isinstance(store, Path) else None
    try:
        ic = _icechunk()
        repo = ic.Repository.open(
            repository_storage(store, getattr(storage, "storage_options", None))
        )
        session = repo.writable_session(BRANCH)
        root = _zarr.open_group(session.store, mode="r+")
        attributes = amended(dict(root.attrs.asdict()), run_uid)
        if isinstance(store, Path):
            with open(store / REFUSED_FILE, "ab") as file:
                file.write(line)
        else:
            assert isinstance(storage, FsspecRoot)
            key = store.partition("://")[2]
            try:
                kept = storage.fs.cat_file(f"{key}/{REFUSED_FILE}")
            except FileNotFoundError:
                kept = b""
            storage.fs.pipe_file(f"{key}/{REFUSED_FILE}", kept + line)
        root.attrs.put(attributes)
        session.commit("a document refused after the run ended")
    finally:
        if lock is not None:
            lock.release()
