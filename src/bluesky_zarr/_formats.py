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
  at ``uri`` (V2 or V3), rows as for HDF5.
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
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ._errors import (
    DataShapeError,
    DocumentError,
    ExternalFileError,
    ExternalIndexError,
    MissingDependencyError,
)

if TYPE_CHECKING:
    from ._external import ExternalData, StreamKey

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

    def __init__(self, sres: Mapping[str, Any], info: StreamKey, external: ExternalData):
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


# ---------------------------------------------------------------- row arrays
class _RowSource(FrameSource):
    """A growing array (HDF5 dataset, Zarr array) whose rows are frames."""

    #: The parameter naming the array inside the file or store.
    name_parameter: ClassVar[str] = ""

    def __init__(self, sres: Mapping[str, Any], info: StreamKey, external: ExternalData):
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
        info = self.info
        keeps_frame_dim = (
            not info.squeezed
            and info.declared is not None
            and len(info.declared) == len(row_shape) + 1
        )
        if not keeps_frame_dim and per_index != 1:
            raise DataShapeError(
                f"stream_resource {self.uid!r}: {per_index} rows per event, but data key "
                f"{self.key!r} declares shape {list(info.declared or [])}, one frame per event"
            )

        def read(lo: int, hi: int) -> np.ndarray:
            rows = np.asarray(array[lo * per_index : hi * per_index])
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

    def _refresh(self) -> None:
        if getattr(self.array.file, "swmr_mode", False):
            # The file grew since it was opened. Reads under way see the
            # dataset as it was: they finish before it is refreshed.
            self.external.wait_for_reads()
            self.array.refresh()


class ZarrSource(_RowSource):
    """An array of a Zarr store (V2 or V3); ``path`` names it inside the store
    (absent: the store is the array)."""

    mimetypes = frozenset({"application/x-zarr"})
    label = "the Zarr array"
    name_parameter = "path"

    def _default_name(self) -> str | None:
        return ""

    def _open(self) -> Any:
        from . import _zarr

        try:
            return _zarr.open_array(self.path, self.name or "")
        except (OSError, ValueError) as err:
            raise ExternalFileError(
                f"stream_resource {self.uid!r} for data key {self.key!r} points to the "
                f"Zarr array {self.name!r} in {self.sres['uri']!r} ({self.path}), which "
                f"cannot be read here: {err}; {REMOTE_HINT}"
            ) from err

    def _refresh(self) -> None:
        # A new handle sees the array's current shape; reads under way keep
        # the old one, which stays valid for the rows it had.
        self.array = self._open()


# ------------------------------------------------------------ file sequences
class _FileSequence(FrameSource):
    """One file per frame (or per ``chunk_shape[0]`` frames), named by a template."""

    def __init__(self, sres: Mapping[str, Any], info: StreamKey, external: ExternalData):
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
