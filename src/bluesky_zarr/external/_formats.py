"""Readers of the files that stream_resource documents point to, one per format.

A stream_resource names where a data key's frames are (``uri``), in which
format (``mimetype``) and how to find them (``parameters``); each of its
stream_datum documents names the ``indices`` (one per event) it covers. A
:class:`FrameSource` turns one stream_resource into frames:
:meth:`FrameSource.plan` checks, at the document, that the events asked for
are there and returns a :class:`ReadPlan` whose ``read(lo, hi)`` is called on
the reader thread, in batches.

Formats read:

* ``application/x-hdf5``: a dataset (``parameters["dataset"]``) of the file
  at ``uri``, one or more rows per event.
* ``application/x-zarr``: the array ``parameters["path"]`` of the Zarr store
  at ``uri`` (V2 or V3), rows as for HDF5; without ``path``, the store itself,
  else the array named after the data key, else ``<key>/0``. Rows a live
  producer has not yet declared in its ``zarr.json`` are read from whole
  storage units, or waited for (:class:`ZarrSource`).
* ``multipart/related;type=image/tiff``, ``...;type=image/jpeg``,
  ``...;type=application/x-npy``: one file per frame (or per ``chunk_shape[0]``
  frames), named ``uri + parameters["template"].format(file number)``. The
  files of event ``i`` (counted from the stream_resource's first) are numbers
  ``i * f`` to ``i * f + f - 1``, ``f`` files per event. This is what
  ophyd-async's areaDetector TIFF and JPEG writers emit: ``uri`` the directory,
  ``template`` ``"<name>_{:06d}.tiff"``, ``chunk_shape`` ``(1, *frame shape)``.

``parameters["join_method"]``: ``"stack"`` (the default) adds the event
dimension in front of the declared shape (a file or dataset row may hold a
whole event, or one frame of it); ``"concat"`` joins events along the
declared leading dimension, so each event is ``shape[0]`` rows (or frames,
``chunk_shape[0]`` of them per file). A ``chunk_shape`` with a 0 in it
(ophyd-async emits one from a detector whose frame size is not yet known)
says nothing and is ignored: the files themselves say how many frames each
holds.

**The bytes are checked before a frame is taken.** A file cut short (a
detector that crashed, a full disk, a partial copy) must not give frames of
zeros marked as written. HDF5 opened in SWMR mode skips the library's own
check of a truncated file and reads past its end as zeros, so
:func:`check_hdf5_rows` checks each row instead: every chunk holding it (or
the contiguous rows) is in the file, and its byte range lies inside the
file's real size, before and after the read. Rows stored before a cut are
whole and are kept; the message says when the superblock declares a longer
file. A Zarr array's chunks must be in its store; TIFF, JPEG and NPY
decoders refuse a short file themselves. What fails raises
:class:`~bluesky_zarr.ExternalFileError`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import struct
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from .._errors import (
    DataShapeError,
    DocumentError,
    ExternalFileError,
    ExternalIndexError,
    MissingDependencyError,
)

if TYPE_CHECKING:
    from ._keys import StreamKey
    from ._target import FileContext

#: Said when a file cannot be read where the writer runs.
REMOTE_HINT = (
    "if the files are written where this writer cannot read them, pass "
    "external='reference' to record the references instead, or root_map= to "
    "say where their directories are mounted here"
)

JOIN_METHODS = ("stack", "concat")


@dataclass
class ReadPlan:
    """What one stream_datum asks for, checked: bytes per event, and how to
    read events ``lo..hi`` as ``(hi - lo, *stored frame shape)``."""

    event_bytes: int
    read: Callable[[int, int], np.ndarray]


class FrameSource:
    """The frames of one stream_resource document."""

    #: Mimetypes read by this class (lower case, no spaces).
    mimetypes: ClassVar[frozenset[str]] = frozenset()
    #: The module that reads the format, and the extra that installs it.
    module: ClassVar[str] = ""
    extra: ClassVar[str] = "formats"
    #: What the format is called in messages.
    label: ClassVar[str] = ""

    def __init__(self, sres: Mapping[str, Any], info: StreamKey, external: FileContext):
        self.sres = sres
        self.uid = str(sres["uid"])
        self.key = str(sres["data_key"])
        self.info = info
        self.external = external
        self.parameters: Mapping[str, Any] = sres.get("parameters") or {}
        self.join_method = join_method(sres)

    @classmethod
    def check_document(cls, sres: Mapping[str, Any]) -> None:
        """Refuse, at the stream_resource, what no stream_datum could be read from."""
        join_method(sres)
        if cls.module:
            try:
                __import__(cls.module)
            except ImportError as err:
                raise MissingDependencyError(
                    f"stream_resource {sres.get('uid')!r} is {cls.label}; reading it needs "
                    f"{cls.module} (pip install 'bluesky-zarr[{cls.extra}]')"
                ) from err

    def plan(self, start: int, stop: int, uid: str) -> ReadPlan:
        raise NotImplementedError

    def _keeps_frame_dim(self, per_index: int, row_shape: tuple[int, ...]) -> bool:
        """Whether the data key keeps a frames-per-point dimension over rows of
        ``row_shape``; refuses several rows an event for a key of one frame."""
        info = self.info
        keeps = (
            not info.squeezed
            and info.declared is not None
            and len(info.declared) == len(row_shape) + 1
        )
        if not keeps and per_index != 1:
            raise DataShapeError(
                f"stream_resource {self.uid!r}: {per_index} rows per event, but data key "
                f"{self.key!r} declares shape {list(info.declared or [])}, one frame per event"
            )
        return keeps

    def close(self) -> None:
        """Release what the source holds open (files shared between sources
        are closed by their owner)."""


def join_method(sres: Mapping[str, Any]) -> str:
    value = (sres.get("parameters") or {}).get("join_method", "stack")
    if value not in JOIN_METHODS:
        raise DocumentError(
            f"stream_resource {sres.get('uid')!r}: join_method must be one of "
            f"{list(JOIN_METHODS)}, got {value!r}"
        )
    return str(value)


def valid_chunk_shape(sres: Mapping[str, Any]) -> tuple[int, ...] | None:
    """The stream_resource's ``chunk_shape``, or None if it says nothing (absent,
    malformed, or with a size of 0)."""
    value = (sres.get("parameters") or {}).get("chunk_shape")
    if not isinstance(value, (list, tuple)) or not value:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        return None
    return tuple(value)


def fits(declared: Sequence[int | None], actual: Sequence[int]) -> bool:
    """Whether ``actual`` has the ``declared`` shape (None: any size)."""
    return len(declared) == len(actual) and all(
        d is None or d == a for d, a in zip(declared, actual)
    )


# ------------------------------------------------------ are the bytes there
#: The signature that opens an HDF5 superblock (at byte 0, 512, 1024, ...).
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

#: Superblock (versions 2, 3) consistency flags: open for writing, for SWMR writing.
_HDF5_OPEN_FLAGS = 0x1 | 0x4


def hdf5_declared_end(path: str) -> tuple[int, bool] | None:
    """Where an HDF5 file's superblock says the file ends, and whether a writer
    holds it open; None for superblocks of versions 0 and 1 (HDF5 checks
    those itself, also in SWMR mode).

    A file open for writing may end short of its declared end while the
    library reserves space, so the end says something only once the file is
    closed: then a shorter file was cut.
    """
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        where = 0
        while where + 12 <= size:
            file.seek(where)
            head = file.read(48)
            if head[:8] == _HDF5_SIGNATURE:
                break
            where = 512 if where == 0 else 2 * where
        else:
            return None
    version, offsets, flags = head[8], head[9], head[11]
    formats = {2: "<H", 4: "<I", 8: "<Q"}
    if version not in (2, 3) or offsets not in formats or len(head) < 12 + 3 * offsets:
        return None
    # Base address, superblock extension address, end-of-file address.
    base, _, end = (
        struct.unpack_from(formats[offsets], head, 12 + n * offsets)[0] for n in range(3)
    )
    return base + end, bool(flags & _HDF5_OPEN_FLAGS)


def _hdf5_storage(dataset: Any, first: int, last: int) -> Iterator[tuple[int, Any, int]]:
    """``(row, byte offset or None if not in the file, bytes)`` of each piece of
    storage holding rows ``first..last`` of an HDF5 dataset: its chunks, or
    the rows of a contiguous dataset. Compact data (in the object header),
    external raw files and virtual datasets yield nothing to check here."""
    import h5py

    plist = dataset.id.get_create_plist()
    layout = plist.get_layout()
    if layout == h5py.h5d.CHUNKED:
        chunks = dataset.chunks
        tiles = [range(0, n, c) for n, c in zip(dataset.shape[1:], chunks[1:])]
        get = dataset.id.get_chunk_info_by_coord
        for row in range(first - first % chunks[0], last, chunks[0]):
            for tile in itertools.product(*tiles):
                stored = get((row, *tile))
                yield row, stored.byte_offset, int(stored.size)
    elif layout == h5py.h5d.CONTIGUOUS and not plist.get_external_count():
        row_bytes = math.prod(dataset.shape[1:]) * dataset.dtype.itemsize
        offset = dataset.id.get_offset()
        yield first, None if offset is None else offset + first * row_bytes, (
            (last - first) * row_bytes
        )


def check_hdf5_rows(dataset: Any, path: str, first: int, last: int) -> None:
    """Refuse rows ``first..last`` of an HDF5 dataset unless their bytes are in
    the file at ``path``: every chunk of the rows stored, and each chunk's
    byte range inside the file's real size (the largest chunk end against
    the size, which SWMR reads do not compare).

    Raises
    ------
    ExternalFileError
        What is missing, with the file's size and the byte range asked for.
    """
    if first >= last:
        return
    what = f"rows {first}..{last} of dataset {dataset.name!r} in the HDF5 file {path}"
    try:
        size = os.stat(path).st_size
        declared = hdf5_declared_end(path)
    except OSError as err:
        raise ExternalFileError(f"{what}: the file cannot be read here: {err}") from err
    cut = "cut short (a detector that crashed, a full disk, a partial copy?)"
    if declared is not None and not declared[1] and declared[0] > size:
        # Rows stored before the cut are whole: each is checked on its own.
        cut += f"; its superblock says it ends at byte {declared[0]}"
    refreshed = False
    while True:
        try:
            storage = list(_hdf5_storage(dataset, first, last))
        except Exception as err:  # noqa: BLE001 - h5py raises several types on a broken index
            raise ExternalFileError(
                f"{what}: the file's index of its chunks cannot be read ({err!r}); the file "
                f"is {cut}"
            ) from err
        missing = [row for row, offset, _ in storage if offset is None]
        if not missing or refreshed or not getattr(dataset.file, "swmr_mode", False):
            break
        # A reader in SWMR mode may hold an older index than the file: look again.
        dataset.refresh()
        refreshed = True
    if missing:
        raise ExternalFileError(
            f"{what}: row {missing[0]} has no chunk in the file (not written, or the "
            f"chunk index was cut)"
        )
    for row, offset, length in storage:
        if offset + length > size:
            raise ExternalFileError(
                f"{what}: the file is {cut}: it holds {size} bytes, but row {row} is "
                f"stored at bytes {offset}..{offset + length}"
            )


# ---------------------------------------------------------------- row arrays
class _RowSource(FrameSource):
    """A growing array (HDF5 dataset, Zarr array) whose rows are frames."""

    #: The parameter naming the array inside the file or store.
    name_parameter: ClassVar[str] = ""

    def __init__(self, sres: Mapping[str, Any], info: StreamKey, external: FileContext):
        super().__init__(sres, info, external)
        self.path = external.uri_path(sres)
        self.name = self.parameters.get(self.name_parameter, self._default_name())
        if not isinstance(self.name, str):
            raise DocumentError(
                f"stream_resource {self.uid!r}: parameters must name the {self.label} "
                f"{self.name_parameter!r}, got {dict(self.parameters)!r}"
            )
        self.array: Any = None

    def _default_name(self) -> str | None:
        return None

    def _open(self) -> Any:
        raise NotImplementedError

    def _refresh(self) -> None:
        """See rows written since the array was opened."""

    def _check_rows(self, array: Any, first: int, last: int) -> None:
        """Refuse rows ``first..last`` of ``array`` whose bytes are not stored
        (:class:`ExternalFileError`)."""

    def plan(self, start: int, stop: int, uid: str) -> ReadPlan:
        if self.array is None:
            self.array = self._open()
        row_shape = tuple(self.array.shape[1:])
        per_index = self.rows_per_index(row_shape)
        first, last = start * per_index, stop * per_index
        if last > self.array.shape[0]:
            self._refresh()
        array = self.array
        if start < 0 or last > array.shape[0]:
            raise ExternalIndexError(
                f"stream_datum {uid!r} asks for rows {first}..{last} of {self.label} "
                f"{self.name!r} in {self.path} ({per_index} rows per event for indices "
                f"{start}..{stop}), which holds {array.shape[0]} rows"
            )
        keeps_frame_dim = self._keeps_frame_dim(per_index, row_shape)
        self._check_rows(array, first, last)

        def read(lo: int, hi: int) -> np.ndarray:
            # Checked again around the read: the file may be cut meanwhile.
            self._check_rows(array, lo * per_index, hi * per_index)
            rows = np.asarray(array[lo * per_index : hi * per_index])
            self._check_rows(array, lo * per_index, hi * per_index)
            frames = rows.reshape((hi - lo, per_index) + row_shape)
            return frames if keeps_frame_dim else frames[:, 0]

        event_bytes = per_index * math.prod(row_shape) * np.dtype(array.dtype).itemsize
        return ReadPlan(event_bytes, read)

    def rows_per_index(self, row_shape: tuple[int, ...]) -> int:
        """Rows per event: the declared frames per point, or 1 when the data key
        declares the row shape itself."""
        multiplier = self.parameters.get("multiplier")
        if multiplier is not None:
            return int(multiplier)
        declared = self.info.declared or ()
        if self.join_method == "concat" and declared:
            # Events are joined along the declared leading dimension: each is
            # shape[0] rows of the array.
            if declared[0] is not None and fits(declared[1:], row_shape):
                return int(declared[0])
        elif fits(declared, row_shape):
            return 1
        elif len(declared) == len(row_shape) + 1 and fits(declared[1:], row_shape):
            return 1 if declared[0] is None else int(declared[0])
        raise DataShapeError(
            f"stream_resource {self.uid!r}: {self.label} {self.name!r} holds rows of "
            f"shape {list(row_shape)}, but data key {self.key!r} declares shape "
            f"{list(declared)}, which is neither [frames per point, *row shape] nor the "
            f"row shape (join_method {self.join_method!r})"
        )


class HDF5Source(_RowSource):
    """A dataset of an HDF5 file (ophyd-async's HDF writers, ``SimBlobDetector``)."""

    mimetypes = frozenset({"application/x-hdf5", "application/x-hdf"})
    module = "h5py"
    extra = "hdf5"
    label = "an HDF5 dataset"
    name_parameter = "dataset"

    def _open(self) -> Any:
        import h5py

        def open_file(path: str) -> Any:
            return h5py.File(path, "r", swmr=True)

        try:
            file = self.external.shared_file(self.path, open_file)
        except OSError as err:
            raise ExternalFileError(
                f"stream_resource {self.uid!r} for data key {self.key!r} points to "
                f"{self.sres['uri']!r}; the HDF5 file {self.path} cannot be read here: "
                f"{err}; {REMOTE_HINT}"
            ) from err
        try:
            return file[self.name]
        except KeyError:
            raise ExternalFileError(
                f"stream_resource {self.uid!r}: the HDF5 file {self.path} has no dataset "
                f"{self.name!r}"
            ) from None

    def _check_rows(self, array: Any, first: int, last: int) -> None:
        check_hdf5_rows(array, self.path, first, last)

    def _refresh(self) -> None:
        if getattr(self.array.file, "swmr_mode", False):
            # The file grew since it was opened. Reads under way see the
            # dataset as it was: they finish before it is refreshed.
            self.external.wait_for_reads()
            self.array.refresh()


class ZarrSource(_RowSource):
    """An array of a Zarr store (V2 or V3), written by another writer that may
    still be writing it.

    ``path`` names the array inside the store; without it, the array is the
    store itself, else the one named after the data key, else ``<key>/0``
    (the full-resolution level of a multiscale image): the layout of a
    detector integration that writes every data key into one shared store
    with acquire-zarr.

    A live producer writes an array's ``zarr.json`` late: acquire-zarr
    rewrites it as whole shards complete (older releases only when the stream
    closes), after the frames a stream_datum already names. The rows a
    stream_datum asks for are bounded by its indices, not by that metadata:
    rows past the shape it states are read from the storage units (shards, or
    chunks) on disk as soon as every unit holding them is there and whole (a
    shard still being written fails its index checksum and is waited for).
    The reader thread waits for rows not yet written, for as long as new rows
    keep appearing; after :attr:`patience` seconds without one, the
    stream_datum fails with :class:`ExternalIndexError`. Nothing is read as a
    fill value in place of a frame that is not there.
    """

    mimetypes = frozenset({"application/x-zarr"})
    label = "the Zarr array"
    name_parameter = "path"
    #: Seconds a read waits for rows that a live producer has not written
    #: yet, counted from the last row that appeared.
    patience: ClassVar[float] = 30.0
    #: Seconds between looks at the store while waiting.
    poll: ClassVar[float] = 0.02

    def _default_name(self) -> str | None:
        return ""

    def _candidates(self) -> list[str]:
        if self.name_parameter in self.parameters:
            return [self.name]
        return ["", self.key, f"{self.key}/0"]

    def _locate(self) -> tuple[str, dict[str, Any]] | None:
        """The path and metadata (``zarr.json`` or ``.zarray``) of the array
        the stream_resource points to, if it is in the store yet."""
        for name in self._candidates():
            metadata = _array_metadata(self.path, name)
            if metadata is not None:
                return name, metadata
        return None

    def _open(self) -> Any:
        from ..storage import open_array

        found = self._locate()
        name = found[0] if found is not None else self.name
        try:
            return open_array(self.path, name)
        except (OSError, ValueError) as err:
            raise ExternalFileError(
                f"stream_resource {self.uid!r} for data key {self.key!r} points to the "
                f"Zarr array {name!r} in {self.sres['uri']!r} ({self.path}), which "
                f"cannot be read here: {err}; {REMOTE_HINT}"
            ) from err

    def plan(self, start: int, stop: int, uid: str) -> ReadPlan:
        if not os.path.isdir(self.path):
            raise ExternalFileError(
                f"stream_resource {self.uid!r} for data key {self.key!r} points to the "
                f"Zarr store {self.sres['uri']!r} ({self.path}), which does not exist "
                f"here; {REMOTE_HINT}"
            )
        if start < 0:
            raise ExternalIndexError(
                f"stream_datum {uid!r} asks for indices {start}..{stop} of stream_resource "
                f"{self.uid!r}: indices start at 0"
            )
        found = self._locate()
        declared = self.info.declared or ()
        if found is not None:
            # What can be refused now is: frames of another shape.
            row_shape = tuple(int(n) for n in found[1]["shape"][1:])
            self.rows_per_index(row_shape)
            itemsize = _itemsize(found[1])
        else:
            row_shape = tuple(int(n or 1) for n in declared[1:])
            itemsize = 8  # the batch size only; the array is not there yet
        event_bytes = max(1, math.prod(row_shape) * itemsize)

        def read(lo: int, hi: int) -> np.ndarray:
            return self._read_live(lo, hi, uid)

        return ReadPlan(event_bytes, read)

    def _read_live(self, lo: int, hi: int, uid: str) -> np.ndarray:
        """Events ``lo..hi``, once the producer has written them (the reader thread)."""
        waited_since = time.monotonic()
        best = -1
        while True:
            found = self._locate()
            if found is not None:
                name, metadata = found
                row_shape = tuple(int(n) for n in metadata["shape"][1:])
                per_index = self.rows_per_index(row_shape)
                first, last = lo * per_index, hi * per_index
                rows, available = self._rows(name, metadata, first, last)
                if rows is not None:
                    return self._frames(rows, hi - lo, per_index, row_shape)
                if available > best:
                    best, waited_since = available, time.monotonic()
            if time.monotonic() - waited_since > self.patience:
                break
            time.sleep(self.poll)
        if found is None:
            raise ExternalFileError(
                f"stream_datum {uid!r}: the Zarr store {self.path} has no array "
                f"{' or '.join(repr(c) for c in self._candidates())} for data key "
                f"{self.key!r} after {self.patience:g} s"
            )
        raise ExternalIndexError(
            f"stream_datum {uid!r} asks for rows {first}..{last} of the Zarr array "
            f"{name!r} in {self.path} ({per_index} rows per event for indices {lo}..{hi}), "
            f"which holds {max(best, 0)} rows, and no new row for {self.patience:g} s"
        )

    def _rows(
        self, name: str, metadata: Mapping[str, Any], first: int, last: int
    ) -> tuple[np.ndarray | None, int]:
        """Rows ``first..last`` if they are all on disk, whole (else None), and
        how many rows are readable so far.

        Rows inside the array's stated shape must be in the store: a storage
        unit missing there raises :class:`ExternalFileError` (the Zarr spec
        would read it as the fill value). Rows past it are the ones a live
        producer has not declared yet: read once every unit holding them is
        on disk and whole."""
        from ..storage import array_over, local_store, open_array

        stated = int(metadata["shape"][0])
        if last <= stated:
            array = open_array(self.path, name)
            self._check_units(array, name, first, last)
            return np.asarray(array[first:last]), stated
        if not _whole_when_present(metadata):
            return None, stated  # a unit being written could pass for a whole one
        # Past the stated shape: an array over the same metadata, as long as
        # the rows asked for.
        longer = {**metadata, "shape": [last, *metadata["shape"][1:]]}
        array = array_over(local_store(self.path), name, longer)
        self._check_units(array, name, first, min(last, stated))
        absent = self._first_absent_row(array, name, max(first, stated), last)
        if absent is not None:
            return None, absent
        try:
            return np.asarray(array[first:last]), last
        except ValueError:
            # A storage unit still being written (a shard whose index is not
            # there yet fails its checksum): not readable yet.
            return None, first

    def _units(self, array: Any, name: str, first: int, last: int) -> Iterator[tuple[int, str]]:
        """``(first row, file)`` of every storage unit (the shard, if sharded)
        holding rows ``first..last`` of ``array``."""
        from ..storage import chunk_key

        base = os.path.join(self.path, *[p for p in name.split("/") if p])
        unit = array.shards or array.chunks
        tiles = [range(0, n, c) for n, c in zip(array.shape[1:], unit[1:])]
        for row in range(first - first % unit[0], last, unit[0]):
            for tile in itertools.product(*tiles):
                coords = tuple(i // c for i, c in zip((row, *tile), unit))
                yield row, os.path.join(base, chunk_key(array, coords))

    def _check_units(self, array: Any, name: str, first: int, last: int) -> None:
        """Every chunk (shard, if sharded) file holding the rows is in the store.

        The Zarr spec reads a missing chunk as the fill value; a detector's
        frame that is not in the store is refused instead (a writer that
        skips chunks equal to the fill value leaves such a frame out too:
        it is refused as well, never claimed)."""
        if first >= last:
            return
        for row, path in self._units(array, name, first, last):
            if not os.path.isfile(path):
                key = os.path.relpath(path, os.path.join(self.path, name))
                raise ExternalFileError(
                    f"rows {first}..{last} of the Zarr array {name!r} in {self.path}: "
                    f"row {row} is in no chunk of the store ({key} is missing: not "
                    f"written, deleted, or left out as all fill value)"
                )

    def _first_absent_row(self, array: Any, name: str, first: int, last: int) -> int | None:
        """The first row of ``first..last`` whose storage unit is not on disk yet."""
        for row, path in self._units(array, name, first, last):
            if not os.path.isfile(path):
                return max(row, first)
        return None

    def _frames(
        self, rows: np.ndarray, events: int, per_index: int, row_shape: tuple[int, ...]
    ) -> np.ndarray:
        keeps_frame_dim = self._keeps_frame_dim(per_index, row_shape)
        frames = rows.reshape((events, per_index) + row_shape)
        return frames if keeps_frame_dim else frames[:, 0]


def _array_metadata(store: str, name: str) -> dict[str, Any] | None:
    """The metadata of the array ``name`` of a local Zarr store, V3
    (``zarr.json``) or V2 (``.zarray``), or None if no array is there (yet)."""
    folder = os.path.join(store, *[p for p in name.split("/") if p])
    for filename in ("zarr.json", ".zarray"):
        try:
            with open(os.path.join(folder, filename), "rb") as file:
                document = json.loads(file.read())
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            return None  # being written: looked at again
        if not isinstance(document, dict) or not isinstance(document.get("shape"), list):
            return None
        if filename == "zarr.json" and document.get("node_type") != "array":
            return None
        if not document["shape"]:
            return None
        return document
    return None


def _itemsize(metadata: Mapping[str, Any]) -> int:
    try:
        return max(1, np.dtype(metadata.get("data_type") or metadata.get("dtype")).itemsize)
    except TypeError:
        return 8


def _whole_when_present(metadata: Mapping[str, Any]) -> bool:
    """Whether a storage unit of this array that is on disk but still being
    written fails to decode, rather than passing for a whole one: chunks
    (compressed or of a fixed size), and shards whose index carries a
    checksum; not shards without one (their rows count as far as the
    metadata says)."""
    codecs = metadata.get("codecs")
    if not isinstance(codecs, list) or not codecs:
        return True  # V2: chunks
    first = codecs[0]
    if not isinstance(first, Mapping) or first.get("name") != "sharding_indexed":
        return True
    configuration = first.get("configuration") or {}
    return any(
        isinstance(codec, Mapping) and codec.get("name") == "crc32c"
        for codec in configuration.get("index_codecs", [])
    )


# ------------------------------------------------------------ file sequences
class _FileSequence(FrameSource):
    """One file per frame (or per ``chunk_shape[0]`` frames), named by a template."""

    def __init__(self, sres: Mapping[str, Any], info: StreamKey, external: FileContext):
        super().__init__(sres, info, external)
        self.base = external.uri_path(sres)
        self.template = str(self.parameters["template"])
        #: Files per event, settled at the first stream_datum.
        self.files_per_event: int | None = None

    @classmethod
    def check_document(cls, sres: Mapping[str, Any]) -> None:
        super().check_document(sres)
        template = (sres.get("parameters") or {}).get("template")
        try:
            if not isinstance(template, str):
                raise TypeError(template)
            if template.format(0) == template.format(1):
                raise ValueError(template)  # every file would have the same name
        except (TypeError, ValueError, IndexError, KeyError):
            raise DocumentError(
                f"stream_resource {sres.get('uid')!r} ({sres.get('mimetype')}): parameters "
                f"must hold a 'template' that names each file from its number, like "
                f"'scan_{{:06d}}.tiff', got {template!r}"
            ) from None

    def file(self, number: int) -> str:
        tail = self.template.format(number)
        if self.base.endswith("/") and tail.startswith("/"):
            tail = tail[1:]
        return self.base + tail

    # What each format provides.
    def _header(self, path: str) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype of the frames in one file, without reading them."""
        raise NotImplementedError

    def _load(self, path: str) -> np.ndarray:
        raise NotImplementedError

    def _file_error(self, path: str, err: OSError) -> ExternalFileError:
        return ExternalFileError(
            f"stream_resource {self.uid!r} for data key {self.key!r}: the {self.label} "
            f"file {path} cannot be read here: {err}; {REMOTE_HINT}"
        )

    def _decode_error(self, path: str, err: Exception) -> ExternalFileError:
        return ExternalFileError(
            f"stream_resource {self.uid!r} for data key {self.key!r}: the file {path} "
            f"is not a readable {self.label} file: {err}"
        )

    def header(self, path: str) -> tuple[tuple[int, ...], np.dtype]:
        try:
            return self._header(path)
        except OSError as err:
            raise self._file_error(path, err) from err
        except ValueError as err:  # a truncated or foreign file (tifffile, numpy)
            raise self._decode_error(path, err) from err

    def load(self, path: str) -> np.ndarray:
        try:
            return np.asarray(self._load(path))
        except OSError as err:
            raise self._file_error(path, err) from err
        except ValueError as err:
            raise self._decode_error(path, err) from err

    def _settle_files_per_event(self, uid: str) -> int:
        """How many files each event spans: from ``files_per_datum`` or
        ``chunk_shape``, else from the frames in the resource's first file."""
        declared = self.info.declared
        explicit = self.parameters.get("files_per_datum")
        if explicit is not None:
            return int(explicit)
        if not declared or declared[0] is None:
            return 1
        frames = int(declared[0])
        per_file = None
        chunk = valid_chunk_shape(self.sres)
        if chunk is not None:
            if self.join_method == "concat" or (
                len(chunk) == len(declared) and fits(declared[1:], chunk[1:])
            ):
                per_file = chunk[0]
            elif len(chunk) == len(declared) - 1 and fits(declared[1:], chunk):
                per_file = 1
        if per_file is None:
            shape, _ = self.header(self.file(0))
            per_file = shape[0] if len(shape) == len(declared) else 1
        if per_file < 1 or frames % per_file:
            raise DataShapeError(
                f"stream_resource {self.uid!r}: each file holds {per_file} frames, which "
                f"does not divide the {frames} frames per event that data key "
                f"{self.key!r} declares (shape {list(declared)})"
            )
        return frames // per_file

    def _check_file_shape(self, path: str, shape: tuple[int, ...]) -> None:
        declared = self.info.declared
        if not declared:
            return
        frame = declared[1:]
        if fits(frame, shape) or (len(shape) == len(declared) and fits(frame, shape[1:])):
            return
        if len(shape) >= 1 and fits(frame, shape[-1:] + shape[:-1]):
            return  # colour last in the file, first in the data key
        raise DataShapeError(
            f"stream_resource {self.uid!r}: the file {path} holds an array of shape "
            f"{list(shape)}, but data key {self.key!r} declares frames of shape "
            f"{list(frame)} (shape {list(declared)})"
        )

    def plan(self, start: int, stop: int, uid: str) -> ReadPlan:
        if self.files_per_event is None:
            self.files_per_event = self._settle_files_per_event(uid)
        per_event = self.files_per_event
        if start == stop:
            return ReadPlan(0, lambda lo, hi: np.empty((0,)))
        first = self.file(start * per_event)
        shape, dtype = self.header(first)
        self._check_file_shape(first, shape)
        last = self.file(stop * per_event - 1)
        if not os.path.exists(last):
            raise ExternalFileError(
                f"stream_datum {uid!r} asks for events {start}..{stop} of stream_resource "
                f"{self.uid!r}, but their last file {last} does not exist here; "
                f"{REMOTE_HINT}"
            )

        def read(lo: int, hi: int) -> np.ndarray:
            return np.stack([self._event(i) for i in range(lo, hi)])

        event_bytes = per_event * math.prod(shape) * dtype.itemsize
        return ReadPlan(event_bytes, read)

    def _event(self, index: int) -> np.ndarray:
        """The stored value of one event, from its files."""
        per_event = self.files_per_event or 1
        declared = self.info.declared
        parts = []
        for number in range(index * per_event, (index + 1) * per_event):
            path = self.file(number)
            array = self.load(path)
            self._check_file_shape(path, array.shape)
            parts.append(self._as_frames(array))
        if not declared:
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
        value = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if not fits(declared, value.shape):
            raise DataShapeError(
                f"stream_resource {self.uid!r}: the files of event {index} "
                f"({self.file(index * per_event)} ...) hold {list(value.shape)}, but data "
                f"key {self.key!r} declares shape {list(declared)}"
            )
        return value[0] if self.info.squeezed else value

    def _as_frames(self, array: np.ndarray) -> np.ndarray:
        """One file's array as ``(frames, *frame shape)``."""
        declared = self.info.declared
        if not declared:
            return array
        frame = declared[1:]
        if fits(frame, array.shape):
            return array[np.newaxis]
        if len(array.shape) == len(declared) and fits(frame, array.shape[1:]):
            return array
        # Colour stored last (a JPEG's height, width, bands), declared first.
        return np.moveaxis(array, -1, 0)[np.newaxis]


class TIFFSource(_FileSequence):
    """TIFF files (areaDetector's NDFileTIFF), read with tifffile; a multi-page
    file holds several frames."""

    mimetypes = frozenset({"multipart/related;type=image/tiff"})
    module = "tifffile"
    label = "TIFF"

    def _header(self, path: str) -> tuple[tuple[int, ...], np.dtype]:
        import tifffile

        with _tiff_errors_as_value_errors(), tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return tuple(series.shape), np.dtype(series.dtype)

    def _load(self, path: str) -> np.ndarray:
        import tifffile

        with _tiff_errors_as_value_errors():
            return np.asarray(tifffile.imread(path))


@contextlib.contextmanager
def _tiff_errors_as_value_errors() -> Iterator[None]:
    """tifffile's error for a file that is not a TIFF, raised as the ValueError
    it is from tifffile 2025.10 on (before, it subclasses Exception only)."""
    import tifffile

    try:
        yield
    except tifffile.TiffFileError as err:
        if isinstance(err, ValueError):
            raise
        raise ValueError(str(err)) from err


#: Pillow image modes: numpy dtype of a pixel band.
_PIL_DTYPES = {"1": "bool", "I;16": "uint16", "I;16B": ">u2", "I": "int32", "F": "float32"}


class JPEGSource(_FileSequence):
    """JPEG files (areaDetector's NDFileJPEG), decoded with Pillow."""

    mimetypes = frozenset({"multipart/related;type=image/jpeg"})
    module = "PIL"
    label = "JPEG"

    def _header(self, path: str) -> tuple[tuple[int, ...], np.dtype]:
        from PIL import Image

        with Image.open(path) as image:
            width, height = image.size
            bands = len(image.getbands())
            dtype = np.dtype(_PIL_DTYPES.get(image.mode, "uint8"))
        return ((height, width) if bands == 1 else (height, width, bands)), dtype

    def _load(self, path: str) -> np.ndarray:
        from PIL import Image

        with Image.open(path) as image:
            return np.asarray(image)


class NPYSource(_FileSequence):
    """NumPy ``.npy`` files, one per frame."""

    mimetypes = frozenset({"multipart/related;type=application/x-npy"})
    label = "NPY"

    def _header(self, path: str) -> tuple[tuple[int, ...], np.dtype]:
        with open(path, "rb") as file:
            version = np.lib.format.read_magic(file)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(file)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(file)
            else:
                array = self._load(path)
                shape, dtype = array.shape, array.dtype
        return tuple(shape), np.dtype(dtype)

    def _load(self, path: str) -> np.ndarray:
        return np.load(path, allow_pickle=False)


#: Every format read, by mimetype.
SOURCES: dict[str, type[FrameSource]] = {
    mimetype: source
    for source in (HDF5Source, ZarrSource, TIFFSource, JPEGSource, NPYSource)
    for mimetype in source.mimetypes
}


def normalize_mimetype(mimetype: Any) -> str:
    """``"Multipart/Related; type=image/tiff"`` → ``"multipart/related;type=image/tiff"``."""
    return ";".join(part.strip() for part in str(mimetype).lower().split(";"))


def source_class(mimetype: Any) -> type[FrameSource] | None:
    return SOURCES.get(normalize_mimetype(mimetype))
