"""Moving a stream's points, already on disk, out of a grid that proved wrong.

When a point contradicts the grid a stream was laid out on
(:mod:`._geometry`), the points placed so far must move to the layout the
stream falls back to. The run writes them first; the stream's group is then
moved aside (``storage.move_node``: one rename on a local store), made anew,
and the points are read back from the group moved aside
(:func:`placed_points`) and placed again through the chunk buffer like any
point; finally the group moved aside is deleted (``storage.delete_node``).
This is the rare path: it reads every point placed so far once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from ..storage import open_array, reader_of

if TYPE_CHECKING:
    from ..plan import ArraySpec, GridMap
    from ._stream import StreamWriter

#: Points read back and placed again at a time.
BATCH = 64


def placed_points(
    store: Any, aside: str, old: StreamWriter, grid: GridMap
) -> Iterator[tuple[ArraySpec, np.ndarray, list[Any]]]:
    """The points of each array of ``old`` that are on disk, read back from
    the group moved to ``aside``, in order of seq_num, in batches: (the
    array's spec, seq_nums, values)."""
    # A local store is read through zarr-python's own (the writer's takes writes).
    reader = reader_of(store)
    for name, mask in old.on_disk.items():
        cells = np.nonzero(mask)
        if not cells[0].size:
            continue
        spec = old.layout.arrays[name]
        seq_nums = grid.seq_at(cells)
        order = np.argsort(seq_nums, kind="stable")
        array = open_array(reader, f"{aside}/{name}")
        for start in range(0, order.size, BATCH):
            part = order[start : start + BATCH]
            values = [array[tuple(int(axis[i]) for axis in cells)] for i in part]
            yield spec, seq_nums[part], values
