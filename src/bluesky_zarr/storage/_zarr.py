"""Everything this package asks of zarr-python, in one module.

zarr-python's internals change between minor releases (3.2 moved its chunk
grids, 3.4 its Morton order); its public API and the Zarr V3 specification
do not. The writer builds its metadata itself (:mod:`._spec`) and writes
whole shards itself (:mod:`._io`); what it still needs from zarr-python is
here, through the public API:

- the JSON of what only zarr-python describes: extension data types
  (strings, raw bytes, structured records, dates) and codecs a user passes;
- array objects over metadata this package wrote, for the writes its own
  path does not cover (codec chains it does not reproduce, object storage,
  Icechunk sessions, a user's store wrapper) and for reading stores back;
- stores: a local one whose writes go through this package's file writer,
  zarr's ``FsspecStore`` for object storage, ``WrapperStore``;
- calls into a store's asynchronous methods, on zarr-python's event loop.

No other module of the package imports zarr (a test keeps it so). Where a
name is not public (the event loop runner), it is looked up once, here,
with a fallback that keeps the package importable if it moves.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import zarr
import zarr.abc.codec
import zarr.abc.store
import zarr.buffer
import zarr.dtype
import zarr.errors
import zarr.registry
import zarr.storage

T = TypeVar("T")

#: Errors zarr-python raises for a node that is not there.
NOT_FOUND: tuple[type[BaseException], ...] = tuple(
    error
    for error in (
        getattr(zarr.errors, "NodeNotFoundError", None),
        getattr(zarr.errors, "GroupNotFoundError", None),
        getattr(zarr.errors, "ArrayNotFoundError", None),
    )
    if isinstance(error, type)
)

Store = zarr.abc.store.Store
WrapperStore = zarr.storage.WrapperStore
Array = zarr.Array
Group = zarr.Group


# ------------------------------------------------------------- event loop
def _loop_runner() -> Callable[..., Any]:
    """zarr-python's ``sync``: runs a coroutine on zarr's own event loop
    thread (where its stores, and the s3fs sessions they hold, live)."""
    runner: Any
    try:
        from zarr.core.sync import sync as runner  # not public: looked up once here
    except ImportError:  # pragma: no cover - a zarr-python that moved it
        runner = _own_loop
    return runner


_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _own_loop(coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Runs ``coroutine`` on an event loop thread of this module's own."""
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(
                target=_loop.run_forever, name="bluesky-zarr-loop", daemon=True
            ).start()
    loop: Any = _loop
    future: Any = asyncio.run_coroutine_threadsafe(coroutine, loop)
    return future.result(timeout)


_run = _loop_runner()


def run(coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run a coroutine of a store on zarr-python's event loop and wait for it."""
    runner: Any = _run
    if timeout is None:
        return runner(coroutine)
    return runner(coroutine, timeout=timeout)


# ------------------------------------------------------------------ stores
def buffer(value: bytes) -> Any:
    """``value`` as a zarr buffer (what a store's ``set`` takes)."""
    return zarr.buffer.default_buffer_prototype().buffer.from_bytes(value)


def put(store: Any, key: str, value: bytes) -> None:
    """Write ``value`` under ``key`` of ``store``."""
    run(store.set(key, buffer(value)))


def get(store: Any, key: str) -> bytes | None:
    """The value of ``key`` in ``store``, or ``None`` if there is none."""
    value = run(store.get(key, zarr.buffer.default_buffer_prototype()))
    return None if value is None else bytes(value.to_bytes())


def delete(store: Any, key: str) -> None:
    """Delete ``key`` of ``store``."""
    run(store.delete(key))


def chunk_key(array: Any, coords: tuple[int, ...]) -> str:
    """The key, below a zarr-python array's own, of the chunk (the shard, if
    it is sharded) at grid position ``coords`` (V2 or V3, any encoding)."""
    return str(array.metadata.encode_chunk_key(coords))


def delete_dir(store: Any, prefix: str) -> None:
    """Delete every key of ``store`` below ``prefix``."""
    run(store.delete_dir(prefix))


class LocalFilesStore(zarr.storage.LocalStore):
    """A local store whose writes go through ``files`` (the package's file
    writer, :class:`bluesky_zarr.storage._files.LocalFiles`): each file written
    aside and renamed, no part of a deleted store made again, around the
    page cache where it pays. Reads are zarr-python's own."""

    def __init__(self, files: Any, *, read_only: bool = False) -> None:
        super().__init__(Path(files.root), read_only=read_only)
        #: The file writer (its ``root``, ``write_parts``, ``durable``).
        self.files = files

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LocalFilesStore) and other.files is self.files

    __hash__ = object.__hash__

    async def set(self, key: str, value: Any) -> None:
        if self.read_only:
            raise ValueError("the store is read-only")
        await asyncio.to_thread(self.files.write_parts, key, [value.as_buffer_like()])

    async def set_if_not_exists(self, key: str, value: Any) -> None:
        if self.read_only:
            raise ValueError("the store is read-only")
        try:
            await asyncio.to_thread(
                self.files.write_parts, key, [value.as_buffer_like()], exclusive=True
            )
        except FileExistsError:
            pass


