"""One run's writer: documents in, one Zarr store out."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from event_model import DocumentRouter, pack_event_page
from event_model.documents import Event, EventDescriptor, EventPage, RunStart, RunStop

from . import _zarr
from ._background import BackgroundWriter
from ._buffer import BlockBuffer
from ._errors import BlueskyZarrError, DocumentError, StorageError, WriteError
from ._external import ExternalData
from ._layout import plan_stream
from ._metadata import StoreMetadata, json_safe, root_metadata
from ._options import WriterOptions
from ._plan import plan_scan
from ._storage import LocalRoot, Root, StoreLock
from ._stream import StreamWriter
from ._version import __version__

logger = logging.getLogger(__name__)

#: The file, inside a run's store, that keeps the documents the writer refused
#: (not a Zarr node).
REFUSED_FILE = "refused_documents.jsonl"

#: Seconds between looks for the store's directory (see RunWriter.check_health).
HEALTH_INTERVAL = 0.02


def _json_verbatim(value: Any) -> Any:
    """JSON for what the standard encoder cannot take: arrays in full."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return repr(value)


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
        self._refused_lines: list[bytes] = []
        #: Whether the run has been finished (stopped or closed).
        self.finished = False
        #: external="virtual": the run's Icechunk repository (``_virtual``).
        self.virtual: Any = None
        self.external = ExternalData(self)

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
        attributes = {"start": json_safe(doc), "bluesky_zarr": self.info}
        # A local store is locked before it is made (or replaced), so two
        # writers never take the same directory; object storage claims its
        # store with a conditional write instead.
        if isinstance(self.storage, LocalRoot):
            self._lock = self.storage.lock(self.options.name_template, doc)
        try:
            if self.options.external == "virtual":  # an Icechunk repository (_virtual)
                from ._virtual import create_repository

                self.path, store = create_repository(self, doc, root_metadata(attributes))
            else:
                self.path, store = self.storage.create_store(
                    self.options.name_template,
                    doc,
                    overwrite=self.options.overwrite,
                    metadata=root_metadata(attributes),
                )
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
            if stream is None:
                layout = plan_stream(self.plan, self.external.layout_descriptor(name, doc))
                setpoints: dict[str, np.ndarray] = {}
                if name == self.plan.stream:
                    for dim in self.plan.dims:
                        setpoints.update(dim.setpoints)
                group = self.metadata.add_group(name, {"descriptors": [json_safe(doc)]})
                try:
                    stream = StreamWriter(self, group, layout, setpoints)
                except BaseException:
                    # A descriptor refused halfway leaves no half stream.
                    self.metadata.discard(name)
                    raise
                self.streams[name] = stream
            else:
                if set(doc.get("data_keys", {})) != set(
                    s.key for s in stream.layout.arrays.values() if s.key is not None
                ):
                    raise DocumentError(
                        f"a second descriptor for stream {name!r} declares other data "
                        f"keys than the first; one stream must keep its data keys"
                    )
                descriptors = list(stream.group.attrs.get("descriptors", []))
                descriptors.append(json_safe(doc))
                stream.group = self.metadata.set_attributes(
                    name, {"descriptors": descriptors}
                )
            self.descriptors[doc["uid"]] = stream
            self.metadata.consolidate()
        return doc

    def event(self, doc: Event) -> Event:
        self.event_page(pack_event_page(doc))
        return doc

    def event_page(self, doc: EventPage) -> EventPage:
        # Checked as a document by ZarrWriter (check_document) before it came.
        self.check_health()
        stream = self.descriptors[doc["descriptor"]]
        seq_nums = np.asarray(doc.get("seq_num", []))
        if seq_nums.dtype.kind not in "iu":
            raise DocumentError(f"seq_num must be integers, got {doc.get('seq_num')!r}")
        index = self.point_index(stream, seq_nums)
        page = self.external.fill_page(stream, doc)
        with self.buffer_lock:
            stream.put_page(page, index)
        return doc

    def point_index(self, stream: StreamWriter, seq_nums: np.ndarray) -> tuple[np.ndarray, ...]:
        """Index arrays (one per scan dimension) of the points ``seq_nums`` name."""
        if stream.name == self.plan.stream:
            return self.plan.index(seq_nums)
        index = (seq_nums.astype(np.int64) - 1,)
        if index[0].size and index[0].min() < 0:
            raise DocumentError(f"seq_num must be >= 1, got {seq_nums.tolist()!r}")
        return index

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
        self.external.stream_datum(doc)
        return doc

    def stop(self, doc: RunStop) -> RunStop:
        self._finish(doc)
        return doc

    def close_incomplete(self, reason: str) -> None:
        """Finish a run whose stop document will not come: write what arrived,
        mark the store incomplete (``bluesky_zarr.complete`` stays false)."""
        self._finish(None, incomplete_reason=reason)

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
            default=_json_verbatim,
        ).encode() + b"\n"
        with self.meta_lock:
            self._refused += 1
            try:
                if isinstance(self.path, Path):
                    if not self.path.is_dir():
                        raise FileNotFoundError(f"{self.path} no longer exists")
                    with open(self.path / REFUSED_FILE, "ab") as file:
                        file.write(line)
                else:
                    # Object storage has no append: the object is rewritten.
                    self._refused_lines.append(line)
                    if self.virtual is not None:  # beside the repository (_virtual)
                        self.virtual.put_beside(REFUSED_FILE, b"".join(self._refused_lines))
                        return
                    _zarr.put(self.metadata.store, REFUSED_FILE, b"".join(self._refused_lines))
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
                if self.virtual is not None:  # readers see the last commit (_virtual)
                    self.virtual.commit("flush")
            except Exception:  # noqa: BLE001 - logged; the caller sees write failures
                logger.exception("bluesky-zarr: periodic flush failed")

    def flush(self) -> None:
        """Write every buffered point to disk and wait until it is there."""
        self.external.wait_for_reads()
        self.external.write_references()
        self.buffer.spill(self)
        if self.background is not None:
            self.background.drain()
        if self.virtual is not None:
            self.virtual.commit("flush")

    def check_health(self) -> None:
        """Raise what went wrong since the last document: a write that failed
        in the background, or a store that has been deleted (looked for at
        most every ``HEALTH_INTERVAL`` seconds: a lookup by path can wait
        on the directory, and writes into a deleted store fail anyway)."""
        now = time.monotonic()
        if (
            isinstance(self.path, Path)
            and now - self._health_checked >= HEALTH_INTERVAL
            and not self.path.is_dir()
        ):
            raise StorageError(
                f"the store {self.path} has been deleted during the run; the writer "
                f"does not recreate it"
            )
        self._health_checked = now
        self.raise_failures()

    def raise_failures(self) -> None:
        read_failures = self.external.new_read_failures()
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

    def _finish(self, doc: RunStop | None, incomplete_reason: str | None = None) -> None:
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
            attempt(self.external.wait_for_reads)
            attempt(self.external.write_references)
            attempt(lambda: self.buffer.spill(self))
            if self.background is not None:
                attempt(self.background.drain)
            self._stop_flusher.set()
            if self._flusher is not None:
                self._flusher.join()
            attempt(self.external.close)
            attempt(lambda: self._record_end(doc, incomplete_reason, errors))
            if self.virtual is not None:
                attempt(lambda: self.virtual.commit("stop"))
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

    def _record_end(
        self, doc: RunStop | None, incomplete_reason: str | None, errors: list[BaseException]
    ) -> None:
        """Record in the root attributes how the run ended and what it lacks."""
        failures = self.background.failures if self.background else []
        with self.meta_lock:
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
