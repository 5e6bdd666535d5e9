"""Simulated devices for demos and tests.

:class:`PointCamera` is an ophyd area detector whose frame is a pure function
of the positions of the motors it watches (:func:`frame_at`), so a frame read
back from a store can be checked against the frame the camera must have taken
at that point.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from ophyd import Component, Device, Signal
from ophyd.sim import SynAxis, SynSignal

__all__ = ["PointCamera", "SpectrumDetector", "frame_at", "motors", "spectrum_at"]


def frame_at(
    positions: Mapping[str, float],
    shape: Sequence[int] = (64, 64),
    dtype: Any = "uint16",
) -> np.ndarray:
    """The frame a :class:`PointCamera` takes with its motors at ``positions``.

    A spot whose brightness follows a spectrum over the first motor and whose
    place follows the second, over a fixed pattern, plus an offset derived from
    all positions so that no two points give the same frame.
    """
    dtype = np.dtype(dtype)
    values = [float(v) for v in positions.values()]
    tag = zlib.crc32(repr([round(v, 6) for v in values]).encode()) % 97
    ys, xs = np.indices(tuple(shape), dtype="float64")
    height, width = (tuple(shape) + (1, 1))[:2]
    brightness = 1.0
    center_x = width / 2
    if len(values) >= 1:
        brightness = 0.2 + np.exp(-(((values[0] - 550.0) / 120.0) ** 2))
    if len(values) >= 2:
        center_x = width * (0.2 + 0.6 * ((values[1] % 10.0) / 10.0))
    spot = np.exp(-(((ys - height / 2) ** 2 + (xs - center_x) ** 2) / (0.02 * height * width + 1)))
    pattern = (ys + 2 * xs) % 7
    image = 100 + 4000 * brightness * spot + pattern + tag
    if dtype.kind in "iu":
        return np.round(image).astype(dtype)
    return image.astype(dtype)


class _FrameSignal(SynSignal):
    """A synthetic signal that also declares its numpy dtype and shape."""

    def describe(self) -> dict[str, dict[str, Any]]:
        description = super().describe()
        camera = self.parent
        entry = description[self.name]
        entry["dtype"] = "array"
        entry["shape"] = list(camera.frame_shape)
        entry["dtype_numpy"] = np.dtype(camera.frame_dtype).str
        entry["dims"] = ["y", "x"] if len(camera.frame_shape) == 2 else []
        if not entry["dims"]:
            del entry["dims"]
        return description


class PointCamera(Device):
    """A simulated camera whose frame encodes where its motors are.

    Parameters
    ----------
    motors
        The motors whose positions the frame depends on (in order).
    shape
        Frame shape, e.g. ``(256, 256)``.
    dtype
        Frame dtype, e.g. ``"uint16"``.
    name
        Device name; the frame's data key is ``<name>_image``.
    """

    image = Component(_FrameSignal, kind="hinted")

    def __init__(
        self,
        motors: Sequence[Any] = (),
        *,
        shape: Sequence[int] = (64, 64),
        dtype: Any = "uint16",
        name: str = "cam",
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.watched = list(motors)
        self.frame_shape = tuple(int(s) for s in shape)
        self.frame_dtype = np.dtype(dtype)
        self.image._func = self._take
        self.image.put(self._take())

    def trigger(self) -> Any:
        """Take a frame at the motors' current positions."""
        return self.image.trigger()

    def positions(self) -> dict[str, float]:
        return {m.name: float(m.position) for m in self.watched}

    def _take(self) -> np.ndarray:
        return frame_at(self.positions(), self.frame_shape, self.frame_dtype)


def spectrum_at(positions: Mapping[str, float], energies: Sequence[float]) -> np.ndarray:
    """The counts a :class:`SpectrumDetector` records with its motors at
    ``positions``, in bins centred on ``energies`` (keV).

    A fluorescence line at 6.4 keV whose height follows the first motor,
    over a background that falls with energy, plus a tag derived from all
    positions: a function of the energies, so a spectrum read back is checked
    against the energies of its bins.
    """
    energy = np.asarray(energies, dtype="float64")
    values = [float(v) for v in positions.values()]
    tag = zlib.crc32(repr([round(v, 6) for v in values]).encode()) % 13
    height = 1000.0 * (1.0 + (values[0] % 5.0 if values else 0.0))
    line = height * np.exp(-(((energy - 6.4) / 0.12) ** 2))
    background = 200.0 * np.exp(-energy / 4.0)
    return np.round(line + background + tag).astype("uint32")


class _SpectrumSignal(SynSignal):
    """The spectrum: counts per bin, its dimension named."""

    def describe(self) -> dict[str, dict[str, Any]]:
        description = super().describe()
        detector = self.parent
        entry = description[self.name]
        entry["dtype"] = "array"
        entry["shape"] = [detector.bins]
        entry["dtype_numpy"] = np.dtype("uint32").str
        entry["dims"] = [detector.dim]
        entry["units"] = "counts"
        return description


class _EnergySignal(Signal):
    """The energies of the bins (configuration), in keV."""

    def describe(self) -> dict[str, dict[str, Any]]:
        description = super().describe()
        description[self.name]["units"] = "keV"
        return description


class SpectrumDetector(Device):
    """A simulated multichannel analyser: a spectrum per point, the energy of
    each bin in its configuration (``<name>_energy``), as an MCA reports them.

    Parameters
    ----------
    motors
        The motors whose positions the spectrum depends on (in order).
    energies
        The energy of each bin (keV); their number is the spectrum's length.
        ``configure({"energy": [...]})`` recalibrates it.
    dim
        The name the spectrum's data key gives its dimension.
    name
        Device name; the spectrum's data key is ``<name>_spectrum``.
    """

    spectrum = Component(_SpectrumSignal, kind="hinted")
    energy = Component(_EnergySignal, kind="config")

    def __init__(
        self,
        motors: Sequence[Any] = (),
        *,
        energies: Sequence[float] = tuple(np.linspace(1.0, 10.0, 64)),
        dim: str = "energy",
        name: str = "mca",
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.watched = list(motors)
        self.bins = len(energies)
        self.dim = dim
        self.energy.put(np.asarray(energies, dtype="float64"))
        self.spectrum._func = self._take
        self.spectrum.put(self._take())

    def trigger(self) -> Any:
        """Record a spectrum at the motors' current positions."""
        return self.spectrum.trigger()

    def positions(self) -> dict[str, float]:
        return {m.name: float(m.position) for m in self.watched}

    def _take(self) -> np.ndarray:
        return spectrum_at(self.positions(), self.energy.get())


def motors(*names: str) -> list[SynAxis]:
    """Simulated motors with the given names (no delay)."""
    return [SynAxis(name=name) for name in names]
