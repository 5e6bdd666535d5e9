"""How the reading tools print what stores record (``ls``, ``inspect``)."""

from __future__ import annotations

import datetime
from typing import Any


def iso_time(timestamp: Any) -> str | None:
    """A start or stop time (seconds since the epoch) as an ISO 8601 date, or
    ``None`` when it names no calendar date: not a number, or a time written
    in milliseconds or nanoseconds by mistake (past the year 9999), or NaN."""
    if not isinstance(timestamp, (int, float)) or isinstance(timestamp, bool):
        return None
    try:
        moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC)
    except (OverflowError, ValueError, OSError):
        return None
    return moment.isoformat(timespec="seconds")


def shape_text(shape: Any, *, separator: str = " x ", missing: str = "-") -> str:
    """A shape for a table: its sizes joined by ``separator`` (``missing``
    for no shape, ``()`` for a scalar's)."""
    if shape is None:
        return missing
    if not isinstance(shape, (list, tuple)):
        return str(shape)
    return separator.join(str(n) for n in shape) or "()"
