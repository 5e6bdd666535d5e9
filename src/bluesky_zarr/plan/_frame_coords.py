"""Coordinates of frame dimensions, from the devices' configuration.

A multichannel analyser's spectrum arrives with ``dims: ["energy"]`` and the
energy of each of its bins in the device's configuration (the descriptor's
``configuration[<device>]["data"]``); a detector's frame axes may be
calibrated the same way. Where a data key's frame dimension has a name and
its device's configuration holds a 1-D array of numbers of that dimension's
length under that name (``energy``, or ``<device>_energy`` as ophyd names a
component), the array becomes the dimension's coordinate: ``ds.sel(energy=...)``
works on energies, not on bin numbers. The ``frame_coords`` option of the
writer maps a dimension to a configuration key where the names differ. The
data keys of one device share the coordinate; another device's frame
dimension of the same name takes a name of its own (``<data key>_energy``),
even when its values are equal today: recalibrating one device must not
move another's axis.

A configuration can change during a run (``bps.configure`` makes the
RunEngine emit a new descriptor for the stream). The coordinate keeps the
values of the stream's first descriptor; when a later descriptor brings
others, a per-point coordinate ``<dim>_per_point`` (scan dimensions, then the
frame dimension) is added, holding at each point the values of the
configuration its event was taken with, and the coordinate's ``comment``
says so. Nothing is silently reinterpreted: the spectrum at each point stays
paired with the energies it was measured with.

This module decides what the coordinates are; the stream writer
(:mod:`._stream`) makes and writes their arrays.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._errors import OptionError
from ._text import json_safe

logger = logging.getLogger(__name__)

#: The suffix of the per-point coordinate made when a configuration changes.
PER_POINT_SUFFIX = "_per_point"


def check_frame_coords(value: Any) -> dict[str, str]:
    """The ``frame_coords=`` option, checked: dimension names to configuration keys."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise OptionError(
            f"frame_coords= must map frame dimension names to configuration keys "
            f"(e.g. {{'energy': 'mca_bin_energies'}}), got {value!r}"
        )
    result = {}
    for dim, key in value.items():
        if not isinstance(dim, str) or not dim or not isinstance(key, str) or not key:
            raise OptionError(
                f"frame_coords= must map frame dimension names to configuration keys, "
                f"both non-empty strings, got {dim!r}: {key!r}"
            )
        result[dim] = key
    return result


@dataclass
class ConfigurationValue:
    """A 1-D array of numbers a device's configuration holds."""

    object_name: str
    key: str
    values: np.ndarray
    units: str | None


def _as_axis(value: Any) -> np.ndarray | None:
    """``value`` as a 1-D float array, or None if it is not a list of numbers."""
    if isinstance(value, (str, bytes, Mapping)) or np.ndim(value) != 1:
        return None
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        return None
    if array.dtype.kind not in "iuf" or array.ndim != 1:
        return None
    return array.astype("float64")


def configuration_value(
    configuration: Any, key: str, object_name: str | None = None
) -> ConfigurationValue | None:
    """The 1-D numeric value of configuration key ``key`` (of the device
    ``object_name`` when given, else of any device), or None."""
    if not isinstance(configuration, Mapping):
        return None
    devices = (
        [(object_name, configuration.get(object_name))]
        if object_name is not None
        else list(configuration.items())
    )
    for name, device in devices:
        if not isinstance(device, Mapping):
            continue
        data = device.get("data")
        if not isinstance(data, Mapping) or key not in data:
            continue
        values = _as_axis(data[key])
        if values is None:
            return None
        data_keys = device.get("data_keys")
        described = data_keys.get(key) if isinstance(data_keys, Mapping) else None
        units = described.get("units") if isinstance(described, Mapping) else None
        return ConfigurationValue(str(name), key, values, units if units else None)
    return None