def local_store(path: str | Path, *, read_only: bool = True) -> Any:
    """zarr-python's store over a local directory (for reading)."""
    return zarr.storage.LocalStore(Path(path), read_only=read_only)


def fsspec_store(fs: Any, path: str, *, read_only: bool) -> Any:
    """zarr-python's store over an asynchronous fsspec file system."""
    return zarr.storage.FsspecStore(fs, path=path, read_only=read_only)


def json_indent() -> int | None:
    """The indentation zarr-python uses for ``zarr.json`` (its configuration)."""
    indent = zarr.config.get("json_indent")
    return indent if isinstance(indent, int) else None


# --------------------------------------------------------------- arrays
def array_over(store: Any, path: str, metadata: Mapping[str, Any]) -> Any:
    """A zarr-python array over ``metadata`` (an array's ``zarr.json``, as a
    dict) at ``path`` of ``store``, without reading the store; every chunk
    is written, also one that holds only the fill value (the writer's
    ``_written`` mask says which points are measured)."""
    # zarr-python's annotations of these change between releases: called as Any.
    api: Any = zarr
    config = {"write_empty_chunks": True}
    try:
        async_array = api.AsyncArray(
            metadata=dict(metadata), store_path=api.storage.StorePath(store, path), config=config
        )
        return api.Array(async_array)
    except TypeError:  # pragma: no cover - a zarr-python whose constructor changed
        return api.open_array(store, path=path, mode="r+", zarr_format=3).with_config(config)


def open_group(store: Any, *, mode: str = "r", use_consolidated: bool | None = None) -> Any:
    """A Zarr V3 group of ``store`` (read through zarr-python); a group that
    is not there raises ``FileNotFoundError``."""
    api: Any = zarr
    try:
        return api.open_group(store, mode=mode, zarr_format=3, use_consolidated=use_consolidated)
    except NOT_FOUND as err:
        raise FileNotFoundError(f"no Zarr V3 group there: {err}") from err


def open_array(store: Any, path: str = "", *, mode: str = "r") -> Any:
    """A Zarr array of ``store`` (read through zarr-python; V2 or V3); an
    array that is not there raises ``FileNotFoundError``."""
    api: Any = zarr
    try:
        return api.open_array(store=store, path=path, mode=mode)
    except NOT_FOUND as err:
        raise FileNotFoundError(f"no Zarr array {path!r} there: {err}") from err


def is_array(node: Any) -> bool:
    """Whether ``node`` (a member of a group) is an array."""
    return isinstance(node, zarr.Array)


# ------------------------------------------------- data types and codecs
def is_bytes_codec(codec: Any) -> bool:
    """Whether ``codec`` is a zarr-python bytes-to-bytes codec (a compressor)."""
    return isinstance(codec, zarr.abc.codec.BytesBytesCodec)


def check_data_type(dtype: np.dtype, fill_value: Any) -> None:
    """Raise ``TypeError`` or ``ValueError`` if no Zarr V3 array holds
    ``dtype`` with ``fill_value``."""
    zarr.dtype.parse_data_type(dtype, zarr_format=3).cast_scalar(fill_value)


def _codec_object(codec: Any) -> Any:
    """A zarr-python codec for ``codec``: the object itself, or one made
    from its JSON (a dict) through zarr-python's codec registry."""
    if not isinstance(codec, Mapping):
        return codec
    codec_class: Any = zarr.registry.get_codec_class(codec["name"])
    return codec_class.from_dict(dict(codec))


_described: dict[tuple[str, str, str], tuple[Any, Any, tuple[dict[str, Any], ...]]] = {}
_described_lock = threading.Lock()


def described_by_zarr(
    dtype: Any, fill_value: Any, compressors: Sequence[Any]
) -> tuple[Any, Any, tuple[dict[str, Any], ...]]:
    """``data_type``, ``fill_value`` and ``codecs`` as zarr-python writes
    them for an array of ``dtype`` (``str`` for variable-length strings, or
    a numpy dtype) with ``fill_value`` and ``compressors`` (zarr codecs or
    their JSON): for the types and codecs this package does not spell
    itself. Made by creating a one-element array in memory, once per case."""
    key = (
        "str" if dtype is str else repr(np.dtype(dtype).descr),
        repr(fill_value),
        repr([c if isinstance(c, Mapping) else (type(c), c.to_dict()) for c in compressors]),
    )
    with _described_lock:
        known = _described.get(key)
    if known is not None:
        return known
    store = zarr.storage.MemoryStore()
    zarr.create_array(
        store,
        shape=(1,),
        chunks=(1,),
        dtype=dtype,
        fill_value=fill_value,
        compressors=[_codec_object(c) for c in compressors] or None,
        zarr_format=3,
    )
    document = json.loads(get(store, "zarr.json") or b"{}")
    result = (
        document["data_type"],
        document["fill_value"],
        tuple(dict(c) for c in document["codecs"]),
    )
    with _described_lock:
        _described[key] = result
    return result


def is_local_files(store: Any) -> bool:
    """Whether ``store`` is a :class:`LocalFilesStore` (not wrapped)."""
    return isinstance(store, LocalFilesStore)
