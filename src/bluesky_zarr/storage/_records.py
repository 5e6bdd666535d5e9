"""What a store records of its run, read without opening it as Zarr.

The root ``zarr.json`` holds the start document and how the run ended; a
run written with ``external="virtual"`` is an Icechunk repository, told
from a plain store by its listing. This module is the one place that reads
those records and tells the two kinds apart.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .._errors import (
    StorageError,
    StoreExistsError,
)

INCOMPLETE = "incomplete"


def parse_attributes(metadata: bytes) -> dict[str, Any]:
    try:
        attributes = json.loads(metadata).get("attributes", {})
    except (ValueError, AttributeError):
        return {}
    return attributes if isinstance(attributes, dict) else {}


def read_root_attributes(path: Path) -> dict[str, Any] | None:
    """The root attributes of the store whose ``zarr.json`` is ``path``, None if
    there is none (an unreadable one gives ``{}``)."""
    try:
        return parse_attributes(path.read_bytes())
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


def exists_error(location: object) -> StoreExistsError:
    """The refusal to make a store where another run's is."""
    return StoreExistsError(
        f"{location} already exists; refusing to overwrite another run "
        f"(pass overwrite=True or choose another name_template)"
    )
