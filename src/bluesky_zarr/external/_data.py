"""External data: frames that events point to instead of carrying them.

Two conventions exist, and a run may use both:

* **resource / datum** (ophyd v1 detectors): an event's value for an
  ``external`` data key is a datum id. The datum names a resource (a file or
  a file series, with a ``spec`` naming its format) and the keyword arguments
  that pick one frame. Frames are read with *handlers*, following the
  ``event_model.Filler`` convention: ``handler_class(full_path,
  **resource_kwargs)`` makes a handler for a resource, ``handler(**datum_kwargs)``
  returns the frame.
* **stream_resource / stream_datum** (ophyd-async detectors): events carry no
  value for a data key whose ``external`` is ``"STREAM:"``. A stream_resource
  names where the frames are (an HDF5 dataset, a Zarr array, or a series of
  TIFF, JPEG or NPY files: see ``_formats``); each stream_datum maps the
  ``indices`` of that resource onto the events ``seq_nums`` of one stream. One
  index is one event: with ``k`` frames per point it spans ``k`` rows of the
  dataset (or ``k`` files of a series).

With ``external="fill"`` (the default) the frames are read and written into
the cube at their points, like frames that travel inside events. What a
stream_datum asks for is checked at the document (the file, the rows it
names); its rows are then read on a reader thread, in batches, off the
RunEngine's thread, and a read that fails is raised at the next document.
Handlers of resource/datum documents run at the document.

With ``external="reference"`` nothing is read: the documents are recorded in
the stream group's ``external`` attribute, and the points stay unwritten
(``_written`` False) for a later pass to fill.

**Frames per point.** ophyd-async declares a stream data key's shape as
``[frames per point, *frame shape]``, so a step scan of a 240×320 camera
declares ``[1, 240, 320]``. A leading size-1 dimension is dropped: over a
stage scan the array is ``(stage_x, stage_y, y, x)``, and
``sel(stage_x=..., stage_y=...)`` gives the image, which is what a scientist
plots or fits (a stack of one image only adds ``[0]`` everywhere).
When a detector takes several frames per point, the dimension is kept and
named ``frame``: ``(time, frame, y, x)``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
from event_model import unpack_datum_page

from .._errors import (
    DocumentError,
    DocumentOrderError,
    ExternalDataError,
    ExternalFileError,
    ExternalIndexError,
    HandlerError,
    UnknownSpecError,
)
from ..plan import json_safe
from ._formats import REMOTE_HINT, SOURCES, FrameSource, HDF5Source, source_class
from ._handlers import DEFAULT_HANDLERS, VIRTUAL_HANDLERS, AreaDetectorHDF5Handler
from ._keys import (
    STREAM_EXTERNAL,
    StreamKey,
    is_datum_key,
    is_stream_key,
    layout_data_key,
)
from ._target import ExternalOptions, ExternalRun, FrameTarget

#: Most bytes read from a file at once: a stream_datum of many frames is read
#: and buffered in batches of this size.
READ_BATCH_BYTES = 64 * 2**20

#: Mimetypes of stream resources this package reads (see ``_formats``).
STREAM_MIMETYPES = frozenset(SOURCES)

_REMOTE_HINT = REMOTE_HINT




@dataclass
class _References:
    """What one stream group's ``external`` attribute records."""

    resource: dict[str, Any] = field(default_factory=dict)
    datum: dict[str, Any] = field(default_factory=dict)
    stream_resource: dict[str, Any] = field(default_factory=dict)
    stream_datum: list[Any] = field(default_factory=list)
    event_datum: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    #: Something is not yet in the attribute.
    dirty: bool = False
    #: A resource is not yet in the attribute: resources are few and say
    #: where the data is, so they are written at once.
    urgent: bool = False

    def add_resource(self, kind: str, uid: str, doc: Any) -> None:
        table = self.resource if kind == "resource" else self.stream_resource
        if uid not in table and doc is not None:
            table[uid] = doc
            self.dirty = self.urgent = True

    def as_attrs(self, mode: str) -> dict[str, Any]:
        attrs: dict[str, Any] = {"mode": mode, "resource": list(self.resource.values())}
        attrs["stream_resource"] = list(self.stream_resource.values())
        if mode == "reference":
            attrs["datum"] = list(self.datum.values())
            attrs["stream_datum"] = self.stream_datum
            attrs["event_datum"] = self.event_datum
        return attrs


