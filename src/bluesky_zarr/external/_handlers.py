"""Handlers of ophyd v1 ``resource`` specs: the package's own (``NPY_SEQ``,
``AD_HDF5``), those named on the command line, and those installed by other
packages.

Handlers follow the ``event_model.Filler`` convention (see ``_external``):
``Handler(full_path, **resource_kwargs)``, then ``handler(**datum_kwargs)``.
Packages such as ``area-detector-handlers`` declare theirs as entry points
of the group ``databroker.handlers`` (the name is the spec, the value
``module:Class``), as databroker finds them. They are loaded when a resource
of their spec first comes, so that a broken or heavy handler package costs
nothing to the runs that do not use it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import numpy as np

from .._errors import ExternalFileError, HandlerError, MissingDependencyError, OptionError
from ._formats import check_hdf5_rows

#: The entry point group that handler packages register their handlers in.
ENTRY_POINT_GROUP = "databroker.handlers"


def load_object(reference: str) -> Any:
    """The object ``module:name`` (or ``module:name.attribute``) names."""
    module_name, sep, qualified = reference.partition(":")
    if not sep or not module_name or not qualified:
        raise OptionError(f"expected module:Class, got {reference!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise OptionError(f"cannot import {module_name!r} (from {reference!r}): {err}") from err
    value: Any = module
    for part in qualified.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise OptionError(
                f"{module_name!r} has no {qualified!r} (from {reference!r})"
            ) from None
    return value


def parse_handler(text: str) -> tuple[str, Any]:
    """``SPEC=module:Class`` as ``(spec, handler class)``."""
    spec, sep, reference = text.partition("=")
    if not sep or not spec.strip() or not reference.strip():
        raise OptionError(
            f"expected a handler as SPEC=module:Class (e.g. "
            f"AD_HDF5=area_detector_handlers.handlers:AreaDetectorHDF5Handler), got {text!r}"
        )
    handler = load_object(reference.strip())
    if not callable(handler):
        raise OptionError(
            f"the handler for spec {spec.strip()!r} must be a class (or callable), got "
            f"{handler!r} from {reference.strip()!r}"
        )
    return spec.strip(), handler


class InstalledHandler:
    """A handler class declared by an installed package, imported at its first use."""

    def __init__(self, entry_point: EntryPoint) -> None:
        self.entry_point = entry_point
        self._class: Any = None

    def __repr__(self) -> str:
        package = getattr(self.entry_point.dist, "name", None) or "an installed package"
        return (
            f"<handler of spec {self.entry_point.name!r} installed by {package}: "
            f"{self.entry_point.value}>"
        )

    def load(self) -> Any:
        if self._class is None:
            try:
                self._class = self.entry_point.load()
            except Exception as err:  # noqa: BLE001 - whatever importing it raised
                raise HandlerError(f"{self!r} cannot be loaded: {err!r}") from err
        return self._class

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.load()(*args, **kwargs)


def installed_handlers(leave_out: Iterable[str] = ()) -> dict[str, InstalledHandler]:
    """The handlers installed packages declare (``databroker.handlers`` entry
    points), by spec, but those of the specs in ``leave_out``. Two packages
    declaring one spec: the first found is kept."""
    found: dict[str, InstalledHandler] = {}
    skip = set(leave_out)
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name not in skip and entry_point.name not in found:
            found[entry_point.name] = InstalledHandler(entry_point)
    return found


def handler_registry(
    given: Mapping[str, Any] | None, built_in: Iterable[str], installed: bool = True
) -> dict[str, Any]:
    """The handlers a run gets: those ``given`` first, then this package's own
    (``built_in`` names their specs, which installed packages do not replace),
    then those of installed packages."""
    registry: dict[str, Any] = dict(installed_handlers(built_in)) if installed else {}
    registry.update(given or {})
    return registry


class NpySequenceHandler:
    """Handler of spec ``NPY_SEQ``: one ``<path>_<index>.npy`` file per datum.

    This is the format ``ophyd.sim``'s ``SynSignalWithRegistry`` (the ``img``
    detector) writes: ``resource_path`` is a file stem, each datum's
    ``index`` picks one file.
    """

    specs = frozenset({"NPY_SEQ"})

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, index: int) -> np.ndarray:
        path = f"{self.path}_{int(index)}.npy"
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as err:  # a short file: numpy reads fewer bytes than its header says
            raise ExternalFileError(f"the NPY file {path} is not whole: {err}") from err


class AreaDetectorHDF5Handler:
    """Handler of specs ``AD_HDF5`` and ``AD_HDF5_SWMR``: an area detector's
    HDF5 file, frames in ``/entry/data/data``, ``frame_per_point`` rows a datum
    (``point_number``). Returns ``(frame_per_point, *frame shape)``."""

    specs = frozenset({"AD_HDF5", "AD_HDF5_SWMR"})
    dataset_name = "/entry/data/data"

    def __init__(self, path: str, frame_per_point: int = 1) -> None:
        try:
            import h5py
        except ImportError as err:
            raise MissingDependencyError(
                "AD_HDF5 resources are HDF5 files; reading them needs h5py "
                "(pip install 'bluesky-zarr[hdf5]')"
            ) from err
        self.path = path
        self.frame_per_point = int(frame_per_point)
        self.file = h5py.File(path, "r", swmr=True)
        self.dataset = self.file[self.dataset_name]

    def __call__(self, point_number: int) -> np.ndarray:
        start = int(point_number) * self.frame_per_point
        stop = start + self.frame_per_point
        if stop > self.dataset.shape[0] and self.file.swmr_mode:
            self.dataset.refresh()
        if start < 0 or stop > self.dataset.shape[0]:
            raise IndexError(
                f"rows {start}..{stop} of {self.dataset_name} in {self.path}, which holds "
                f"{self.dataset.shape[0]}"
            )
        # SWMR reads past the end of a file cut short as zeros: the bytes are
        # checked before and after the read.
        check_hdf5_rows(self.dataset, self.path, start, stop)
        frames = np.asarray(self.dataset[start:stop])
        check_hdf5_rows(self.dataset, self.path, start, stop)
        return frames

    def close(self) -> None:
        self.file.close()


#: Handlers registered by default, by spec.
DEFAULT_HANDLERS: dict[str, Any] = {"NPY_SEQ": NpySequenceHandler}

#: Handlers registered with external="virtual": they read what does not map.
VIRTUAL_HANDLERS: dict[str, Any] = {
    spec: AreaDetectorHDF5Handler for spec in AreaDetectorHDF5Handler.specs
}
