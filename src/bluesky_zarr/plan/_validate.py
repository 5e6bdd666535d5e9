"""Checks of what documents declare and send, before any of it touches a store.

Every check raises a :class:`~bluesky_zarr.DocumentError` subclass naming
what was expected and what came, so a bad document is refused whole and the
points written before it stay as they are.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._errors import DataShapeError, DataTypeError, DocumentError, ScanIndexError
from ..storage import _zarr
from ._text import preview

#: Most points a scan (or a stream that grows) may have. The writer keeps a
#: mask of one byte per point and array in memory and writes each motor's
#: setpoints in full, so a shape beyond this is refused at the start document
#: instead of exhausting memory. It is more than a day of events at 1 kHz.
MAX_SCAN_POINTS = 2**27

#: Most elements one frame (the value of one data key at one point) may have:
#: a frame is one chunk, and is held whole in memory while it is written.
MAX_FRAME_ELEMENTS = 2**30



def _is_integer(value: Any) -> bool:
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(
        value, (bool, np.bool_)
    )


def checked_shape(what: str, value: Any, *, limit: int, total: str) -> tuple[int, ...]:
    """A shape as integers, refused unless each size is a whole number >= 0
    and their product is at most ``limit``.

    ``what`` names the shape in messages (``"start['shape']"``), ``total``
    what the product counts (``"scan points"``). Nothing is allocated.
    """
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (Sequence, np.ndarray)):
        raise DocumentError(f"{what} must be a list of integers, got {preview(value)}")
    result = []
    for item in value:
        if _is_integer(item):
            size = int(item)
        elif isinstance(item, (float, np.floating)):
            # 10.0 from a JSON round trip is 10; 2.5 or NaN is no size.
            if not (math.isfinite(item) and float(item).is_integer()):
                raise DocumentError(
                    f"{what} must hold whole numbers, got {item!r} in {preview(value)}"
                )
            size = int(item)
        else:
            raise DocumentError(f"{what} must be a list of integers, got {preview(value)}")
        if size < 0:
            raise DocumentError(f"{what} must not hold negative sizes, got {preview(value)}")
        result.append(size)
    count = math.prod(result)
    if count > limit:
        raise DocumentError(
            f"{what} {preview(value)} makes {count} {total}, more than the "
            f"{limit} (2**{int(math.log2(limit))}) this writer accepts"
        )
    return tuple(result)


def _column(what: str, value: Any, n: int | None) -> int:
    """Check that ``value`` is a list of values (one per event); its length."""
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            raise DocumentError(f"event_page {what} must be a list, one per event, got a scalar")
        length = len(value)
    elif isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise DocumentError(
            f"event_page {what} must be a list, one value per event, got {preview(value)}"
        )
    else:
        length = len(value)
    if n is not None and length != n:
        raise DocumentError(
            f"event_page {what} has {length} values but the page has {n} events "
            f"(one per seq_num)"
        )
    return length


def _check_value(key: str, value: Any) -> None:
    """A nested list sent as a frame must be a regular array (not ragged)."""
    if isinstance(value, (list, tuple)):
        try:
            np.asarray(value)
        except (ValueError, TypeError) as err:
            raise DataShapeError(
                f"data key {key!r}: a frame must be a regular array (lists of equal "
                f"lengths), got {preview(value)}: {err}"
            ) from None


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def check_start(doc: Mapping[str, Any]) -> None:
    """Refuse a start document whose scan fields (those the scan's shape,
    snaking and dimension names come from) are of the wrong kind."""
    hints = doc.get("hints")
    dimensions = hints.get("dimensions") if isinstance(hints, Mapping) else None
    if dimensions is not None:
        if not _is_list(dimensions):
            raise DocumentError(
                f"start['hints']['dimensions'] must be a list of (fields, stream) pairs, "
                f"got {preview(dimensions)}"
            )
        for entry in dimensions:
            if not (
                _is_list(entry)
                and len(entry) == 2
                and _is_list(entry[0])
                and all(isinstance(f, str) for f in entry[0])
                and isinstance(entry[1], str)
            ):
                raise DocumentError(
                    "start['hints']['dimensions'] entries must be (fields, stream) pairs: "
                    f"a list of field names and a stream name, got {preview(entry)}"
                )
    motors = doc.get("motors")
    if motors is not None and not (_is_list(motors) and all(isinstance(m, str) for m in motors)):
        raise DocumentError(f"start['motors'] must be a list of names, got {preview(motors)}")
    snaking = doc.get("snaking")
    if snaking is not None and not (
        _is_list(snaking) and all(isinstance(s, (bool, np.bool_, int)) for s in snaking)
    ):
        raise DocumentError(
            f"start['snaking'] must be a list of booleans, got {preview(snaking)}"
        )
    extents = doc.get("extents")
    if extents is not None and not _is_list(extents):
        raise DocumentError(
            f"start['extents'] must be a list of (start, stop) pairs, got {preview(extents)}"
        )
    pattern = doc.get("plan_pattern")
    if pattern is not None and not isinstance(pattern, str):
        raise DocumentError(f"start['plan_pattern'] must be a name, got {preview(pattern)}")


#: The values of a data key's JSON ``dtype``.
JSON_DTYPES = ("number", "integer", "boolean", "string", "array")


def check_descriptor(doc: Mapping[str, Any]) -> None:
    """Refuse a descriptor whose stream name or data keys are of the wrong kind.

    The stream name becomes a Zarr group: a non-empty name without ``/``,
    not ``.``, ``..`` or starting with ``__`` (reserved by Zarr V3).
    """
    name = doc.get("name", "primary")
    if (
        not isinstance(name, str)
        or not name
        or "/" in name
        or name.strip(".") == ""
        or name.startswith("__")
    ):
        raise DocumentError(
            f"descriptor 'name' must name a stream (a non-empty name without '/', not "
            f"'.', '..' or '__...'), got {preview(name)}"
        )
    data_keys = doc.get("data_keys")
    if not isinstance(data_keys, Mapping):
        raise DocumentError(
            f"descriptor of stream {name!r} must have a data_keys mapping, got "
            f"{preview(data_keys)}"
        )
    for key, data_key in data_keys.items():
        if not isinstance(key, str):
            raise DocumentError(f"data key names must be strings, got {preview(key)}")
        if not isinstance(data_key, Mapping):
            raise DocumentError(
                f"data key {key!r} of stream {name!r} must be a mapping, got "
                f"{preview(data_key)}"
            )
        declared = data_key.get("dtype_numpy")
        if declared is not None and not isinstance(declared, str) and not (
            _is_list(declared) and all(_is_list(f) for f in declared)
        ):
            raise DocumentError(
                f"data key {key!r}: dtype_numpy must be a numpy dtype string ('<u2') or a "
                f"list of (name, dtype) pairs, got {preview(declared)}"
            )
        kind = data_key.get("dtype")
        # The JSON dtype decides only where no dtype_numpy is given.
        if not declared and not (isinstance(kind, str) and kind in JSON_DTYPES):
            raise DocumentError(
                f"data key {key!r}: dtype must be one of {', '.join(JSON_DTYPES)}, got "
                f"{preview(kind)}"
            )
        dims = data_key.get("dims")
        if dims is not None and not (_is_list(dims) and all(isinstance(d, str) for d in dims)):
            raise DocumentError(
                f"data key {key!r}: dims must be a list of names, got {preview(dims)}"
            )
        external = data_key.get("external")
        if external is not None and not isinstance(external, str):
            raise DocumentError(
                f"data key {key!r}: external must be a string ('FILESTORE:', 'STREAM:'), "
                f"got {preview(external)}"
            )



def check_dtype(key: str, dtype: np.dtype, fill_value: Any) -> None:
    """Refuse a dtype that zarr-python cannot store as a Zarr V3 array with
    ``fill_value`` (e.g. ``float128``, which no Zarr data type holds).

    Text (numpy kinds ``O`` and ``U``) is stored as Zarr strings whatever its
    numpy dtype, so it is always accepted.
    """
    if dtype.kind in "OU":
        return
    try:
        _zarr.check_data_type(dtype, fill_value)
    except (TypeError, ValueError) as err:
        raise DataTypeError(
            f"data key {key!r}: dtype_numpy {dtype.str!r} ({dtype}) cannot be stored "
            f"in a Zarr V3 array: {err}"
        ) from None


#: The ids each kind of document must carry, as strings: the writer keys its
#: runs, streams and resources by them (``False``: the id may be absent).
_IDS: dict[str, tuple[tuple[str, bool], ...]] = {
    "start": (("uid", True),),
    "descriptor": (("uid", True), ("run_start", True)),
    "event": (("descriptor", True),),
    "event_page": (("descriptor", True),),
    "stop": (("run_start", True),),
    "resource": (("uid", True), ("run_start", False)),
    "datum": (("resource", True),),
    "datum_page": (("resource", True),),
    "stream_resource": (("uid", True), ("run_start", True)),
    "stream_datum": (("stream_resource", True), ("descriptor", True)),
}


def check_document(name: str, doc: Mapping[str, Any]) -> None:
    """Refuse a document whose ids are missing or not strings; for a
    descriptor, an event or an event page, also what :func:`check_descriptor`,
    :func:`check_event` or :func:`check_event_page` refuses (before any part
    of the writer reads them)."""
    for field, required in _IDS.get(name, ()):
        if field not in doc:
            if required:
                raise DocumentError(f"{name} document lacks the field {field!r}")
            continue
        if not isinstance(doc[field], str):
            raise DocumentError(
                f"{name} document: {field!r} must be a string (a uid), got "
                f"{preview(doc[field])}"
            )
    if name == "descriptor":
        check_descriptor(doc)
    elif name == "event":
        check_event(doc)
    elif name == "event_page":
        check_event_page(doc)


def check_bulk_events(doc: Mapping[str, Any]) -> None:
    """Refuse a legacy ``bulk_events`` document that is not a mapping of
    descriptor uids to lists of events, or holds a bad event."""
    for descriptor, events in doc.items():
        if not _is_list(events):
            raise DocumentError(
                f"bulk_events must map each descriptor uid to a list of events, got "
                f"{preview(events)} for {preview(descriptor)}"
            )
        for event in events:
            if not isinstance(event, Mapping):
                raise DocumentError(f"bulk_events holds a non-event {preview(event)}")
            check_document("event", event)


def check_event(doc: Mapping[str, Any]) -> None:
    """Refuse an event whose fields are missing or of the wrong kind, or
    whose frames are ragged (what :func:`check_event_page` refuses of a page)."""
    for name, kind, label in (
        ("uid", str, "a string"),
        ("data", Mapping, "a mapping of data keys to values"),
        ("timestamps", Mapping, "a mapping of data keys to times"),
    ):
        if name not in doc:
            raise DocumentError(f"event lacks the field {name!r} ({label})")
        if not isinstance(doc[name], kind):
            raise DocumentError(f"event {name!r} must be {label}, got {preview(doc[name])}")
    for name in ("seq_num", "time"):
        if name not in doc:
            raise DocumentError(f"event lacks the field {name!r}")
    if not _is_integer(doc["seq_num"]):
        raise DocumentError(f"event 'seq_num' must be an integer, got {preview(doc['seq_num'])}")
    if doc["seq_num"] > MAX_SCAN_POINTS:
        raise ScanIndexError(
            f"seq_num {doc['seq_num']} is beyond the {MAX_SCAN_POINTS} points a scan may have "
            f"in this writer"
        )
    if isinstance(doc["time"], bool) or not isinstance(doc["time"], (numbers.Real, np.number)):
        raise DocumentError(f"event 'time' must be a number, got {preview(doc['time'])}")
    if not isinstance(doc.get("filled", {}), Mapping):
        raise DocumentError(
            f"event 'filled' must be a mapping of data keys to booleans, got "
            f"{preview(doc['filled'])}"
        )
    for key, value in doc["data"].items():
        _check_value(str(key), value)


def check_event_page(doc: Mapping[str, Any]) -> int:
    """Refuse an event page whose columns are missing, of the wrong kind or of
    unequal lengths, or whose frames are ragged; the number of its events."""
    if "seq_num" not in doc:
        raise DocumentError("event_page lacks the field 'seq_num'")
    seq_nums = doc["seq_num"]
    n = _column("'seq_num'", seq_nums, None)
    if isinstance(seq_nums, np.ndarray) and seq_nums.dtype.kind in "iu" and seq_nums.ndim == 1:
        largest = int(seq_nums.max()) if n else 0
    else:
        for seq_num in seq_nums:
            if not _is_integer(seq_num):
                raise DocumentError(
                    f"event_page 'seq_num' must hold integers, got {preview(seq_num)}"
                )
        largest = max(seq_nums, default=0)
    if largest > MAX_SCAN_POINTS:
        raise ScanIndexError(
            f"seq_num {largest} is beyond the {MAX_SCAN_POINTS} points a scan may have "
            f"in this writer"
        )
    for name in ("uid", "time"):
        if name not in doc:
            raise DocumentError(f"event_page lacks the field {name!r}")
        _column(repr(name), doc[name], n)
    times = doc["time"]
    if not (isinstance(times, np.ndarray) and times.dtype.kind in "iuf" and times.ndim == 1):
        for time in times:
            if isinstance(time, bool) or not isinstance(time, (numbers.Real, np.number)):
                raise DocumentError(
                    f"event_page 'time' must hold numbers, got {preview(time)}"
                )
    for name in ("data", "timestamps", "filled"):
        if name not in doc:
            if name == "filled":
                continue
            raise DocumentError(f"event_page lacks the field {name!r}")
        columns = doc[name]
        if not isinstance(columns, Mapping):
            raise DocumentError(
                f"event_page {name!r} must be a mapping of data keys to lists, got "
                f"{preview(columns)}"
            )
        for key, values in columns.items():
            _column(f"{name}[{key!r}]", values, n)
    for key, values in doc["data"].items():
        if not isinstance(values, np.ndarray):
            for value in values:
                _check_value(str(key), value)
    return n
