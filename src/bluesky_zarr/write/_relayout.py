"""Moving a stream's points, already on disk, out of a grid that proved wrong.

When a point contradicts the grid a stream was laid out on
(:mod:`._geometry`), the points placed so far must move to the layout the
stream falls back to. The run writes them first; the stream's group is then
moved aside (:func:`move_node`: one rename on a local store), made anew, and
the points are read back from the group moved aside (:func:`placed_points`)
and placed again through the chunk buffer like any point; finally the group
moved aside is deleted (:func:`delete_node`). This is the rare path: it reads
every point placed so far once.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..storage import _zarr

if TYPE_CHECKING:
    from ..plan._geometry import GridMap
    from ..plan._layout import ArraySpec
    from ._stream import StreamWriter

#: Points read back and placed again at a time.
BATCH = 64


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


def placed_points(
    store: Any, aside: str, old: StreamWriter, grid: GridMap
) -> Iterator[tuple[ArraySpec, np.ndarray, list[Any]]]:
    """The points of each array of ``old`` that are on disk, read back from
    the group moved to ``aside``, in order of seq_num, in batches: (the
    array's spec, seq_nums, values)."""
    # A local store is read through zarr-python's own (the writer's takes writes).
    reader = _zarr.local_store(store.files.root) if _zarr.is_local_files(store) else store
    for name, mask in old.on_disk.items():
        cells = np.nonzero(mask)
        if not cells[0].size:
            continue
        spec = old.layout.arrays[name]
        seq_nums = grid.seq_at(cells)
        order = np.argsort(seq_nums, kind="stable")
        array = _zarr.open_array(reader, f"{aside}/{name}", mode="r")
        for start in range(0, order.size, BATCH):
            part = order[start : start + BATCH]
            values = [array[tuple(int(axis[i]) for axis in cells)] for i in part]
            yield spec, seq_nums[part], values
