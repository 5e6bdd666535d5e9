"""The CF conventions (1.11) a store follows, as attributes.

Readers that know CF (xarray's decoding, cf-xarray, netCDF tools) then
understand a run without help: ``time`` decodes to dates, each data
variable names its ``_written`` mask as an ancillary variable, the mask
says what its values mean, and the limits and choices a device reports are
the variable's valid range and flag meanings. Readers that ignore CF see the
same arrays as before: the values on disk do not change (``time`` stays
float seconds since the UNIX epoch).

Only what applies is said: the conventions for geoscience coordinates
(latitude, longitude, grid mappings) have no counterpart in a scan.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

#: The ``Conventions`` attribute of the root and of every stream group.
CONVENTIONS = "CF-1.11"

#: ``time``: float seconds since the UNIX epoch, as the documents give them.
TIME_ATTRIBUTES: dict[str, Any] = {
    "units": "seconds since 1970-01-01T00:00:00Z",
    "calendar": "proleptic_gregorian",
    "standard_name": "time",
    "long_name": "event time",
}

#: ``_written``: whether every array of the stream holds the point on disk.
WRITTEN_ATTRIBUTES: dict[str, Any] = {
    "long_name": "point written: every array of the stream holds it on disk",
    # A boolean array: 0 and 1 are False and True (and stay numbers when the
    # dataset is exported to netCDF, which has no boolean attributes).
    "flag_values": [0, 1],
    "flag_meanings": "not_written written",
}

#: The ancillary variable every data variable names.
ANCILLARY = "_written"


def flag_meaning(choice: Any) -> str:
    """One word of ``flag_meanings`` (blank-separated words) for a choice."""
    word = re.sub(r"\s+", "_", str(choice).strip())
    return word or "_"


def _limit(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def valid_range(data_key: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """The control limits of a data key: event-model's ``limits.control``,
    else ophyd's ``lower_ctrl_limit``/``upper_ctrl_limit``. EPICS reports
    ``0, 0`` for a record without limits: that is no range."""
    low = high = None
    limits = data_key.get("limits")
    control = limits.get("control") if isinstance(limits, Mapping) else None
    if isinstance(control, Mapping):
        low, high = _limit(control.get("low")), _limit(control.get("high"))
    else:
        low = _limit(data_key.get("lower_ctrl_limit"))
        high = _limit(data_key.get("upper_ctrl_limit"))
    if low is not None and high is not None and (low == high or low > high):
        return None, None
    return low, high


def choices(data_key: Mapping[str, Any]) -> list[str] | None:
    """The values an enumerated data key takes: ``choices`` (event-model,
    ophyd-async), else ``enum_strs`` (ophyd)."""
    for name in ("choices", "enum_strs"):
        value = data_key.get(name)
        if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, str) for v in value
        ):
            return list(value)
    return None


def data_key_attributes(data_key: Mapping[str, Any]) -> dict[str, Any]:
    """CF attributes of a data key's array, before its dtype is known
    (:func:`typed` gives them the array's type)."""
    attrs: dict[str, Any] = {"ancillary_variables": ANCILLARY}
    low, high = valid_range(data_key)
    if low is not None:
        attrs["valid_min"] = low
    if high is not None:
        attrs["valid_max"] = high
    names = choices(data_key)
    if names is not None:
        # The choices verbatim (flag_meanings holds them as words).
        attrs["choices"] = names
        attrs["flag_meanings"] = " ".join(flag_meaning(c) for c in names)
    return attrs


def typed(attrs: Mapping[str, Any], dtype: np.dtype) -> dict[str, Any]:
    """``attrs`` with the CF attributes that must have the array's type in it
    (``valid_min``, ``valid_max``, ``flag_values``), or without them where
    the type cannot hold them.

    An enumerated key stored as numbers holds the index of its choice
    (ophyd's ``EpicsSignal`` with ``string=False``): flag values 0, 1, ...;
    stored as strings (ophyd-async), it holds the choice itself, and the
    flag values are the choices.
    """
    result = dict(attrs)
    numeric = dtype.kind in "iuf"
    for name in ("valid_min", "valid_max"):
        if name not in result:
            continue
        value = result.pop(name)
        if not numeric:
            continue
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            bound = math.ceil(value) if name == "valid_min" else math.floor(value)
            if info.min <= bound <= info.max:
                result[name] = int(bound)
        else:
            result[name] = float(value)
    names = result.get("choices")
    if isinstance(names, list) and "flag_meanings" in result:
        if dtype.kind in "iu" and len(names) - 1 <= np.iinfo(dtype).max:
            result["flag_values"] = list(range(len(names)))
        elif dtype.kind == "f":
            result["flag_values"] = [float(n) for n in range(len(names))]
        elif dtype.kind in "OUS":
            result["flag_values"] = list(names)
        else:
            del result["flag_meanings"]
    return result