class _Mode:
    """What a run does with the frames documents point to (``external=``),
    chosen once when the run opens: read them into the cube (``fill``),
    record the documents (``reference``), or reference the frames in place
    where they map (``virtual``)."""

    name = "fill"
    #: Whether frames are read here (their handler or format must be known).
    reads = True
    #: Handlers the mode adds to the defaults, by spec.
    handlers: Mapping[str, Any] = {}

    def datums(
        self,
        data: ExternalData,
        stream: FrameTarget,
        page: Mapping[str, Any],
        key: str,
        values: list[Any],
        todo: list[int],
    ) -> bool:
        """Take the datum ids ``values[todo]`` of ``key`` without reading
        them; False if they are to be read into the page."""
        return False

    def placer(
        self,
        data: ExternalData,
        sres: Mapping[str, Any],
        info: StreamKey,
        stream: FrameTarget,
        key: str,
        start: int,
        stop: int,
        index: tuple[np.ndarray, ...],
    ) -> Callable[[], str | None] | None:
        """What places the rows of a stream_datum in place of reading them
        (returns why it could not), or None: they are read."""
        return None


class _Reference(_Mode):
    name = "reference"
    reads = False

    def datums(
        self,
        data: ExternalData,
        stream: FrameTarget,
        page: Mapping[str, Any],
        key: str,
        values: list[Any],
        todo: list[int],
    ) -> bool:
        seq_nums = page.get("seq_num", [])
        record = data._record(stream.name)
        column = record.event_datum.setdefault(key, {"seq_num": [], "datum_id": []})
        for i in todo:
            datum = data._datum(values[i], key)
            record.datum[datum["datum_id"]] = datum
            record.add_resource(
                "resource", datum["resource"], data.resources.get(datum["resource"])
            )
            column["seq_num"].append(int(seq_nums[i]))
            column["datum_id"].append(values[i])
        record.dirty = True
        # The points stay unwritten: the frames are elsewhere.
        return True


class _Virtual(_Mode):
    name = "virtual"
    handlers = VIRTUAL_HANDLERS

    def datums(
        self,
        data: ExternalData,
        stream: FrameTarget,
        page: Mapping[str, Any],
        key: str,
        values: list[Any],
        todo: list[int],
    ) -> bool:
        # Area-detector HDF5 frames in place (_virtual), where they map.
        return len(todo) == len(values) and data._datums_virtual(stream, page, key, values)

    def placer(
        self,
        data: ExternalData,
        sres: Mapping[str, Any],
        info: StreamKey,
        stream: FrameTarget,
        key: str,
        start: int,
        stop: int,
        index: tuple[np.ndarray, ...],
    ) -> Callable[[], str | None] | None:
        def place() -> str | None:
            return data._place_virtual(sres, info, stream, key, start, stop, index)

        return place


#: The modes by their ``external=`` name.
MODES: dict[str, _Mode] = {mode.name: mode for mode in (_Mode(), _Reference(), _Virtual())}


