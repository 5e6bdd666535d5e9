"""One run's writer: documents in, one Zarr store out."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from event_model import DocumentRouter, pack_event_page
from event_model.documents import Event, EventDescriptor, EventPage, RunStart, RunStop

from .._errors import BlueskyZarrError, DocumentError, StorageError, WriteError
from .._version import __version__
from ..external import ExternalData, ExternalOptions, FrameTarget
from ..plan import (
    CONVENTIONS,
    GEOMETRY_ATTRIBUTE,
    RELAYOUT,
    StreamGeometry,
    check_descriptor,
    fill_value_for,
    json_safe,
    json_verbatim,
    plan_scan,
    plan_stream,
)
from ..storage import (
    Root,
    RunStore,
    StoreLock,
    StoreMetadata,
    check_storable,
    delete_node,
    move_node,
    root_metadata,
)
from ._buffer import BlockBuffer
from ._options import WriterOptions
from ._relayout import placed_points
from ._stream import StreamWriter
from ._workers import BackgroundWriter

logger = logging.getLogger(__name__)

#: The file, inside a run's store, that keeps the documents the writer refused
#: (not a Zarr node).
REFUSED_FILE = "refused_documents.jsonl"

#: Seconds between looks for the store's directory (see RunWriter.check_health).
HEALTH_INTERVAL = 0.02


#: A document held until its points can be placed: (kind it is placed as,
#: the document to place, (name, document) as it came).
_Item = tuple[str, Any, tuple[str, Any]]


class _Held:
    """A stream whose geometry is pending: its group, and its documents in order."""

    def __init__(self, name: str, group: Any) -> None:
        self.name = name
        self.group = group
        self.docs: list[_Item] = []


def _datum_seq_nums(doc: Mapping[str, Any]) -> np.ndarray:
    """The seq_nums a stream_datum names (none if they are malformed: the
    document is then refused where it is read)."""
    try:
        seq = doc["seq_nums"]
        return np.arange(int(seq["start"]), int(seq["stop"]), dtype=np.int64)
    except (KeyError, TypeError, ValueError):
        return np.zeros(0, dtype=np.int64)


class RunWriter(DocumentRouter):
    """Writes the documents of one run into ``<root>/<name>.zarr``."""

    def __init__(
        self, storage: Root, options: WriterOptions, buffer: BlockBuffer, open_runs: int = 0
    ) -> None:
        super().__init__()
        self.storage = storage
        self.options = options
        self.buffer = buffer
        self.meta_lock = threading.RLock()
        self._health_checked = -HEALTH_INTERVAL
        self.streams: dict[str, StreamWriter] = {}
        self.descriptors: dict[str, StreamWriter] = {}
        self.path: Path | str | None = None
        self.metadata: StoreMetadata
        # Default shards small enough that the buffer holds a few of them
        # while the workers write others (see MemoryBudget), for this run and
        # the ``open_runs`` others that share the buffer.
        self.shard_bytes = min(
            options.shard_bytes,
            options.max_buffer_bytes // ((4 + 2 * options.workers) * (1 + open_runs)),
        )
        self.background: BackgroundWriter | None = None
        self._lock: StoreLock | None = None
        self._stop_flusher = threading.Event()
        self._flusher: threading.Thread | None = None
        self._refused = 0
        #: external="virtual": points whose referenced bytes were gone at stop.
        self._lost_references = 0
        #: Whether the run has been finished (stopped or closed).
        self.finished = False
        #: The run's store (made at the start document).
        self.store: RunStore | None = None
        #: The reads of detector files, on the writer's reader thread.
        self._reads = BackgroundWriter(buffer.reader)
        self.external = ExternalData(
            self,
            ExternalOptions(
                mode=options.external,
                handler_registry=options.handler_registry,
                root_map=options.root_map,
                flush_interval=options.flush_interval,
            ),
        )
        #: Each stream's geometry (see ``_geometry``), and its descriptor as
        #: its arrays are laid out from it.
        self.geometries: dict[str, StreamGeometry] = {}
        self._laid_out: dict[str, Mapping[str, Any]] = {}
        self._descriptor_docs: dict[str, list[Mapping[str, Any]]] = {}
        #: Streams whose geometry the positions have still to show: their
        #: arrays are not made yet and their documents are held, in order.
        self._pending: dict[str, _Held] = {}
        self._pending_uids: dict[str, _Held] = {}
        #: Per stream: documents whose points have still to be shown by an
        #: event (a stream_datum that came before its event), in order.
        self._waiting: dict[str, list[_Item]] = {}

    @property
    def reads(self) -> BackgroundWriter:
        """The queue of the reads of detector files (external data)."""
        return self._reads

    @property
    def repository(self) -> Any:
        """The run's Icechunk repository (``external="virtual"``), else ``None``."""
        return self.store.repository if self.store is not None else None

    @property
    def buffer_lock(self) -> threading.RLock:
        """Held while this run's blocks are placed (shared by the writer's runs)."""
        return self.buffer.lock

    # -------------------------------------------------------------- documents
    def start(self, doc: RunStart) -> RunStart:
        # The store was made by open() before the RunRouter saw the document.
        return doc

    def open(self, doc: RunStart) -> None:
        """Plan the run from its start document and create its store.

        The store appears whole: its root ``zarr.json`` holds the start
        document and consolidated metadata from its first byte.
        """
        self.plan = plan_scan(doc, self.options.dims)
        self.info: dict[str, Any] = {
            "version": __version__,
            "complete": False,
            "scan_dims": [d.name for d in self.plan.dims],
            "scan_shape": self.plan.shape and list(self.plan.shape),
        }
        attributes = {
            "Conventions": CONVENTIONS,
            "start": json_safe(doc),
            "bluesky_zarr": self.info,
        }
        # A local store is locked before it is made (or replaced), so two
        # writers never take the same directory; object storage claims its
        # store with a conditional write instead.
        self._lock = self.storage.lock(self.options.name_template, doc)
        try:
            self.store = self.storage.create_store(
                self.options.name_template,
                doc,
                overwrite=self.options.overwrite,
                metadata=root_metadata(attributes),
            )
            self.path = self.store.path
            store = self.store.zarr
            if self.options.store_wrapper is not None:
                store = self.options.store_wrapper(store)
            self.metadata = StoreMetadata(store, attributes)
        except BaseException as err:
            self._release_lock()
            if isinstance(err, OSError) and not isinstance(err, BlueskyZarrError):
                raise StorageError(f"cannot create the run's store: {err!r}") from err
            raise
        self.background = BackgroundWriter(self.buffer.workers)
        if self.options.flush_interval is not None:
            self._flusher = threading.Thread(
                target=self._flush_periodically, name="bluesky-zarr-flusher", daemon=True
            )
            self._flusher.start()

    def descriptor(self, doc: EventDescriptor) -> EventDescriptor:
        self.check_health()
        name = str(doc.get("name", "primary"))
        with self.buffer_lock, self.meta_lock:
            stream = self.streams.get(name)
            held = self._pending.get(name)
            if stream is None and held is None:
                laid_out = self.external.layout_descriptor(name, doc)
                check_descriptor(laid_out)
                geometry = StreamGeometry(self.plan, name, laid_out["data_keys"])
                attributes: dict[str, Any] = {
                    "Conventions": CONVENTIONS,
                    "descriptors": [json_safe(doc)],
                }
                # Every descriptor of the stream, in order (their configurations
                # give frame coordinates, _frame_coords).
                self._descriptor_docs[name] = [doc]
                if name == self.plan.stream:
                    attributes[GEOMETRY_ATTRIBUTE] = json_safe(geometry.record())
                group = self.metadata.add_group(name, attributes)
                self.geometries[name] = geometry
                self._laid_out[name] = laid_out
                if geometry.decided:
                    stream = self._make_stream(name, group, geometry)
                    self._announce(geometry)
                else:
                    # Held until the positions show the grid (_release).
                    held = self._pending[name] = _Held(name, group)
            else:
                known = stream.layout.arrays.values() if stream is not None else ()
                keys = (
                    {s.key for s in known if s.key is not None}
                    if stream is not None
                    else set(self._laid_out[name]["data_keys"])
                )
                if set(doc.get("data_keys", {})) != keys:
                    raise DocumentError(
                        f"a second descriptor for stream {name!r} declares other data "
                        f"keys than the first; one stream must keep its data keys"
                    )
                self._descriptor_docs[name].append(doc)
                if stream is not None:
                    stream.add_descriptor(doc)
                group = stream.group if stream is not None else held.group  # type: ignore[union-attr]
                descriptors = list(group.attrs.get("descriptors", []))
                descriptors.append(json_safe(doc))
                group = self.metadata.set_attributes(name, {"descriptors": descriptors})
                if stream is not None:
                    stream.group = group
                else:
                    held.group = group  # type: ignore[union-attr]
            if stream is not None:
                self.descriptors[doc["uid"]] = stream
            else:
                self._pending_uids[doc["uid"]] = held  # type: ignore[assignment]
            self.metadata.consolidate()
        return doc

    def _make_stream(self, name: str, group: Any, geometry: StreamGeometry) -> StreamWriter:
        """Make the arrays of a stream whose geometry is decided."""
        layout = plan_stream(geometry.dims, self._laid_out[name])
        for spec in layout.arrays.values():
            if spec.dtype is not None and spec.key is not None:
                check_storable(spec.key, spec.dtype, fill_value_for(spec.dtype))
        if name == self.plan.stream:
            layout.claimed_scan_ndim = len(self.plan.dims)
        setpoints: dict[str, np.ndarray] = {}
        for dim in geometry.dims:
            setpoints.update(dim.setpoints)
        if geometry.gridded and not geometry.sequential:
            # A grid visited out of order: its values are known from the start.
            setpoints.update(geometry.coordinates())
        if name == self.plan.stream:
            group = self._record_geometry(name)
        try:
            stream = StreamWriter(self, group, layout, setpoints, descriptor=self._laid_out[name])
            # Whether its events carry datum ids (frames in files to fill in).
            stream.fills = bool(self.external.datum_keys.get(name))
            for later in self._descriptor_docs.get(name, [])[1:]:
                stream.add_descriptor(later)
        except BaseException:
            # A descriptor refused halfway leaves no half stream.
            self.metadata.discard(name)
            raise
        self.streams[name] = stream
        return stream

    def _record_geometry(self, name: str) -> Any:
        """Write the geometry's decision and evidence into the stream's group
        (and the scan's dimensions into the root's record); returns the group."""
        geometry = self.geometries[name]
        if geometry.decided:
            self.info["scan_dims"] = [d.name for d in geometry.dims]
            self.info["scan_shape"] = (
                [d.size for d in geometry.dims] if geometry.gridded else None
            )
        return self.metadata.set_attributes(
            name, {GEOMETRY_ATTRIBUTE: json_safe(geometry.record())}
        )

    def _announce(self, geometry: StreamGeometry) -> None:
        """One line in the log for a stream whose grid is not the claimed one."""
        if geometry.source == "fallback":
            logger.warning(
                "bluesky-zarr: stream %r of %s is stored along one growing dimension with "
                "each motor as a coordinate, not on a grid: %s",
                geometry.stream, self.path, geometry.reason,
            )
        elif geometry.source == "setpoints":
            logger.info(
                "bluesky-zarr: stream %r of %s: grid %s learned from the positions (%s)",
                geometry.stream, self.path,
                {d.name: d.size for d in geometry.dims}, geometry.reason,
            )

    def event(self, doc: Event) -> Event:
        self._take_page(pack_event_page(doc), ("event", doc))
        return doc

    def event_page(self, doc: EventPage) -> EventPage:
        self._take_page(doc, ("event_page", doc))
        return doc

    def _take_page(self, doc: EventPage, verbatim: tuple[str, Any]) -> None:
        """Check, hold or place a page of events (``verbatim``: the document
        as it came, kept if it is refused after it was held)."""
        # Checked as a document by ZarrWriter (check_document) before it came.
        self.check_health()
        seq_nums = np.asarray(doc.get("seq_num", []))
        if seq_nums.dtype.kind not in "iu":
            raise DocumentError(f"seq_num must be integers, got {doc.get('seq_num')!r}")
        held = self._pending_uids.get(doc["descriptor"])
        if held is not None:
            geometry = self.geometries[held.name]
            geometry.observe(seq_nums, doc["data"])
            held.docs.append(("event_page", doc, verbatim))
            if geometry.decided:
                self._release(held, verbatim)
            return
        stream = self.descriptors[doc["descriptor"]]
        geometry = self.geometries[stream.name]
        if geometry.observe(seq_nums, doc["data"]) == RELAYOUT:
            stream = self._relayout(stream)
        self._place_page(stream, doc, seq_nums)
        if self._waiting.get(stream.name):
            self._place_held(stream, [])

    def _place_page(self, stream: StreamWriter, doc: Mapping[str, Any], seq_nums: Any) -> None:
        index = self.point_index(stream, np.asarray(seq_nums))
        # Only a stream whose events carry datum ids has anything to fill.
        page = self.external.fill_page(stream, doc) if stream.fills else doc
        with self.buffer_lock:
            stream.put_page(page, index)

    def point_index(self, stream: FrameTarget, seq_nums: np.ndarray) -> tuple[np.ndarray, ...]:
        """Index arrays (one per scan dimension) of the points ``seq_nums`` name."""
        index = self.geometries[stream.name].index(seq_nums)
        if index is None:
            raise DocumentError(
                f"stream {stream.name!r}: the points {seq_nums.tolist()!r} cannot be placed "
                f"before their events show where they lie"
            )
        return index

    def _release(self, held: _Held, current: tuple[str, Any] | None = None) -> None:
        """A pending stream's geometry is decided: make its arrays and place
        what was held (``current``: the document being taken, among them)."""
        geometry = self.geometries[held.name]
        with self.buffer_lock, self.meta_lock:
            del self._pending[held.name]
            uids = [u for u, h in self._pending_uids.items() if h is held]
            for uid in uids:
                del self._pending_uids[uid]
            stream = self._make_stream(held.name, held.group, geometry)
            for uid in uids:
                self.descriptors[uid] = stream
            self.metadata.consolidate()
        self._announce(geometry)
        self._place_held(stream, held.docs, current)

    def _place_held(
        self,
        stream: StreamWriter,
        docs: list[_Item],
        current: tuple[str, Any] | None = None,
    ) -> None:
        """Place held documents (then those waiting for an event), in order, as
        far as their points can be placed; the rest keep waiting.

        ``current`` is the document being taken: its own refusal is raised
        (and kept by the caller, as any refusal). Another held document that
        is refused now, after it was taken without error, is kept here; the
        others are placed all the same, then the first refusal is raised
        (marked ``kept``: the document being taken is not kept for it).
        """
        waiting = docs + self._waiting.pop(stream.name, [])
        geometry = self.geometries[stream.name]
        raised: BaseException | None = None
        held_error: BaseException | None = None
        for n, (kind, doc, verbatim) in enumerate(waiting):
            if kind == "stream_datum" and geometry.index(_datum_seq_nums(doc)) is None:
                self._waiting[stream.name] = waiting[n:]
                break
            try:
                if kind == "event_page":
                    self._place_page(stream, doc, doc["seq_num"])
                else:
                    self.external.stream_datum(doc)
            except Exception as err:  # noqa: BLE001 - kept, logged, or raised below
                error = err
                if not isinstance(err, BlueskyZarrError):
                    error = DocumentError(f"the {verbatim[0]} document cannot be written: {err!r}")
                    error.__cause__ = err
                if verbatim is current:
                    raised = error
                    continue
                self.refuse(verbatim[0], verbatim[1], error)
                held_error = held_error or error
        if raised is not None:
            raise raised
        if held_error is not None:
            held_error.kept = True  # type: ignore[attr-defined]
            raise held_error

    def _relayout(self, old: StreamWriter) -> StreamWriter:
        """The grid of ``old`` is contradicted by a point: move the points
        placed on it to the layout its geometry fell back to (one growing
        dimension). They are written first, the stream's group is moved
        aside, made anew, and every point on disk is read back and placed
        again; the group moved aside is then deleted."""
        name = old.name
        geometry = self.geometries[name]
        grid = geometry.previous
        assert grid is not None
        self._announce(geometry)
        self.external.wait_for_reads()
        with self.buffer_lock:
            self.buffer.spill(self)
        if self.background is not None:
            self.background.drain()
        self.raise_failures()
        store = self.metadata.store
        aside = f".relayout-{name}"
        with self.buffer_lock, self.meta_lock:
            attributes = dict(old.group.attrs)
            move_node(store, name, aside)
            self.metadata.discard(name)
            group = self.metadata.add_group(name, attributes)
            new = self._make_stream(name, group, geometry)
            for uid, stream in list(self.descriptors.items()):
                if stream is old:
                    self.descriptors[uid] = new
            names = {s.key: s.name for s in new.layout.arrays.values() if s.key is not None}
            for spec, seq_nums, values in placed_points(store, aside, old, grid):
                index = geometry.index(seq_nums)
                assert index is not None
                target = names.get(spec.key, spec.name) if spec.key is not None else spec.name
                new.put_values(target, index, values)
                if spec.key is not None:
                    new.set_coordinates(index, {spec.key: values})
            self.metadata.consolidate()
        delete_node(store, aside)
        return new

    # External data: frames in files that these documents point to.
    def resource(self, doc: Any) -> Any:
        self.external.resource(doc)
        return doc

    def datum_page(self, doc: Any) -> Any:
        self.external.datum_page(doc)
        return doc

    def stream_resource(self, doc: Any) -> Any:
        self.external.stream_resource(doc)
        return doc

    def stream_datum(self, doc: Any) -> Any:
        self.check_health()
        held = self._pending_uids.get(doc.get("descriptor"))
        if held is not None:
            held.docs.append(("stream_datum", doc, ("stream_datum", doc)))
            return doc
        stream = self.descriptors.get(doc.get("descriptor"))
        if stream is not None and (
            self._waiting.get(stream.name)
            or self.geometries[stream.name].index(_datum_seq_nums(doc)) is None
        ):
            # Its points lie where their events will say (out of order, or
            # past an axis whose snaking no event has shown yet).
            self._waiting.setdefault(stream.name, []).append(
                ("stream_datum", doc, ("stream_datum", doc))
            )
            return doc
        self.external.stream_datum(doc)
        return doc

    def stop(self, doc: RunStop) -> RunStop:
        self._finish(doc)
        return doc

    def close_incomplete(self, reason: str, exit_status: str | None = None) -> None:
        """Finish a run whose stop document will not come: write what arrived,
        mark the store incomplete (``bluesky_zarr.complete`` stays false);
        ``exit_status`` (``"abort"`` for a run interrupted) is recorded as a
        stop document's would be."""
        self._finish(None, incomplete_reason=reason, exit_status=exit_status)

    def discard(self) -> None:
        """Let go of a run whose store no longer exists (the process is ending):
        nothing is written; its lock is released."""
        if self.finished:
            return
        self.finished = True
        self._stop_flusher.set()
        self._release_lock()

    # ------------------------------------------------------- refused documents
    def refuse(self, name: str, doc: Mapping[str, Any], error: BaseException) -> None:
        """Keep a document this run's writer refused, verbatim, in the store.

        One JSON line per document (``{"name", "doc", "error"}``) in
        ``refused_documents.jsonl`` at the store's root; the count goes to the
        root attributes at stop (and at each periodic flush). Never raises:
        the caller is already raising the refusal itself.
        """
        line = json.dumps(
            {"name": name, "doc": doc, "error": f"{type(error).__name__}: {error}"},
            default=json_verbatim,
        ).encode() + b"\n"
        with self.meta_lock:
            self._refused += 1
            try:
                if self.store is None:
                    raise StorageError("the run has no store")
                self.store.keep(REFUSED_FILE, line)
            except Exception as err:  # noqa: BLE001 - counted; the refusal is raised anyway
                logger.error(
                    "bluesky-zarr: cannot keep a refused %s document in %s: %r",
                    name, self.path, err,
                )

    # ---------------------------------------------------------------- buffers
    def _flush_periodically(self) -> None:
        interval = self.options.flush_interval
        assert interval is not None
        while not self._stop_flusher.wait(interval / 2):
            try:
                self.buffer.spill(self, older_than=interval)
                if self.store is not None:  # readers of a repository see its last commit
                    self.store.commit("flush")
            except Exception:  # noqa: BLE001 - logged; the caller sees write failures
                logger.exception("bluesky-zarr: periodic flush failed")

    def flush(self) -> None:
        """Write every buffered point to disk and wait until it is there."""
        self.external.wait_for_reads()
        self.external.write_references()
        self.buffer.spill(self)
        if self.background is not None:
            self.background.drain()
        if self.store is not None:
            self.store.commit("flush")

    def take_written_regions(self) -> list[tuple[Any, tuple[int, ...], tuple[int, ...]]]:
        """The arrays of every stream written to since the last call, each
        with the region its writes covered (offset, shape): ``(array node,
        offset, shape)``. Called by the Tiled registrar (``_tiled``), at most
        once per flush interval, to tell Tiled's subscribers."""
        with self.meta_lock:
            streams = list(self.streams.values())
        return [region for stream in streams for region in stream.take_written_regions()]

    def check_health(self) -> None:
        """Refuse a document for a store that has been deleted (looked for at
        most every ``HEALTH_INTERVAL`` seconds: a lookup by path can wait on
        the directory, and writes into a deleted store fail anyway). What
        failed in the background is raised after the next document is taken
        (:meth:`raise_failures`, called by the writer): that document is not
        refused for an earlier one's failure."""
        now = time.monotonic()
        if (
            self.store is not None
            and now - self._health_checked >= HEALTH_INTERVAL
            and self.store.gone()
        ):
            raise StorageError(
                f"the store {self.path} has been deleted during the run; the writer "
                f"does not recreate it"
            )
        self._health_checked = now

    def raise_failures(self) -> None:
        read_failures = [failure.error for failure in self._reads.new_failures()]
        if read_failures:
            # Frames of a stream_datum that could not be read (it is kept
            # with the refused documents).
            raise read_failures[0]
        if self.background is None or self.options.on_error == "log":
            return
        failures = self.background.new_failures()
        if failures:
            first = failures[0]
            raise WriteError(
                f"{first.what} to {self.path} failed"
                + (f" (and {len(failures) - 1} more writes)" if len(failures) > 1 else "")
                + f": {first.error!r}"
            ) from first.error

    def _finish(
        self,
        doc: RunStop | None,
        incomplete_reason: str | None = None,
        exit_status: str | None = None,
    ) -> None:
        """Write what is buffered, record how the run ended and release the
        store, whatever fails on the way; ``doc`` is None when no stop
        document came (the run stays marked incomplete).

        Raises :class:`WriteError` (or :class:`StorageError`) afterwards if
        the data or the record could not be written.
        """
        if self.finished:
            return
        self.finished = True
        errors: list[BaseException] = []

        def attempt(step: Any) -> None:
            try:
                step()
            except Exception as err:  # noqa: BLE001 - recorded and raised below
                errors.append(err)

        try:
            # Each step is tried even if one before it failed: the frames in
            # memory are written if the storage still takes them.
            attempt(self._settle)
            attempt(self.external.wait_for_reads)
            attempt(self.external.write_references)
            attempt(lambda: self.buffer.spill(self))
            if self.background is not None:
                attempt(self.background.drain)
            attempt(self._verify_references)
            self._stop_flusher.set()
            if self._flusher is not None and not sys.is_finalizing():
                self._flusher.join()
            attempt(self.external.close)
            attempt(lambda: self._record_end(doc, incomplete_reason, errors, exit_status))
            if self.store is not None:
                attempt(lambda: self.store.commit("stop"))
        finally:
            self._release_lock()
        self._warn_unused_options()
        # Background failures already raised at an earlier document are not
        # raised again; with on_error="log" they are only recorded.
        self.raise_failures()
        if errors:
            first = errors[0]
            if isinstance(first, BlueskyZarrError):
                raise first
            raise WriteError(
                f"finishing the run's store {self.path} failed: {first!r}"
            ) from first

    def _verify_references(self) -> None:
        self._lost_references = self.external.verify_references()

    def _settle(self) -> None:
        """The run ends: decide the geometry of streams still pending from
        the points that came, and place what they held; documents still
        waiting for an event that never came are refused: kept in the store
        (counted: it is not complete) and logged, as are held documents of a
        pending stream refused now (the stop document is not refused for
        them)."""
        for held in list(self._pending.values()):
            self.geometries[held.name].finish()
            try:
                self._release(held)
            except BlueskyZarrError as err:
                if not getattr(err, "kept", False):
                    raise
                logger.warning("bluesky-zarr: %s (kept in %s)", err, REFUSED_FILE)
        for name, docs in list(self._waiting.items()):
            del self._waiting[name]
            for _, doc, (kind, original) in docs:
                error = DocumentError(
                    f"{kind} {doc.get('uid')!r} of stream {name!r}: no event came to show "
                    f"where its points lie"
                )
                self.refuse(kind, original, error)
                logger.warning("bluesky-zarr: %s (kept in %s)", error, REFUSED_FILE)

    def _record_end(
        self,
        doc: RunStop | None,
        incomplete_reason: str | None,
        errors: list[BaseException],
        exit_status: str | None = None,
    ) -> None:
        """Record in the root attributes how the run ended and what it lacks."""
        failures = self.background.failures if self.background else []
        with self.meta_lock:
            if self.plan.stream in self.streams:
                # What the positions proved by the end (snaking, points checked).
                self.streams[self.plan.stream].group = self._record_geometry(self.plan.stream)
            info = dict(self.info)
            info["streams"] = {name: s.summary() for name, s in self.streams.items()}
            info["write_failures"] = [f"{f.what}: {f.error!r}" for f in failures] + [
                repr(e) for e in errors
            ]
            info["refused_documents"] = self._refused
            if self._refused:
                info["refused_file"] = REFUSED_FILE
            info["buffer_peak_bytes"] = self.buffer.budget.peak
            info["max_buffer_bytes"] = self.buffer.budget.limit
            attributes: dict[str, Any] = {"bluesky_zarr": info}
            reasons = []
            if doc is None:
                reasons.append(incomplete_reason or "no stop document came")
                if exit_status is not None:
                    attributes["exit_status"] = exit_status
            else:
                attributes["stop"] = json_safe(doc)
                attributes["exit_status"] = json_safe(doc.get("exit_status", "unknown"))
                missing = self._missing_points(doc, info["streams"])
                if missing:
                    info["missing"] = missing
                    reasons.append(
                        "; ".join(
                            f"stream {name!r} has {m['written']} of its {m['expected']} "
                            f"events written"
                            for name, m in missing.items()
                        )
                    )
            if self._refused:
                reasons.append(
                    f"{self._refused} refused document(s) are kept in {REFUSED_FILE}"
                )
            if self._lost_references:
                reasons.append(
                    f"{self._lost_references} point(s) refer to detector files that vanished "
                    f"or were cut since they were referenced (see each stream's 'virtual' "
                    f"attribute)"
                )
            if info["write_failures"]:
                reasons.append(f"{len(info['write_failures'])} write(s) failed")
            info["complete"] = not reasons
            if reasons:
                info["incomplete_reason"] = "; ".join(reasons)
            self.metadata.consolidate(attributes)

    def _missing_points(
        self, doc: RunStop, summaries: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, dict[str, int]]:
        """Streams holding fewer points than the stop document's ``num_events``."""
        num_events = doc.get("num_events")
        if not isinstance(num_events, Mapping):
            return {}
        missing = {}
        for name, expected in num_events.items():
            if not isinstance(expected, int) or isinstance(expected, bool):
                continue
            summary = summaries.get(str(name))
            written = int(summary["recorded_points"]) if summary else 0
            if written < expected:
                missing[str(name)] = {"expected": expected, "written": written}
        return missing

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _warn_unused_options(self) -> None:
        unused = (set(self.options.chunks) | set(self.options.shards)) - {
            name
            for stream in self.streams.values()
            for spec in stream.layout.arrays.values()
            for name in (spec.name, spec.key)
        }
        if unused:
            logger.warning(
                "bluesky-zarr: chunks=/shards= name keys that run %s does not have: %s",
                self.path, sorted(unused),
            )
        unmatched = set(self.options.frame_coords) - {
            name for stream in self.streams.values() for name in stream.frame_dim_names
        }
        if unmatched:
            logger.warning(
                "bluesky-zarr: frame_coords= names dimensions that no frame of run %s has: %s",
                self.path, sorted(unmatched),
            )
