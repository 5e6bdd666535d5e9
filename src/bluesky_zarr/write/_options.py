"""Writer options, checked once when the writer is made."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._errors import OptionError
from ..plan._frame_coords import check_frame_coords
from ..plan._layout import DEFAULT_SHARD_BYTES
from ..plan._names import DEFAULT_NAME_TEMPLATE, check_name_template
from ..storage import _zarr
from ..storage._spec import DEFAULT_COMPRESSOR

#: The default codec: Blosc LZ4 with bit-shuffle, the fastest of the
#: compressors measured on detector-like frames (see the README's
#: performance section).
DEFAULT_COMPRESSORS: tuple[Any, ...] = (DEFAULT_COMPRESSOR,)

DEFAULT_MAX_BUFFER_BYTES = 512 * 2**20


@dataclass(frozen=True)
class WriterOptions:
    """Options shared by every run a :class:`~bluesky_zarr.ZarrWriter` writes."""

    dims: tuple[str, ...] | None = None
    chunks: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    shards: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    compressors: Any = DEFAULT_COMPRESSORS
    shard_bytes: int = DEFAULT_SHARD_BYTES
    max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES
    flush_interval: float | None = 5.0
    workers: int = 2
    name_template: str = DEFAULT_NAME_TEMPLATE
    overwrite: bool | str = False
    on_error: str = "raise"
    store_wrapper: Callable[[Any], Any] | None = None
    external: str = "fill"
    handler_registry: Mapping[str, Any] = field(default_factory=dict)
    root_map: Mapping[str, str] = field(default_factory=dict)
    #: Frame dimension names to configuration keys (``_frame_coords``).
    frame_coords: Mapping[str, str] = field(default_factory=dict)


ON_ERROR = ("raise", "log")


#: Values of the ``external=`` option.
EXTERNAL_MODES = ("fill", "reference", "virtual")


def _layout_option(label: str, value: Any) -> dict[str, tuple[int, ...]]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise OptionError(
            f"{label}= must map data key names to tuples of integers, got {value!r}"
        )
    result = {}
    for key, shape in value.items():
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
            raise OptionError(f"{label}[{key!r}] must be a tuple of integers, got {shape!r}")
        try:
            ints = tuple(int(s) for s in shape)
        except (TypeError, ValueError):
            raise OptionError(
                f"{label}[{key!r}] must be a tuple of integers, got {shape!r}"
            ) from None
        if any(i < 1 or i != s for i, s in zip(ints, shape)) or not ints:
            raise OptionError(
                f"{label}[{key!r}] must hold positive integers, got {shape!r}"
            )
        result[str(key)] = ints
    return result


def make_options(
    *,
    dims: Sequence[str] | None = None,
    chunks: Mapping[str, Sequence[int]] | None = None,
    shards: Mapping[str, Sequence[int]] | None = None,
    compressors: Any = "default",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
    flush_interval: float | None = 5.0,
    workers: int = 2,
    name_template: str = DEFAULT_NAME_TEMPLATE,
    overwrite: bool | str = False,
    on_error: str = "raise",
    store_wrapper: Callable[[Any], Any] | None = None,
    external: str = "fill",
    handler_registry: Mapping[str, Any] | None = None,
    root_map: Mapping[str, str] | None = None,
    frame_coords: Mapping[str, str] | None = None,
) -> WriterOptions:
    """Check the user's options and return them as :class:`WriterOptions`."""
    if dims is not None:
        if isinstance(dims, str) or not all(isinstance(d, str) for d in dims):
            raise OptionError(f"dims= must be a sequence of names, got {dims!r}")
        dims = tuple(dims)
    if isinstance(compressors, str):
        if compressors != "default":
            raise OptionError(
                f"compressors= must be 'default', None or zarr codecs, got {compressors!r}"
            )
        compressors = DEFAULT_COMPRESSORS
    elif compressors is None:
        compressors = ()
    else:
        codecs = (
            tuple(compressors) if isinstance(compressors, (list, tuple)) else (compressors,)
        )
        for codec in codecs:
            if not _zarr.is_bytes_codec(codec):
                raise OptionError(
                    f"compressors= must be 'default', None or zarr bytes-to-bytes codecs "
                    f"(e.g. zarr.codecs.ZstdCodec()), got {codec!r}"
                )
        compressors = codecs
    for label, number in (("shard_bytes", shard_bytes), ("max_buffer_bytes", max_buffer_bytes)):
        if not isinstance(number, int) or isinstance(number, bool) or number < 1:
            raise OptionError(f"{label}= must be a positive integer, got {number!r}")
    if flush_interval is not None and (
        not isinstance(flush_interval, (int, float)) or flush_interval <= 0
    ):
        raise OptionError(
            f"flush_interval= must be a positive number of seconds or None, got "
            f"{flush_interval!r}"
        )
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise OptionError(f"workers= must be a positive integer, got {workers!r}")
    if not isinstance(name_template, str) or not name_template:
        raise OptionError(f"name_template= must be a non-empty string, got {name_template!r}")
    check_name_template(name_template)
    if overwrite not in (False, True, "incomplete"):
        raise OptionError(
            f"overwrite= must be False, True or 'incomplete' (replace only an unfinished "
            f"store of the same run), got {overwrite!r}"
        )
    if on_error not in ON_ERROR:
        raise OptionError(f"on_error= must be one of {ON_ERROR}, got {on_error!r}")
    if store_wrapper is not None and not callable(store_wrapper):
        raise OptionError(f"store_wrapper= must be callable, got {store_wrapper!r}")
    if external not in EXTERNAL_MODES:
        raise OptionError(f"external= must be one of {EXTERNAL_MODES}, got {external!r}")
    handlers = _mapping_option("handler_registry", handler_registry)
    for spec, handler in handlers.items():
        if not isinstance(spec, str) or not callable(handler):
            raise OptionError(
                f"handler_registry= must map spec names to handler classes, got "
                f"{spec!r}: {handler!r}"
            )
    roots = _mapping_option("root_map", root_map)
    for old, new in roots.items():
        if not isinstance(old, str) or not isinstance(new, str):
            raise OptionError(
                f"root_map= must map directories to directories (strings), got "
                f"{old!r}: {new!r}"
            )
    return WriterOptions(
        dims=dims,
        chunks=_layout_option("chunks", chunks),
        shards=_layout_option("shards", shards),
        compressors=compressors,
        shard_bytes=shard_bytes,
        max_buffer_bytes=max_buffer_bytes,
        flush_interval=None if flush_interval is None else float(flush_interval),
        workers=workers,
        name_template=name_template,
        overwrite=overwrite if overwrite == "incomplete" else bool(overwrite),
        on_error=on_error,
        store_wrapper=store_wrapper,
        external=external,
        handler_registry=handlers,
        root_map=roots,
        frame_coords=check_frame_coords(frame_coords),
    )


def _mapping_option(label: str, value: Any) -> dict[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise OptionError(f"{label}= must be a mapping, got {value!r}")
    return dict(value)