class ExternalData:
    """Resolves the external data of one run and hands frames to its streams."""

    def __init__(self, run: ExternalRun, options: ExternalOptions) -> None:
        self.run = run
        self.mode = MODES[options.mode]
        self.flush_interval = options.flush_interval
        self.handlers: dict[str, Any] = {
            **self.mode.handlers, **DEFAULT_HANDLERS, **options.handler_registry
        }
        self.root_map: Mapping[str, str] = options.root_map
        self.resources: dict[str, Mapping[str, Any]] = {}
        self.datums: dict[str, Mapping[str, Any]] = {}
        self.stream_resources: dict[str, Mapping[str, Any]] = {}
        self._handler_instances: dict[str, Any] = {}
        #: Files opened for reading, shared by the stream resources in them.
        self._files: dict[str, Any] = {}
        #: The reader of each stream_resource whose frames are read.
        self._sources: dict[str, FrameSource] = {}
        #: Per stream: its datum-external keys, and its stream-external keys.
        self.datum_keys: dict[str, set[str]] = {}
        self.stream_keys: dict[str, dict[str, StreamKey]] = {}
        #: Streams whose every data key is stream-external: no event may come
        #: for their points, so stream_datum documents also give seq_num.
        self.stream_only: set[str] = set()
        self.references: dict[str, _References] = {}
        self._lock = threading.Lock()
        self._last_written = time.monotonic()
        #: The frames of stream_datum documents, read on the writer's reader
        #: thread, off the RunEngine's: what is pending, and what failed.
        #: external="virtual": frames referenced in place (``_virtual``).
        self._virtual_frames: Any = None

    # ---------------------------------------------------------- descriptors
    def layout_descriptor(self, stream: str, doc: Mapping[str, Any]) -> Mapping[str, Any]:
        """The descriptor as arrays are laid out from it; notes its external keys."""
        data_keys = doc.get("data_keys")
        if not isinstance(data_keys, Mapping):
            return doc
        laid_out: dict[str, Any] = {}
        datum_keys: set[str] = set()
        stream_keys: dict[str, StreamKey] = {}
        for key, data_key in data_keys.items():
            if isinstance(data_key, Mapping) and is_stream_key(data_key):
                laid_out[key], stream_keys[key] = layout_data_key(key, data_key)
            else:
                laid_out[key] = data_key
                if isinstance(data_key, Mapping) and is_datum_key(data_key):
                    datum_keys.add(key)
        self.datum_keys[stream] = datum_keys
        self.stream_keys[stream] = stream_keys
        if stream_keys and len(stream_keys) == len(data_keys):
            self.stream_only.add(stream)
        if not datum_keys and not stream_keys:
            return doc
        return {**doc, "data_keys": laid_out}

    # --------------------------------------------------- resource and datum
    def resource(self, doc: Mapping[str, Any]) -> None:
        uid = _field(doc, "uid", "resource")
        spec = _field(doc, "spec", "resource")
        if self.mode.reads and spec not in self.handlers:
            raise UnknownSpecError(
                f"resource {uid!r} has spec {spec!r}, for which no handler is "
                f"registered (registered: {sorted(self.handlers)}); pass "
                f"handler_registry={{{spec!r}: HandlerClass}} to ZarrWriter, or "
                f"external='reference' to record the references instead"
            )
        self.resources[uid] = doc

    def datum_page(self, doc: Mapping[str, Any]) -> None:
        for datum in unpack_datum_page(doc):  # type: ignore[arg-type]
            self.datums[_field(datum, "datum_id", "datum")] = datum

    def fill_page(self, stream: FrameTarget, page: Mapping[str, Any]) -> Mapping[str, Any]:
        """The event page with frames in place of datum ids (or, to reference
        them, without the datum-external columns)."""
        keys = self.datum_keys.get(stream.name)
        data = page.get("data")
        if not keys or not isinstance(data, Mapping):
            return page
        filled_flags = page.get("filled") or {}
        new_data = dict(data)
        for key in keys:
            if key not in data:
                continue
            values = list(data[key])
            flags = filled_flags.get(key)
            flags = [False] * len(values) if flags is None else list(flags)
            # A value that is not a datum id is the data itself (filled upstream).
            todo = [
                i for i, done in enumerate(flags) if not done and isinstance(values[i], str)
            ]
            if not todo:
                continue
            if self.mode.datums(self, stream, page, key, values, todo):
                del new_data[key]
                continue
            declared = next(
                (a.frame_shape for a in stream.layout.arrays.values() if a.key == key), None
            )
            for i in todo:
                value = self._read_datum(values[i], key, stream)
                if declared is not None and value.shape == (1, *declared):
                    # Area-detector handlers return (frames per point, *frame).
                    value = value[0]
                values[i] = value
            new_data[key] = values
        self.write_references(force=False)
        return {**page, "data": new_data}

    def _datums_virtual(
        self, stream: FrameTarget, page: Mapping[str, Any], key: str, datum_ids: list[Any]
    ) -> bool:
        """external="virtual": reference the frames of area-detector HDF5 datums
        in place; False if they must be copied (``_virtual`` records why)."""
        from ._virtual import VirtualFrames

        datums = [self._datum(d, key) for d in datum_ids]
        resources = [self.resources.get(d["resource"]) for d in datums]
        if any(
            r is None or r.get("spec") not in AreaDetectorHDF5Handler.specs for r in resources
        ):
            return False
        if self._virtual_frames is None:
            self._virtual_frames = VirtualFrames(self.run)
        index = self.run.point_index(stream, np.asarray(page.get("seq_num", [])))
        spec = next(a for a in stream.layout.arrays.values() if a.key == key)
        paths: list[str] = []
        specs: list[Any] = []
        for i, (datum, resource) in enumerate(zip(datums, resources)):
            assert resource is not None
            per_point = int((resource.get("resource_kwargs") or {}).get("frame_per_point", 1))
            point = int((datum.get("datum_kwargs") or {}).get("point_number", -1))
            if self._virtual_frames.settled_copied(stream, key):
                return False
            # The handler's file: the one handle to it (HDF5 misbehaves with two).
            handler = self._handler(resource["uid"], stream)
            if not isinstance(handler, AreaDetectorHDF5Handler):
                return False  # a handler of the user's: it reads the frames
            path, dataset = handler.path, handler.dataset
            if (point + 1) * per_point > dataset.shape[0] and handler.file.swmr_mode:
                dataset.refresh()
            row_shape = tuple(dataset.shape[1:])
            keeps = (
                per_point != 1 if spec.frame_shape is None
                else len(spec.frame_shape) == len(row_shape) + 1
            )
            info = StreamKey(((per_point,) if keeps else (1,)) + row_shape, not keeps)
            if point < 0 or (point + 1) * per_point > dataset.shape[0]:
                return False  # the handler's read says what is wrong
            planned = self._virtual_frames.prepare(
                stream, key, dataset, path, info, per_point, point, point + 1,
                tuple(ix[i : i + 1] for ix in index),
            )
            if isinstance(planned, str):
                return False
            paths.append(path)
            specs.extend(planned)
            self._record(stream.name).add_resource("resource", resource["uid"], resource)
        self._virtual_frames.apply(stream, key, sorted(set(paths)), specs, index)
        return True

    def _datum(self, datum_id: Any, key: str) -> Mapping[str, Any]:
        datum = self.datums.get(datum_id) if isinstance(datum_id, str) else None
        if datum is None:
            raise DocumentOrderError(
                f"an event gives data key {key!r} the datum id {datum_id!r}, but no "
                f"datum document with that id came before it"
            )
        return datum

    def _read_datum(self, datum_id: Any, key: str, stream: FrameTarget) -> np.ndarray:
        datum = self._datum(datum_id, key)
        resource_uid = datum["resource"]
        handler = self._handler(resource_uid, stream)
        kwargs = datum.get("datum_kwargs") or {}
        try:
            value = handler(**kwargs)
        except ExternalDataError as err:  # the handler's own: with the datum it was for
            raise type(err)(
                f"data key {key!r}: datum {datum_id!r} ({dict(kwargs)}) of resource "
                f"{resource_uid!r}: {err}"
            ) from err
        except OSError as err:
            raise ExternalFileError(
                f"data key {key!r}: reading datum {datum_id!r} ({dict(kwargs)}) of "
                f"resource {resource_uid!r} failed: {err}; {_REMOTE_HINT}"
            ) from err
        except IndexError as err:
            raise ExternalIndexError(
                f"data key {key!r}: datum {datum_id!r} ({dict(kwargs)}) points outside "
                f"what resource {resource_uid!r} holds: {err}"
            ) from err
        except Exception as err:
            raise HandlerError(
                f"data key {key!r}: the {type(handler).__name__} handler failed on "
                f"datum {datum_id!r} ({dict(kwargs)}): {err!r}"
            ) from err
        return np.asarray(value)

    def _handler(self, resource_uid: str, stream: FrameTarget) -> Any:
        handler = self._handler_instances.get(resource_uid)
        if handler is not None:
            return handler
        resource = self.resources.get(resource_uid)
        if resource is None:
            raise DocumentOrderError(
                f"a datum refers to resource {resource_uid!r}, which this run has not seen"
            )
        spec = resource["spec"]
        handler_class = self.handlers.get(spec)
        if handler_class is None:
            raise UnknownSpecError(
                f"resource {resource_uid!r} has spec {spec!r}, for which no handler is "
                f"registered (registered: {sorted(self.handlers)})"
            )
        path = self.resource_path(resource)
        kwargs = resource.get("resource_kwargs") or {}
        try:
            handler = handler_class(path, **kwargs)
        except OSError as err:
            raise ExternalFileError(
                f"resource {resource_uid!r} (spec {spec!r}) at {path!r} cannot be "
                f"opened: {err}; {_REMOTE_HINT}"
            ) from err
        except Exception as err:
            raise HandlerError(
                f"handler {handler_class!r} for spec {spec!r} failed to open resource "
                f"{resource_uid!r} at {path!r} with {dict(kwargs)}: {err!r}"
            ) from err
        self._handler_instances[resource_uid] = handler
        self._record(stream.name).add_resource("resource", resource_uid, resource)
        return handler

    def resource_path(self, resource: Mapping[str, Any]) -> str:
        """The resource's full path here: its ``root`` (mapped by ``root_map``)
        joined with its ``resource_path``."""
        root = str(resource.get("root") or "")
        root = self.root_map.get(root, root)
        path = str(resource.get("resource_path", ""))
        return os.path.join(root, path) if root else path

    # ------------------------------------------ stream_resource, stream_datum
    def stream_resource(self, doc: Mapping[str, Any]) -> None:
        uid = _field(doc, "uid", "stream_resource")
        _field(doc, "data_key", "stream_resource")
        mimetype = _field(doc, "mimetype", "stream_resource")
        if self.mode.reads:
            source = source_class(mimetype)
            if source is None:
                raise UnknownSpecError(
                    f"stream_resource {uid!r} has mimetype {mimetype!r}; this writer reads "
                    f"{sorted(STREAM_MIMETYPES)} (pass external='reference' to record the "
                    f"references instead)"
                )
            if not isinstance(doc.get("parameters", {}), Mapping):
                raise DocumentError(
                    f"stream_resource {uid!r}: parameters must be a mapping, got "
                    f"{doc.get('parameters')!r}"
                )
            source.check_document(doc)
            self._refuse_own_store(doc)
        self.stream_resources[uid] = doc

    def _refuse_own_store(self, sres: Mapping[str, Any]) -> None:
        """Refuse a stream_resource whose files lie inside this run's own
        store: the writer would read back its own arrays (fill values where
        nothing is on disk yet) as the detector's frames."""
        store = self.run.path
        if not isinstance(store, Path):
            return  # object storage: a file:// URI cannot point into it
        target = Path(os.path.realpath(self.uri_path(sres)))
        own = Path(os.path.realpath(store))
        if target == own or own in target.parents:
            raise DocumentError(
                f"stream_resource {sres.get('uid')!r} for data key {sres.get('data_key')!r} "
                f"points to {sres.get('uri')!r}, inside this run's own store {store}; "
                f"the detector's files must lie elsewhere"
            )

    def stream_datum(self, doc: Mapping[str, Any]) -> None:
        uid = _field(doc, "uid", "stream_datum")
        sres_uid = _field(doc, "stream_resource", "stream_datum")
        descriptor = _field(doc, "descriptor", "stream_datum")
        stream = self.run.descriptors.get(descriptor)
        sres = self.stream_resources.get(sres_uid)
        if stream is None or sres is None:
            missing = (
                f"descriptor {descriptor!r}" if stream is None
                else f"stream_resource {sres_uid!r}"
            )
            raise DocumentOrderError(
                f"stream_datum {uid!r} refers to {missing}, which this run has not seen"
            )
        seq_start, seq_stop = _range(doc, "seq_nums", uid)
        start, stop = _range(doc, "indices", uid)
        if seq_stop - seq_start != stop - start:
            raise DocumentError(
                f"stream_datum {uid!r}: seq_nums {seq_start}..{seq_stop} and indices "
                f"{start}..{stop} must span as many events"
            )
        if seq_start < 1:
            raise DocumentError(
                f"stream_datum {uid!r}: seq_nums must start at >= 1, got {seq_start}"
            )
        key = sres["data_key"]
        info = self.stream_keys.get(stream.name, {}).get(key)
        if info is None:
            raise DocumentError(
                f"stream_datum {uid!r} gives data key {key!r}, which stream "
                f"{stream.name!r} does not declare as external {STREAM_EXTERNAL!r}"
            )
        record = self._record(stream.name)
        record.add_resource("stream_resource", sres_uid, sres)
        seq_nums = np.arange(seq_start, seq_stop, dtype=np.int64)
        index = self.run.point_index(stream, seq_nums)
        stream.note_points(index, descriptor)
        if not self.mode.reads:
            record.stream_datum.append(doc)
            record.dirty = True
        else:
            # What can be refused is checked here, at the document; the rows
            # are read in the background, in batches (unless the mode places
            # them otherwise: referenced in place where they map).
            batches = self._read_rows(sres, info, start, stop, uid)
            place = self.mode.placer(self, sres, info, stream, key, start, stop, index)
            self._read_later(doc, stream, key, index, batches, place)
        if stream.name in self.stream_only and seq_nums.size:
            # No event will say when these points were taken: time stays NaN.
            with self.run.buffer_lock:
                stream.put_points(index, seq_nums, np.full(seq_nums.shape, np.nan))
        self.write_references(force=False)

    def _place_virtual(
        self,
        sres: Mapping[str, Any],
        info: StreamKey,
        stream: FrameTarget,
        key: str,
        start: int,
        stop: int,
        index: tuple[np.ndarray, ...],
    ) -> str | None:
        """external="virtual": reference the rows in place (``_virtual``);
        returns why they must be copied instead, or None."""
        from ._virtual import VirtualFrames

        source = self._sources.get(sres["uid"])
        if not isinstance(source, HDF5Source) or source.array is None:
            return f"{sres['mimetype']} frames are not HDF5 datasets: they are copied"
        if self._virtual_frames is None:
            self._virtual_frames = VirtualFrames(self.run)
        dataset = source.array
        per_index = source.rows_per_index(tuple(dataset.shape[1:]))
        return self._virtual_frames.place(
            stream, key, dataset, source.path, info, per_index, start, stop, index
        )

    def _read_later(
        self,
        doc: Mapping[str, Any],
        stream: FrameTarget,
        key: str,
        index: tuple[np.ndarray, ...],
        batches: Iterator[tuple[int, np.ndarray]],
        place: Callable[[], str | None] | None = None,
    ) -> None:
        """Read ``batches`` on the writer's reader thread and place their frames
        (unless ``place``, run there first, references them and returns None)."""

        def read() -> None:
            try:
                if place is not None and place() is None:
                    return
                for offset, frames in batches:
                    part = tuple(ix[offset : offset + len(frames)] for ix in index)
                    with self.run.buffer_lock:
                        stream.put_frames(key, part, list(frames))
            except Exception as err:
                failure = err
                if not isinstance(err, ExternalDataError):
                    failure = ExternalFileError(f"{what} failed: {err!r}")
                    failure.__cause__ = err
                self.run.refuse("stream_datum", doc, failure)
                raise failure from err

        what = f"reading the frames of stream_datum {doc.get('uid')!r}"
        self.run.reads.submit(0, read, 0, what, lambda: None)

    def wait_for_reads(self) -> None:
        """Wait until the frames of every stream_datum so far are placed."""
        self.run.reads.drain()

    def _read_rows(
        self, sres: Mapping[str, Any], info: StreamKey, start: int, stop: int, uid: str
    ) -> Iterator[tuple[int, np.ndarray]]:
        """The frames of events ``start..stop``, in batches of at most
        :data:`READ_BATCH_BYTES`: ``(offset of the batch, (events, *stored frame
        shape))``. The whole range is checked now; the rows are read as the
        batches are taken."""
        source = self._sources.get(sres["uid"])
        if source is None:
            source_type = source_class(sres["mimetype"])
            if source_type is None:  # refused at the stream_resource already
                raise UnknownSpecError(
                    f"stream_resource {sres['uid']!r} has mimetype {sres['mimetype']!r}"
                )
            source = self._sources[sres["uid"]] = source_type(sres, info, self)
        plan = source.plan(start, stop, uid)
        batch = max(1, READ_BATCH_BYTES // max(1, plan.event_bytes))

        def batches() -> Iterator[tuple[int, np.ndarray]]:
            for lo in range(start, stop, batch):
                hi = min(stop, lo + batch)
                yield lo - start, plan.read(lo, hi)

        return batches()

    def shared_file(self, path: str, open_file: Callable[[str], Any]) -> Any:
        """The file at ``path``, opened once (by ``open_file``) for every
        stream resource that points into it; closed by :meth:`close`."""
        file = self._files.get(path)
        if file is None:
            file = self._files[path] = open_file(path)
        return file

    def uri_path(self, sres: Mapping[str, Any]) -> str:
        """The local path of a stream resource's ``uri``, mapped by ``root_map``."""
        uri = str(sres.get("uri", ""))
        parsed = urlparse(uri)
        if parsed.scheme not in ("file", ""):
            raise ExternalFileError(
                f"stream_resource {sres['uid']!r} points to {uri!r}; this writer reads "
                f"file:// URIs only; {_REMOTE_HINT}"
            )
        path = unquote(_uri_path(uri) if parsed.scheme else uri)
        for old, new in self.root_map.items():
            old = old.rstrip("/")
            if path == old or path.startswith(old + "/"):
                return new.rstrip("/") + path[len(old) :]
        return path

    # ----------------------------------------------------------- references
    def _record(self, stream: str) -> _References:
        record = self.references.get(stream)
        if record is None:
            record = self.references[stream] = _References()
        return record

    def write_references(self, force: bool = True) -> None:
        """Write the recorded documents into each stream group's ``external``
        attribute: new resources at once, datums at most once per flush
        interval (and at every flush), since the attribute is rewritten whole."""
        interval = self.flush_interval
        due = (
            force
            or any(r.urgent for r in self.references.values())
            or (interval is not None and time.monotonic() - self._last_written >= interval)
        )
        if not due:
            return
        with self._lock:
            dirty = {name: r for name, r in self.references.items() if r.dirty}
            if not dirty:
                return
            with self.run.meta_lock:
                for name, record in dirty.items():
                    stream = self.run.streams.get(name)
                    if stream is None:
                        continue
                    stream.group = self.run.metadata.set_attributes(
                        name, {"external": json_safe(record.as_attrs(self.mode.name))}
                    )
                    record.dirty = record.urgent = False
                self.run.metadata.consolidate()
            self._last_written = time.monotonic()

    def verify_references(self) -> int:
        """external="virtual", at stop: the points whose referenced bytes are
        gone since (``_virtual.VirtualFrames.verify``), taken off ``_written``;
        returns how many."""
        if self._virtual_frames is None:
            return 0
        lost: int = self._virtual_frames.verify()
        return lost

    def close(self) -> None:
        """Close the files opened for reading, and the handlers that can close."""
        self.wait_for_reads()
        files, self._files = self._files, {}
        handlers, self._handler_instances = self._handler_instances, {}
        sources, self._sources = self._sources, {}
        for source in sources.values():
            source.close()
        for file in files.values():
            file.close()
        for handler in handlers.values():
            close = getattr(handler, "close", None)
            if callable(close):
                close()


def _field(doc: Mapping[str, Any], name: str, kind: str) -> Any:
    try:
        return doc[name]
    except KeyError:
        raise DocumentError(f"{kind} document lacks the field {name!r}") from None


def _range(doc: Mapping[str, Any], name: str, uid: str) -> tuple[int, int]:
    value = doc.get(name)
    try:
        start, stop = int(value["start"]), int(value["stop"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        raise DocumentError(
            f"stream_datum {uid!r}: {name} must be {{'start': int, 'stop': int}}, got "
            f"{value!r}"
        ) from None
    if stop < start:
        raise DocumentError(f"stream_datum {uid!r}: {name} stop {stop} is before start {start}")
    return start, stop


def _uri_path(uri: str) -> str:
    """The path of a ``file:`` URI, whole.

    ophyd-async writes the directory into the URI as it is, without
    percent-encoding it, so a ``#`` or ``?`` in a directory's name is part of
    the path, not the start of a fragment or a query (a file URI has neither).
    """
    rest = uri.partition(":")[2]
    if rest.startswith("//"):  # an authority (``localhost``) before the path
        slash = rest.find("/", 2)
        rest = "" if slash < 0 else rest[slash:]
    return rest
