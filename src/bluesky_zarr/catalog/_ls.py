"""``ls``: the runs stored under a directory or URL, one line each.

Each store's root ``zarr.json`` holds the start document, how the run ended
and the consolidated metadata of every array, so a listing reads one small
file per store (plus the ``_written`` mask of the few runs that never
recorded their end, to count their points).
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .._errors import NotAStoreError, StorageError
from ..plan._scan import primary_stream
from ..storage._records import is_repository_listing
from ..storage._roots import REMOTE_SCHEMES, is_url
from ._text import iso_time, shape_text

#: Start document fields shown by default beside the run's own.
DEFAULT_FIELDS = ("sample",)
OPEN_WHY = "no end recorded: still being written, or its writer was killed"
WRITING_WHY = "a writer holds its lock"
UNFINISHED_WHY = "no end recorded and no writer holds it: its writer was killed"


def list_stores(
    location: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    fields: Sequence[str] = DEFAULT_FIELDS,
    problems: list[str] | None = None,
) -> list[dict[str, Any]]:
    """The bluesky-zarr stores under ``location``, newest first.

    Stores may sit in subdirectories (name templates with ``/``); a store is
    not searched inside, nor is any other Zarr store met on the way.

    Parameters
    ----------
    location
        A directory, or an ``s3://bucket/prefix`` URL.
    storage_options
        For object storage: options of ``s3fs.S3FileSystem``.
    fields
        Start document fields to report for each run (missing ones are None).
    problems
        If given, a description of each ``zarr.json`` that could not be read
        is appended to it.

    Returns
    -------
    One JSON-ready mapping per store (see :func:`summarise_root`), sorted by
    start time, newest first.

    Raises
    ------
    StorageError
        ``location`` does not exist or cannot be listed.
    """
    if not is_url(location):
        location = os.path.expanduser(location)
    tree = _tree(location, storage_options)
    candidates = list(tree.find_candidates())
    entries = []
    for store, raw in zip(candidates, tree.read_roots(candidates)):
        if isinstance(raw, BaseException):
            if problems is not None:
                problems.append(f"{store}: cannot read zarr.json: {raw}")
            continue
        try:
            root = json.loads(raw)
        except ValueError as err:
            if problems is not None:
                problems.append(f"{store}: zarr.json is not valid JSON: {err}")
            continue
        if not is_run_root(root):
            continue  # another Zarr store: not ours to list
        try:
            entry = summarise_root(store, root["attributes"], fields)
        except (TypeError, ValueError, AttributeError) as err:
            # A record this version does not understand: the others are listed.
            if problems is not None:
                problems.append(f"{store}: cannot read its run record: {err!r}")
            continue
        entry["name"] = tree.relative(store)
        if entry["state"] == "open":
            entry["state"], entry["why"] = tree.open_state(store)
            if entry["written_points"] is None:
                entry["written_points"] = tree.count_written(store, entry["stream"])
        entries.append(entry)
    entries.sort(key=lambda e: (e["time"] is not None, e["time"] or 0.0), reverse=True)
    return entries


def is_run_root(root: Any) -> bool:
    """Whether a parsed root ``zarr.json`` is a bluesky-zarr run's group."""
    return (
        isinstance(root, Mapping)
        and root.get("zarr_format") == 3
        and root.get("node_type") == "group"
        and isinstance(root.get("attributes"), Mapping)
        and isinstance(root["attributes"].get("bluesky_zarr"), Mapping)
    )


