"""The external floor: frames that documents point to.

The documents of both conventions (resource/datum, stream_resource/
stream_datum) and the modes (fill, reference, virtual: strategies chosen
once per run) in ``_data``; handlers of resource specs (``_handlers``); one
reader per file format behind one interface (``_formats``); references in
place (``_virtual``). It never imports the live writer: the run hands it
narrow interfaces (``_target``).
"""

from ._data import ExternalData
from ._handlers import (
    DEFAULT_HANDLERS,
    VIRTUAL_HANDLERS,
    NpySequenceHandler,
    handler_registry,
    parse_handler,
)
from ._target import ExternalOptions, FrameTarget

__all__ = [
    "DEFAULT_HANDLERS",
    "ExternalData",
    "ExternalOptions",
    "FrameTarget",
    "NpySequenceHandler",
    "VIRTUAL_HANDLERS",
    "handler_registry",
    "parse_handler",
]
