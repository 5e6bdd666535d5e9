"""Which data keys documents give through files, and how their frames are laid out.

A data key whose ``external`` is ``"STREAM:"`` gets its values from
stream_datum documents (ophyd-async); any other ``external`` marks datum ids
in events (ophyd v1). ophyd-async declares a stream key's shape as
``[frames per point, *frame shape]``: a leading size 1 is dropped, more
frames a point keep a ``frame`` dimension.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: The ``external`` prefix of data keys whose frames stream_datum documents give.
STREAM_EXTERNAL = "STREAM:"

#: The name of the kept frames-per-point dimension.
FRAME_DIM = "frame"


def is_stream_key(data_key: Mapping[str, Any]) -> bool:
    """Whether stream_datum documents (not events) give this data key's values."""
    return str(data_key.get("external") or "").startswith(STREAM_EXTERNAL)


def is_datum_key(data_key: Mapping[str, Any]) -> bool:
    """Whether events carry datum ids for this data key."""
    return bool(data_key.get("external")) and not is_stream_key(data_key)


@dataclass
class StreamKey:
    """How one stream-external data key's declared shape maps to stored frames."""

    declared: tuple[int | None, ...] | None
    squeezed: bool


def layout_data_key(key: str, data_key: Mapping[str, Any]) -> tuple[dict[str, Any], StreamKey]:
    """The data key as the array is laid out: the frames-per-point dim settled."""
    shape = data_key.get("shape")
    declared = None if shape is None else tuple(shape)
    result = dict(data_key)
    if not declared:
        return result, StreamKey(declared, False)
    dims = data_key.get("dims")
    if declared[0] == 1:
        result["shape"] = list(declared[1:])
        if dims and len(dims) == len(declared):
            result["dims"] = list(dims[1:])
        return result, StreamKey(declared, True)
    if not (dims and len(dims) == len(declared)):
        rest = len(declared) - 1
        result["dims"] = [FRAME_DIM] + (
            ["y", "x"] if rest == 2 else [f"{key}_dim_{n}" for n in range(rest)]
        )
    return result, StreamKey(declared, False)
