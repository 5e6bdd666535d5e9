"""Values as metadata holds them, and as people read them.

:func:`json_safe` turns documents (numpy arrays and scalars, non-finite
floats, anything else) into what JSON and so Zarr attributes hold;
:func:`json_verbatim` keeps arrays in full, for documents kept as they came;
:func:`preview` shows a value in an error message.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

#: Largest array (elements) that metadata attributes hold in full.
MAX_ATTR_ARRAY = 10_000


def json_safe(value: Any) -> Any:
    """A copy of ``value`` that JSON (and so Zarr attributes) can hold."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        if value.size > MAX_ATTR_ARRAY:
            # Metadata, not data: a frame that a device reports in its
            # configuration would bloat every metadata read of the store.
            return f"<array shape={value.shape} dtype={value.dtype} not stored in metadata>"
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        item = value.item()
        # float128 and the like have no Python equivalent: item() returns them as is.
        return repr(value) if isinstance(item, np.generic) else json_safe(item)
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if value is None or isinstance(value, (str, bool, int)):
        return value
    return repr(value)


def json_verbatim(value: Any) -> Any:
    """JSON for what the standard encoder cannot take: arrays in full."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return repr(value)


def preview(value: Any) -> str:
    """``value`` shown in a message, at most 60 characters long."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
