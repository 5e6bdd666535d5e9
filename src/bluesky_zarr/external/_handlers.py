"""Handlers of ophyd v1 ``resource`` specs named on the command line, or
installed by other packages.

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

from .._errors import HandlerError, OptionError

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
