"""The plan floor: documents to geometry, layout and names (pure).

No I/O and no threads: what a run's documents say, checked (``_validate``);
the scan the start document claims (``_scan``) and the geometry the
setpoints prove (``_geometry``); how a stream's arrays are laid out
(``_layout``) with their conventions (``_conventions``) and frame coordinates
(``_frame_coords``); store names (``_names``); values as metadata holds them
(``_text``).
"""

from ._conventions import CONVENTIONS, WRITTEN_ATTRIBUTES, typed
from ._frame_coords import PER_POINT_SUFFIX, FrameCoordinate, check_frame_coords, find_axis
from ._geometry import GEOMETRY_ATTRIBUTE, RELAYOUT, GridMap, StreamGeometry
from ._layout import (
    DEFAULT_SHARD_BYTES,
    RESERVED,
    ArraySpec,
    StreamLayout,
    check_chunking,
    default_chunking,
    fill_value_for,
    plan_stream,
)
from ._names import (
    DEFAULT_NAME_TEMPLATE,
    check_name_template,
    sanitize_name,
    store_name,
    store_path,
)
from ._scan import plan_scan, primary_stream
from ._text import json_safe, json_verbatim, preview
from ._validate import check_bulk_events, check_descriptor, check_document

__all__ = [
    "ArraySpec",
    "CONVENTIONS",
    "DEFAULT_NAME_TEMPLATE",
    "DEFAULT_SHARD_BYTES",
    "FrameCoordinate",
    "GEOMETRY_ATTRIBUTE",
    "GridMap",
    "PER_POINT_SUFFIX",
    "RELAYOUT",
    "RESERVED",
    "StreamGeometry",
    "StreamLayout",
    "WRITTEN_ATTRIBUTES",
    "check_bulk_events",
    "check_chunking",
    "check_descriptor",
    "check_document",
    "check_frame_coords",
    "check_name_template",
    "default_chunking",
    "fill_value_for",
    "find_axis",
    "json_safe",
    "json_verbatim",
    "plan_scan",
    "plan_stream",
    "preview",
    "primary_stream",
    "sanitize_name",
    "store_name",
    "store_path",
    "typed",
]