def summarise_root(
    store: str, attrs: Mapping[str, Any], fields: Sequence[str] = DEFAULT_FIELDS
) -> dict[str, Any]:
    """One run's line of a listing, from its root group's attributes.

    ``scan_shape`` is the shape the plan announced (None for a scan that
    grows as events arrive), ``shape`` the stream's shape when the run ended.
    ``state`` is ``complete`` (stopped with success, every point written),
    the stop document's ``exit_status`` (``abort``, ``fail``), ``incomplete``
    (it ended but lacks points or documents) or ``open`` (no end recorded:
    still being written, or its writer was killed); ``why`` says why not
    complete.
    """
    found = attrs.get("start")
    start: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    found = attrs.get("stop")
    stop: Mapping[str, Any] | None = found if isinstance(found, Mapping) else None
    info = attrs["bluesky_zarr"]
    stream = primary_stream(start)
    ended = isinstance(info.get("streams"), Mapping)
    written = None
    scan_shape = info.get("scan_shape")
    shape = scan_shape
    if ended:
        summary = info["streams"].get(stream)
        if isinstance(summary, Mapping):
            written = int(summary.get("written_points", 0))
            shape = summary.get("shape", shape)  # a growing scan's final length
        else:
            written = 0
    planned = _planned_points(start, scan_shape, stop, stream)
    exit_status = attrs.get("exit_status")
    reasons = []
    if exit_status not in (None, "success") and stop and stop.get("reason"):
        reasons.append(str(stop["reason"]))
    if info.get("incomplete_reason"):
        reasons.append(str(info["incomplete_reason"]))
    if not ended:
        state = "open"
        reasons.append(OPEN_WHY)
    elif exit_status not in (None, "success"):
        state = str(exit_status)  # abort, fail: the run itself ended early
    elif info.get("complete"):
        state = "complete"
    else:
        state = "incomplete"
    started = start.get("time")
    return {
        "store": store,
        "name": store,
        "uid": start.get("uid"),
        "scan_id": start.get("scan_id"),
        "plan_name": start.get("plan_name"),
        "time": started if isinstance(started, (int, float)) else None,
        "started": iso_time(started),
        "fields": {name: start.get(name) for name in fields},
        "stream": stream,
        "scan_dims": info.get("scan_dims"),
        "scan_shape": scan_shape,
        "shape": shape,
        "written_points": written,
        "planned_points": planned,
        "state": state,
        "exit_status": exit_status,
        "why": "; ".join(reasons) or None,
    }


def _planned_points(
    start: Mapping[str, Any], scan_shape: Any, stop: Mapping[str, Any] | None, stream: str
) -> int | None:
    """Points the plan announced, else those the stop document counted."""
    num_points = start.get("num_points")
    if isinstance(num_points, int) and not isinstance(num_points, bool):
        return num_points
    if isinstance(scan_shape, list) and all(isinstance(n, int) for n in scan_shape):
        return math.prod(scan_shape)
    num_events = stop.get("num_events") if stop else None
    if isinstance(num_events, Mapping) and isinstance(num_events.get(stream), int):
        return int(num_events[stream])
    return None