def find_axis(
    descriptor: Mapping[str, Any],
    data_key: Mapping[str, Any],
    names: tuple[str, ...],
    size: int,
    declared: Mapping[str, str],
) -> tuple[ConfigurationValue | None, str | None]:
    """The configuration value that is the coordinate of a frame dimension
    known by ``names`` (its name in the store, the name the data key gives
    it), of length ``size``; and, when the user declared a key for it that
    does not fit, why (else None)."""
    configuration = descriptor.get("configuration")
    for name in names:
        if name in declared:
            key = declared[name]
            found = configuration_value(configuration, key)
            if found is None:
                return None, (
                    f"frame_coords= maps dimension {name!r} to configuration key {key!r}, "
                    f"which no device's configuration holds as a list of numbers"
                )
            if found.values.shape != (size,):
                return None, (
                    f"frame_coords= maps dimension {name!r} to configuration key {key!r}, "
                    f"which holds {found.values.size} values for a dimension of {size}"
                )
            return found, None
    object_name = data_key.get("object_name")
    if not isinstance(object_name, str):
        return None, None
    for name in names:
        for key in (name, f"{object_name}_{name}"):
            found = configuration_value(configuration, key, object_name)
            if found is not None and found.values.shape == (size,):
                return found, None
    return None, None


@dataclass
class FrameCoordinate:
    """The coordinate of one frame dimension of a stream, and the values
    each of the stream's descriptors gives it."""

    #: The dimension's name, and the coordinate's.
    dim: str
    object_name: str
    key: str
    units: str | None
    #: The distinct values met so far; the first descriptor's first.
    configurations: list[np.ndarray]
    #: The index in ``configurations`` of each descriptor's values, in the
    #: order the stream's descriptors came.
    by_descriptor: list[int] = field(default_factory=lambda: [0])
    #: The per-point coordinate's name, once the values changed.
    per_point: str | None = None

    @property
    def values(self) -> np.ndarray:
        return self.configurations[0]

    def attributes(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "_ARRAY_DIMENSIONS": [self.dim],
            "long_name": f"{self.key} (configuration of {self.object_name})",
            "source": "configuration",
            "configuration_key": self.key,
            "object_name": self.object_name,
        }
        if self.units is not None:
            attrs["units"] = self.units
        if self.per_point is not None:
            attrs["comment"] = (
                f"the values of the stream's first descriptor; the configuration changed "
                f"during the run: {self.per_point} holds the values each point was "
                f"measured with"
            )
        return dict(json_safe(attrs))

    def per_point_attributes(self, dims: list[str]) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "_ARRAY_DIMENSIONS": dims,
            "long_name": (
                f"{self.key} (configuration of {self.object_name}) at each point, as the "
                f"descriptor of its event gave it"
            ),
            "source": "configuration",
            "configuration_key": self.key,
            "object_name": self.object_name,
        }
        if self.units is not None:
            attrs["units"] = self.units
        return dict(json_safe(attrs))

    def add_descriptor(self, descriptor: Mapping[str, Any]) -> bool:
        """Note the values the stream's next descriptor gives; True if they are
        new (the configuration changed). A descriptor that does not give them
        (the device left the stream's configuration) gives NaN."""
        found = configuration_value(descriptor.get("configuration"), self.key, self.object_name)
        values = (
            found.values
            if found is not None and found.values.shape == self.values.shape
            else np.full(self.values.shape, np.nan)
        )
        for index, known in enumerate(self.configurations):
            if np.array_equal(known, values, equal_nan=True):
                self.by_descriptor.append(index)
                return False
        self.configurations.append(values)
        self.by_descriptor.append(len(self.configurations) - 1)
        return True

    def at_points(self, descriptors: np.ndarray) -> np.ndarray:
        """The values at points whose events came with the stream's
        descriptors number ``descriptors`` (-1: no event yet, NaN)."""
        table = np.stack(self.configurations + [np.full(self.values.shape, np.nan)])
        rows = np.asarray(self.by_descriptor + [len(self.configurations)])
        return table[rows[descriptors]]
