"""Nodes of a store moved, deleted and read back as a whole.

For the rare paths that move what a run has already written (a stream whose
grid proved wrong is laid out anew): one rename on a local store, keys copied
one by one elsewhere.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from . import _zarr


def move_node(store: Any, path: str, aside: str) -> None:
    """Move the node at ``path`` (with everything below it) to ``aside``."""
    if _zarr.is_local_files(store):
        root = Path(store.files.root)
        os.replace(root / path, root / aside)
        return

    async def keys() -> list[str]:
        return [key async for key in store.list_prefix(f"{path}/")]

    for key in _zarr.run(keys()):
        value = _zarr.get(store, key)
        if value is not None:
            _zarr.put(store, aside + key[len(path) :], value)
    _zarr.delete_dir(store, path)


def delete_node(store: Any, path: str) -> None:
    """Delete the node at ``path`` and everything below it."""
    if _zarr.is_local_files(store):
        shutil.rmtree(Path(store.files.root) / path)
    else:
        _zarr.delete_dir(store, path)


def reader_of(store: Any) -> Any:
    """A store to read ``store``'s arrays through (a local store is read
    through zarr-python's own: the writer's takes writes)."""
    return _zarr.local_store(store.files.root) if _zarr.is_local_files(store) else store