def check_run_store(
    location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> None:
    """Raise :class:`NotAStoreError` unless ``location`` is a bluesky-zarr store.

    The message says what it is instead: missing, a directory of stores (and
    how to list them), a group inside a store, another Zarr group or array.
    """
    tree = _tree_of(location, storage_options)
    raw = tree.read_roots([tree.top])[0]
    if isinstance(raw, FileNotFoundError) or (
        isinstance(raw, OSError) and not tree.exists(tree.top)
    ):
        if not tree.exists(tree.top):
            raise NotAStoreError(f"{location} does not exist")
        if tree.exists(f"{tree.top}/.zgroup") or tree.exists(f"{tree.top}/.zarray"):
            raise NotAStoreError(
                f"{location} is a Zarr V2 store; bluesky-zarr stores are Zarr V3"
            )
        stores = sum(1 for _ in _run_stores(tree))
        if stores:
            raise NotAStoreError(
                f"{location} is not a store but a directory holding {stores} bluesky-zarr "
                f"store(s); list them with: bluesky-zarr ls {location}"
            )
        raise NotAStoreError(
            f"{location} is not a Zarr V3 store (it has no zarr.json) and holds no "
            f"bluesky-zarr stores"
        )
    if isinstance(raw, NotADirectoryError):
        raise NotAStoreError(f"{location} is a file, not a store (a store is a directory)")
    if isinstance(raw, BaseException):
        raise StorageError(f"cannot read {location}/zarr.json: {raw}")
    try:
        root = json.loads(raw)
    except ValueError as err:
        raise NotAStoreError(f"{location}/zarr.json is not valid JSON: {err}") from None
    if is_run_root(root):
        return
    if isinstance(root, Mapping) and root.get("node_type") == "array":
        what = "a Zarr array"
    elif isinstance(root, Mapping) and root.get("node_type") == "group":
        what = "a Zarr group"
    else:
        what = "not a Zarr V3 node"
    owner = tree.owning_store(tree.top)
    if owner is not None:
        raise NotAStoreError(
            f"{location} is {what} inside the bluesky-zarr store {owner}, not a store "
            f"itself; inspect the store: bluesky-zarr inspect {owner}"
        )
    raise NotAStoreError(
        f"{location} is {what} but not a bluesky-zarr store (no 'bluesky_zarr' record "
        f"of a run in its attributes)"
    )


def run_attributes(
    store: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The root attributes of a bluesky-zarr store; None if it is not one (or missing)."""
    tree = _tree_of(store, storage_options)
    raw = tree.read_roots([tree.top])[0]
    if isinstance(raw, BaseException):
        return None
    try:
        root = json.loads(raw)
    except ValueError:
        return None
    return dict(root["attributes"]) if is_run_root(root) else None


def count_written_points(
    store: str | os.PathLike[str], stream: str, storage_options: Mapping[str, Any] | None = None
) -> int | None:
    """Points of ``stream`` whose ``_written`` flag is set; None if it has none yet."""
    from ..storage._icechunk import is_repository, metadata_store
    from ..storage._roots import open_store

    if is_repository(store, storage_options):
        try:
            return _count_written(metadata_store(str(store), storage_options), stream)
        except Exception:  # noqa: BLE001 - icechunk's own errors: not counted
            return None
    return _count_written(open_store(store, storage_options, read_only=True), stream)


def _run_stores(tree: _LocalTree | _RemoteTree) -> Iterator[str]:
    """The bluesky-zarr stores below a tree's top, in no particular order."""
    candidates = list(tree.find_candidates())
    for store, raw in zip(candidates, tree.read_roots(candidates)):
        if isinstance(raw, BaseException):
            continue
        try:
            if is_run_root(json.loads(raw)):
                yield store
        except ValueError:
            continue


# ------------------------------------------------------------------ storage
class _LocalTree:
    """Stores below a local directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.top = str(root)

    def check(self) -> None:
        """Raise :class:`StorageError` unless the root is a directory."""
        if not self.root.is_dir():
            what = "does not exist" if not self.root.exists() else "is not a directory"
            raise StorageError(f"{self.root} {what}")

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def owning_store(self, node: str) -> str | None:
        """The bluesky-zarr store that ``node`` lies inside, if any."""
        for parent in Path(node).resolve().parents:
            try:
                root = json.loads(Path(parent, "zarr.json").read_bytes())
            except (OSError, ValueError):
                return None  # above the top of the Zarr hierarchy
            if is_run_root(root):
                return str(parent)
        return None

    def find_candidates(self) -> Iterator[str]:
        seen: set[tuple[int, int]] = set()
        pending = [self.root]
        while pending:
            directory = pending.pop()
            try:
                info = directory.stat()
                if (info.st_dev, info.st_ino) in seen:
                    continue  # a symbolic link back up the tree
                seen.add((info.st_dev, info.st_ino))
                with os.scandir(directory) as scan:
                    entries = list(scan)
            except OSError as err:
                if directory == self.root:
                    raise StorageError(f"cannot list {directory}: {err}") from err
                continue
            names = {e.name for e in entries}
            if "zarr.json" in names or is_repository_listing(
                {e.name for e in entries if _is_dir(e)},
                names,
                functools.partial(_has_branch, os.listdir, directory / "refs"),
            ):
                # A Zarr node, or an Icechunk repository (a virtual run's
                # store): never searched inside.
                yield str(directory)
                continue
            pending.extend(
                Path(e.path)
                for e in sorted(entries, key=lambda e: e.name, reverse=True)
                if not e.name.startswith(".") and _is_dir(e)
            )

    def read_roots(self, stores: Sequence[str]) -> list[bytes | BaseException]:
        result: list[bytes | BaseException] = []
        for store in stores:
            try:
                result.append(Path(store, "zarr.json").read_bytes())
            except FileNotFoundError as err:
                result.append(_repository_root(store, None) or err)
            except OSError as err:
                result.append(err)
        return result

    def relative(self, store: str) -> str:
        name = os.path.relpath(store, self.root)
        return str(self.root) if name == "." else name

    def open_state(self, store: str) -> tuple[str, str]:
        """``writing`` while a writer holds the store's lock, else ``unfinished``."""
        path = Path(store)
        if _is_locked(path.with_name(f".{path.name}.lock")):
            return "writing", WRITING_WHY
        return "unfinished", UNFINISHED_WHY

    def count_written(self, store: str, stream: str) -> int | None:
        return count_written_points(store, stream)


class _RemoteTree:
    """Stores below an ``s3://`` URL, through fsspec."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None) -> None:
        scheme, _, rest = url.partition("://")
        if scheme not in REMOTE_SCHEMES:
            raise StorageError(f"unsupported storage URL {url!r}")
        try:
            import s3fs
        except ImportError:
            from .._errors import MissingDependencyError

            raise MissingDependencyError(
                f"listing {scheme}:// needs s3fs: pip install 'bluesky-zarr[s3]'"
            ) from None
        self.scheme = scheme
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        # Not from fsspec's cache: one made from other credentials (or the
        # environment of another moment) would be handed back for these options.
        self.fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)
        self.root = rest.strip("/")
        self.top = self.url

    def check(self) -> None:
        try:
            found = self.fs.isdir(self.root)
        except OSError as err:
            raise StorageError(f"cannot list {self.url}: {err}") from err
        if not found:
            raise StorageError(f"{self.url} does not exist")

    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(path.partition("://")[2]))

    def owning_store(self, node: str) -> str | None:
        key = node.partition("://")[2].rstrip("/")
        while "/" in key:
            key = key.rpartition("/")[0]
            try:
                root = json.loads(self.fs.cat_file(f"{key}/zarr.json"))
            except (OSError, ValueError):
                return None
            if is_run_root(root):
                return f"{self.scheme}://{key}"
        return None

    def find_candidates(self) -> Iterator[str]:
        # Level by level: the zarr.json of every directory of a level is asked
        # for at once (one concurrent batch, kept for read_roots); only the
        # directories without one are listed, to go a level deeper.
        self._roots: dict[str, bytes] = {}
        level = [self.root]
        while level:
            keys = [f"{directory}/zarr.json" for directory in level]
            try:
                found = self.fs.cat(keys, on_error="return")
            except OSError as err:
                raise StorageError(f"cannot read below {self.url}: {err}") from err
            deeper: list[str] = []
            for directory, key in zip(level, keys):
                raw = found.get(key) if isinstance(found, dict) else found
                if isinstance(raw, bytes):
                    store = f"{self.scheme}://{directory}"
                    self._roots[store] = raw
                    yield store  # a Zarr node: never searched inside
                    continue
                try:
                    entries = self.fs.ls(directory, detail=True, refresh=True)
                except OSError as err:
                    if directory == self.root:
                        raise StorageError(f"cannot list {self.url}: {err}") from err
                    continue
                subdirectories = [
                    e["name"].rstrip("/") for e in entries if e["type"] == "directory"
                ]
                files = {
                    e["name"].rstrip("/").rpartition("/")[2]
                    for e in entries
                    if e["type"] != "directory"
                }
                names = {d.rpartition("/")[2] for d in subdirectories}
                if is_repository_listing(
                    names, files, functools.partial(_has_branch, self.fs.ls, f"{directory}/refs")
                ):
                    yield f"{self.scheme}://{directory}"  # an Icechunk repository
                    continue
                deeper.extend(
                    d for d in subdirectories if not d.rpartition("/")[2].startswith(".")
                )
            level = deeper

    def read_roots(self, stores: Sequence[str]) -> list[bytes | BaseException]:
        known = getattr(self, "_roots", {})
        keys = {s: f"{s.partition('://')[2]}/zarr.json" for s in stores if s not in known}
        found: Any = {}
        if keys:
            # One concurrent batch of requests, not one round trip after another.
            found = self.fs.cat(list(keys.values()), on_error="return")
        result: list[bytes | BaseException] = []
        for store in stores:
            raw = known[store] if store in known else found.get(keys[store])
            if not isinstance(raw, bytes):
                missing = raw if isinstance(raw, BaseException) else None
                raw = _repository_root(store, self.storage_options) or (
                    missing or FileNotFoundError(keys[store])
                )
            result.append(raw)
        return result

    def relative(self, store: str) -> str:
        name = store[len(self.url) :].lstrip("/")
        return name or store

    def open_state(self, store: str) -> tuple[str, str]:
        return "open", OPEN_WHY  # object storage has no lock to tell writing from killed

    def count_written(self, store: str, stream: str) -> int | None:
        return count_written_points(store, stream, self.storage_options)


def _tree_of(
    location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None
) -> _LocalTree | _RemoteTree:
    if is_url(location):
        return _RemoteTree(str(location), storage_options)
    return _LocalTree(Path(location))


def _tree(
    location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None
) -> _LocalTree | _RemoteTree:
    """The tree below an existing directory or URL, to list."""
    tree = _tree_of(location, storage_options)
    tree.check()
    return tree


def _has_branch(list_directory: Any, refs: Any) -> bool:
    """Whether ``refs`` (listed with ``list_directory``) holds an Icechunk
    branch: a repository's ``refs``, not a directory of runs that a name
    template happened to call ``refs``."""
    names = [str(n).rstrip("/").rpartition("/")[2] for n in list_directory(refs)]
    return any(name.startswith("branch.") for name in names)


def _repository_root(store: str, storage_options: Mapping[str, Any] | None) -> bytes | None:
    """The root ``zarr.json`` of an Icechunk repository's last commit (a run
    written with ``external="virtual"``); None if ``store`` is not one."""
    from ..storage._icechunk import is_repository, read_root

    if not is_repository(store, storage_options):
        return None
    try:
        return read_root(store, storage_options)
    except Exception:  # noqa: BLE001 - icechunk's own errors: listed as unreadable
        return None


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _is_locked(lock: Path) -> bool:
    """Whether a live process holds ``flock`` on ``lock`` (without taking it)."""
    try:
        info = lock.stat()
    except OSError:
        return False  # writers unlink their lock when they finish
    held = _flock_holders()
    if held is not None:
        # By inode alone: overlayfs and btrfs report other device numbers in
        # /proc/locks than stat() does (another file with the same inode on
        # another device, flock-ed, is the price).
        return info.st_ino in held
    # No /proc/locks: ask for a shared lock, at once, and give it back.
    import fcntl

    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


def _flock_holders() -> set[int] | None:
    """The inode of every file ``flock``-ed, from Linux's /proc/locks."""
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    held = set()
    for line in text.splitlines():
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:02:131090 0 EOF" (blocked waiters: "->")
        if "FLOCK" not in parts:
            continue
        for part in parts:
            pieces = part.split(":")
            if len(pieces) == 3 and all(pieces):
                try:
                    held.add(int(pieces[2]))
                except ValueError:
                    pass
    return held


def _count_written(store: Any, stream: str) -> int | None:
    """Points of ``stream`` whose ``_written`` flag is set; None if unreadable."""
    import numpy as np

    from ..storage import _zarr

    try:
        mask = _zarr.open_array(store, f"{stream}/_written")
        return int(np.count_nonzero(mask[...]))
    except (OSError, KeyError, ValueError):
        return None  # no descriptor yet, or the array is being replaced


# ----------------------------------------------------------------- printing

def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return _printable(value)
    return json.dumps(value)


def _printable(text: str) -> str:
    """``text`` on one line, its control characters escaped as in JSON (a
    newline or a terminal escape from metadata would break the table)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else json.dumps(c)[1:-1] for c in text)


def format_listing(entries: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> str:
    """A person's view of :func:`list_stores`' result: a table, newest first."""
    header = ("STORE", "SCAN_ID", "PLAN", "STARTED", *(f.upper() for f in fields))
    header += ("SHAPE", "POINTS", "STATUS")
    rows = [header]
    for e in entries:
        written = "?" if e["written_points"] is None else str(e["written_points"])
        planned = "?" if e["planned_points"] is None else str(e["planned_points"])
        status = _printable(e["state"] + (f": {e['why']}" if e["why"] else ""))
        rows.append(
            (
                _printable(e["name"]),
                _value(e["scan_id"]),
                _value(e["plan_name"]),
                (e["started"] or "-").replace("+00:00", "Z"),
                *(_value(e["fields"].get(f)) for f in fields),
                shape_text(e["shape"], separator="x", missing="growing"),
                f"{written}/{planned}",
                status,
            )
        )
    widths = [max(_width(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join([*(c + " " * (w - _width(c)) for c, w in zip(row, widths)), row[-1]]).rstrip()
        for row in rows
    )


def _width(text: str) -> int:
    """Columns ``text`` takes in a terminal: two for East Asian wide letters,
    none for combining marks."""
    import unicodedata

    if text.isascii():
        return len(text)
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
        for c in text
    )
