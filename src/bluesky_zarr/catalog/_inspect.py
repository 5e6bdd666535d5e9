"""``inspect``: what a store holds, for a person or a program."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .._errors import StorageError
from ..storage import _zarr
from ..storage._roots import open_store
from ._ls import check_run_store
from ._text import iso_time, shape_text


def describe_store(
    location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The run, streams and arrays of a store, as JSON-ready data.

    Parameters
    ----------
    location
        The store's directory, or its ``s3://`` URL.
    storage_options
        For object storage: options of ``s3fs.S3FileSystem``.

    Raises
    ------
    NotAStoreError
        ``location`` is missing, a directory of stores (the message points to
        ``bluesky-zarr ls``), a group inside a store, or another Zarr node.
    """
    from ..storage._icechunk import is_repository, virtual_store
    from ..storage._roots import is_url

    if not is_url(location):
        location = os.path.expanduser(location)
    if is_repository(location, storage_options):  # external="virtual": Icechunk (_virtual)
        store = virtual_store(location, storage_options)
    else:
        check_run_store(location, storage_options)
        store = open_store(location, storage_options, read_only=True)
    try:
        root = _zarr.open_group(store)
    except FileNotFoundError as err:
        raise StorageError(f"{location} is not a Zarr V3 store: {err}") from err
    attrs: dict[str, Any] = dict(root.attrs.asdict())
    start: dict[str, Any] = attrs.get("start") or {}
    stop: Any = attrs.get("stop")
    info: dict[str, Any] = attrs.get("bluesky_zarr") or {}
    run = {
        "uid": start.get("uid"),
        "scan_id": start.get("scan_id"),
        "plan_name": start.get("plan_name"),
        "plan_args": start.get("plan_args"),
        "motors": start.get("motors"),
        "detectors": start.get("detectors"),
        "started": iso_time(start.get("time")),
        "stopped": iso_time(stop.get("time")) if isinstance(stop, Mapping) else None,
        "exit_status": attrs.get("exit_status"),
        "reason": stop.get("reason") if isinstance(stop, Mapping) else None,
        "complete": bool(info.get("complete", False)),
        "incomplete_reason": info.get("incomplete_reason"),
        "missing": info.get("missing") or {},
        "refused_documents": int(info.get("refused_documents") or 0),
        "refused_file": (
            f"{str(location).rstrip('/')}/{info['refused_file']}"
            if info.get("refused_file")
            else None
        ),
        "writer_version": info.get("version"),
        "scan_dims": info.get("scan_dims"),
        "scan_shape": info.get("scan_shape"),
    }
    streams = {}
    for name, group in sorted(root.groups()):
        arrays = {}
        written = np.zeros(0, dtype=bool)
        for array_name, array in sorted(group.arrays()):
            arrays[array_name] = _describe_array(array)
            if array_name == "_written":
                written = np.asarray(array[...])
        dims = arrays.get("_written", {}).get("dims") or []
        streams[name] = {
            "dims": dict(zip(dims, np.shape(written))),
            "points": int(np.size(written)),
            "written_points": int(np.count_nonzero(written)),
            "arrays": arrays,
        }
        virtual = group.attrs.get("virtual")
        if isinstance(virtual, Mapping):  # external="virtual": referenced and copied keys
            streams[name]["virtual"] = dict(virtual)
    return {"store": str(location), "run": run, "streams": streams}


def _describe_array(array: Any) -> dict[str, Any]:
    metadata = array.metadata
    dims = list(getattr(metadata, "dimension_names", None) or [])
    compressors = [type(c).__name__ for c in array.compressors]
    result = {
        "dims": [str(d) for d in dims],
        "shape": list(array.shape),
        "dtype": str(array.dtype),
        "chunks": list(array.chunks),
        "shards": list(array.shards) if array.shards is not None else None,
        "compressors": compressors,
        "nbytes": int(array.nbytes),
    }
    units = array.attrs.get("units")
    if units:
        result["units"] = units
    return result



def _size(nbytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes} B"



def format_description(description: Mapping[str, Any]) -> str:
    """A person's view of :func:`describe_store`'s result."""
    run = description["run"]
    lines = [f"store     {description['store']}"]
    lines.append(
        f"run       {run['plan_name'] or '?'}  scan_id {run['scan_id']}  uid {run['uid']}"
    )
    if run["scan_dims"]:
        lines.append(
            f"scan      {shape_text(run['scan_shape']) if run['scan_shape'] else 'growing'}"
            f"  ({', '.join(run['scan_dims'])})"
        )
    lines.append(f"started   {run['started'] or '?'}")
    if run["exit_status"] is not None:
        status = f"{run['exit_status']}" + (f" ({run['reason']})" if run["reason"] else "")
        lines.append(f"stopped   {run['stopped'] or '?'}  exit status: {status}")
    if run["complete"]:
        lines.append("complete  yes")
    else:
        reason = run["incomplete_reason"] or "the run has not stopped (still being written?)"
        lines.append(f"complete  NO: {reason}")
    for stream, counts in run["missing"].items():
        lines.append(
            f"missing   {stream}: {counts['expected'] - counts['written']} of "
            f"{counts['expected']} events not written"
        )
    if run["refused_file"]:
        lines.append(
            f"refused   {run['refused_documents']} document(s) kept in {run['refused_file']}"
        )
    lines.append(f"writer    bluesky-zarr {run['writer_version']}")
    for name, stream in description["streams"].items():
        points, written = stream["points"], stream["written_points"]
        share = f" ({100 * written / points:.0f}%)" if points else ""
        dims = ", ".join(f"{d}: {n}" for d, n in stream["dims"].items())
        lines.append("")
        lines.append(f"{name}  ({dims})  written {written} of {points} points{share}")
        virtual = stream.get("virtual")
        if virtual:
            referenced = ", ".join(virtual.get("referenced") or []) or "none"
            lines.append(f"  in place (detector files): {referenced}")
            for key, why in (virtual.get("copied") or {}).items():
                lines.append(f"  copied {key}: {why}")
        rows = [("array", "dims", "shape", "dtype", "chunks", "shards", "nbytes")]
        for array_name, array in stream["arrays"].items():
            rows.append(
                (
                    array_name,
                    ", ".join(array["dims"]),
                    shape_text(array["shape"]),
                    array["dtype"],
                    shape_text(array["chunks"]),
                    shape_text(array["shards"]),
                    _size(array["nbytes"]),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)
