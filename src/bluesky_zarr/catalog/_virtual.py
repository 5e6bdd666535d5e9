"""Reading a run written with ``external="virtual"`` (an Icechunk repository).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..storage._icechunk import virtual_store

if TYPE_CHECKING:
    pass



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
