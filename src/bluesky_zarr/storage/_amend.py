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

from .._errors import StorageError
from . import _spec, _zarr
from ._files import LocalFiles, fsync_directory
from ._lock import StoreLock

logger = logging.getLogger(__name__)

#: The file that keeps refused documents (the same name as RunWriter's).
REFUSED_FILE = "refused_documents.jsonl"


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


def keep_local(store: Path, run_uid: str, line: bytes, durable: bool) -> None:
    """Keep ``line`` in the finished local store of run ``run_uid`` (under its
    lock, only if it still holds that run) and amend its root record."""
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
            fsync_directory(store)
        LocalFiles(store, durable=durable).write_parts("zarr.json", [_root_text(root)])
    finally:
        lock.release()


def keep_remote(fs: Any, store: str, run_uid: str, line: bytes) -> None:
    """Keep ``line`` in the finished store of run ``run_uid`` on object
    storage (file system ``fs``: read, changed and written back; object
    storage has no lock) and amend its root record."""
    key = store.partition("://")[2]
    root = json.loads(fs.cat_file(f"{key}/zarr.json"))
    root["attributes"] = amended(root.get("attributes") or {}, run_uid)
    _append_object(fs, f"{key}/{REFUSED_FILE}", line)
    fs.pipe_file(f"{key}/zarr.json", _root_text(root))


def _append_object(fs: Any, key: str, line: bytes) -> None:
    try:
        kept = fs.cat_file(key)
    except FileNotFoundError:
        kept = b""
    fs.pipe_file(key, kept + line)


def keep_in_repository(
    repository: Any, store: Path | str, fs: Any, run_uid: str, line: bytes
) -> None:
    """Keep ``line`` beside the finished Icechunk repository of run
    ``run_uid`` (``repository``: its Icechunk storage; ``fs``: the object
    storage it is on, or ``None`` for a local one) and commit its amended root
    record."""
    from ._icechunk import BRANCH, _icechunk

    lock = StoreLock(store) if isinstance(store, Path) else None
    try:
        ic = _icechunk()
        repo = ic.Repository.open(repository)
        session = repo.writable_session(BRANCH)
        root = _zarr.open_group(session.store, mode="r+")
        attributes = amended(dict(root.attrs.asdict()), run_uid)
        if isinstance(store, Path):
            with open(store / REFUSED_FILE, "ab") as file:
                file.write(line)
        else:
            _append_object(fs, f"{store.partition('://')[2]}/{REFUSED_FILE}", line)
        root.attrs.put(attributes)
        session.commit("a document refused after the run ended")
    finally:
        if lock is not None:
            lock.release()
