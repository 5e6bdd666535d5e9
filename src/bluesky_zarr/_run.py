"""One run's writer: documents in, one Zarr store out."""

from __future__ import annotations

import fcntl
import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from event_model import DocumentRouter, pack_event_page
from event_model.documents import Event, EventDescriptor, EventPage, RunStart, RunStop

from ._background import BackgroundWriter, BufferPool, MemoryBudget
from ._errors import DocumentError, StoreLockedError, WriteError
from ._external import ExternalData
from ._layout import plan_stream
from ._options import WriterOptions
from ._plan import plan_scan
from ._storage import LocalRoot, Root
from ._stream import ArraySink, Block, StreamWriter, consolidate
from ._validate import check_event, check_event_page
from ._version import __version__

logger = logging.getLogger(__name__)


#: Largest array (elements) that metadata attributes hold in full.
MAX_ATTR_ARRAY = 10_000


def json_safe(value: Any) -> Any:
    """A copy of ``value`` that JSON (and so Zarr attributes) can hold."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        if value.size > MAX_ATTR_ARRAY:
            # Metadata, not data: a frame that a device reports in its
            # configuration would bloat every metadata read of the store.
            return f"<array shape={value.shape} dtype={value.dtype} not stored in metadata>"
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        item = value.item()
        # float128 and the like have no Python equivalent: item() returns them as is.
        return repr(value) if isinstance(item, np.generic) else json_safe(item)
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if value is None or isinstance(value, (str, bool, int)):
        return value
    return repr(value)


class StoreLock:
    """An exclusive lock on a store path, held while a run writes it.

    ``flock`` on a hidden file beside the store: the kernel releases it if the
    process dies, so a killed writer leaves no stale lock behind.
    """

    def __init__(self, path: Path) -> None:
        self.path = path.with_name(f".{path.name}.lock")
        self._fd: int | None = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise StoreLockedError(
                f"{path} is being written by another writer; two writers cannot "
                f"write one store"
            ) from None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class RunWriter(DocumentRouter):
    """Writes the documents of one run into ``<root>/<name>.zarr``."""

    def __init__(self, storage: Root, options: WriterOptions) -> None:
        super().__init__()
        self.storage = storage
        self.options = options
        self.meta_lock = threading.RLock()
        self.buffer_lock = threading.RLock()
        self.streams: dict[str, StreamWriter] = {}
        self.descriptors: dict[str, StreamWriter] = {}
        self.path: Path | str | None = None
        self.root: zarr.Group
        self.budget = MemoryBudget(options.max_buffer_bytes, options.workers)
        self.pool = BufferPool(self.budget)
        # Default shards small enough that the buffer holds a few of them
        # while the workers write others (see MemoryBudget).
        self.shard_bytes = min(
            options.shard_bytes, options.max_buffer_bytes // (4 + 2 * options.workers)
        )
        self.background: BackgroundWriter | None = None
        self._open_blocks: dict[tuple[int, tuple[int, ...]], tuple[StreamWriter, ArraySink]] = {}
        self._stop_flusher = threading.Event()
        self._flusher: threading.Thread | None = None
        self.external = ExternalData(self)

    # -------------------------------------------------------------- documents
    def start(self, doc: RunStart) -> RunStart:
        # The store was made by open() before the RunRouter saw the document.
        return doc

    def open(self, doc: RunStart) -> None:
        """Plan the run from its start document and create its store."""
        self.plan = plan_scan(doc, self.options.dims)
        # A local store is locked before it is made (or replaced), so two
        # writers never take the same directory; object storage claims its
        # store with a conditional write instead.
        self._lock: StoreLock | None = None
        if isinstance(self.storage, LocalRoot):
            self._lock = StoreLock(self.storage.location(self.options.name_template, doc))
        try:
            self.path, store = self.storage.create_store(
                self.options.name_template, doc, overwrite=self.options.overwrite
            )
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise
        if self.options.store_wrapper is not None:
            store = self.options.store_wrapper(store)
        self.root = zarr.open_group(store, mode="r+", zarr_format=3)
        self.info: dict[str, Any] = {
            "version": __version__,
            "complete": False,
            "scan_dims": [d.name for d in self.plan.dims],
            "scan_shape": self.plan.shape and list(self.plan.shape),
        }
        consolidate(self.root, {"start": json_safe(doc), "bluesky_zarr": self.info})
        self.background = BackgroundWriter(
            self.budget, self.options.workers, name=str(doc.get("scan_id", ""))
        )
        if self.options.flush_interval is not None:
            self._flusher = threading.Thread(
                target=self._flush_periodically, name="bluesky-zarr-flusher", daemon=True
            )
            self._flusher.start()

    def descriptor(self, doc: EventDescriptor) -> EventDescriptor:
        self._raise_failures()
        name = str(doc.get("name", "primary"))
        with self.buffer_lock, self.meta_lock:
            stream = self.streams.get(name)
            if stream is None:
                layout = plan_stream(self.plan, self.external.layout_descriptor(name, doc))
                setpoints: dict[str, np.ndarray] = {}
                if name == self.plan.stream:
                    for dim in self.plan.dims:
                        setpoints.update(dim.setpoints)
                group = self.root.create_group(
                    name, attributes={"descriptors": [json_safe(doc)]}
                )
                stream = StreamWriter(self, group, layout, setpoints)
                self.streams[name] = stream
            else:
                if set(doc.get("data_keys", {})) != set(
                    s.key for s in stream.layout.arrays.values() if s.key is not None
                ):
                    raise DocumentError(
                        f"a second descriptor for stream {name!r} declares other data "
                        f"keys than the first; one stream must keep its data keys"
                    )
                descriptors = list(stream.group.attrs.get("descriptors", []))  # type: ignore[arg-type]
                descriptors.append(json_safe(doc))
                stream.group.attrs["descriptors"] = descriptors
            self.descriptors[doc["uid"]] = stream
            consolidate(self.root)
        return doc

    def event(self, doc: Event) -> Event:
        check_event(doc)
        self.event_page(pack_event_page(doc))
        return doc

    def event_page(self, doc: EventPage) -> EventPage:
        check_event_page(doc)
        self._raise_failures()
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
        self._raise_failures()
        self.external.stream_datum(doc)
        return doc

    def stop(self, doc: RunStop) -> RunStop:
        try:
            self.flush()
        finally:
            self.external.close()
            self._finish(doc)
        # Failures already raised at an earlier document are not raised again.
        self._raise_failures()
        return doc

    def close_incomplete(self, reason: str) -> None:
        """Finish a run whose stop document will not come: write what arrived,
        mark the store incomplete (``bluesky_zarr.complete`` stays false)."""
        try:
            self.flush()
        finally:
            self.external.close()
            self._finish(None, incomplete_reason=reason)

    # ---------------------------------------------------------------- buffers
    def place(
        self, stream: StreamWriter, sink: ArraySink, index: tuple[int, ...], value: Any
    ) -> None:
        """Copy one point's value into its block; hand full blocks to the writer."""
        key = tuple(i // b for i, b in zip(index, sink.block_shape))
        block = sink.blocks.get(key)
        if block is None:
            shape, dtype = stream.block_layout(sink, key)
            data = self.pool.take(shape, dtype)
            if data is None:
                self._reserve(math.prod(shape) * dtype.itemsize)
                data = np.empty(shape, dtype=dtype)
            block = stream.new_block(sink, key, data)
            sink.blocks[key] = block
            self._open_blocks[(id(sink), key)] = (stream, sink)
        local = tuple(i - o for i, o in zip(index, block.origin))
        block.data[local] = value
        if not block.filled[local]:
            block.filled[local] = True
            block.count += 1
            if block.count == block.expected:
                self._submit(stream, sink, key)

    def _submit(self, stream: StreamWriter, sink: ArraySink, key: tuple[int, ...]) -> None:
        block: Block = sink.blocks.pop(key)
        self._open_blocks.pop((id(sink), key), None)
        merge = key in sink.submitted
        sink.submitted.add(key)
        assert self.background is not None
        self.background.submit(
            hash((id(sink), key)),
            lambda: stream.write_block(sink, block, merge),
            block.nbytes,
            f"{stream.name}/{sink.name} at {block.origin}",
            lambda: self.pool.give(block.data),
        )

    def _reserve(self, nbytes: int) -> None:
        """Make room for a new block: spill old partial blocks, else wait."""
        while not self.budget.try_reserve(nbytes):
            if self.pool.drop():
                continue
            if self.budget.in_flight >= nbytes or not self._open_blocks:
                self.budget.wait(0.05)
                self._raise_failures()
            else:
                (_, key), (stream, sink) = next(iter(self._open_blocks.items()))
                self._submit(stream, sink, key)

    def _spill(self, older_than: float | None = None) -> None:
        with self.buffer_lock:
            now = time.monotonic()
            for (_, key), (stream, sink) in list(self._open_blocks.items()):
                block = sink.blocks[key]
                if older_than is None or now - block.born >= older_than:
                    self._submit(stream, sink, key)

    def _flush_periodically(self) -> None:
        interval = self.options.flush_interval
        assert interval is not None
        while not self._stop_flusher.wait(interval / 2):
            try:
                self._spill(older_than=interval)
            except Exception:  # noqa: BLE001 - logged; the caller sees write failures
                logger.exception("bluesky-zarr: periodic flush failed")

    def flush(self) -> None:
        """Write every buffered point to disk and wait until it is there."""
        self.external.write_references()
        self._spill()
        if self.background is not None:
            self.background.drain()

    def _raise_failures(self) -> None:
        if self.background is None or self.options.on_error == "log":
            return
        failures = self.background.new_failures()
        if failures:
            first = failures[0]
            raise WriteError(
                f"writing {first.what} to {self.path} failed"
                + (f" (and {len(failures) - 1} more writes)" if len(failures) > 1 else "")
                + f": {first.error!r}"
            ) from first.error

    def _finish(self, doc: RunStop | None, incomplete_reason: str | None = None) -> None:
        """Stop the threads and record how the run ended; ``doc`` is None when
        no stop document came (the run stays marked incomplete)."""
        self._stop_flusher.set()
        if self._flusher is not None:
            self._flusher.join()
        if self.background is not None:
            self.background.close()
        failures = self.background.failures if self.background else []
        with self.meta_lock:
            info = dict(self.info)
            info["complete"] = doc is not None
            info["streams"] = {name: s.summary() for name, s in self.streams.items()}
            info["write_failures"] = [f"{f.what}: {f.error!r}" for f in failures]
            info["buffer_peak_bytes"] = self.budget.peak
            info["max_buffer_bytes"] = self.budget.limit
            attributes: dict[str, Any] = {"bluesky_zarr": info}
            if doc is None:
                info["incomplete_reason"] = incomplete_reason
            else:
                attributes["stop"] = json_safe(doc)
                attributes["exit_status"] = json_safe(doc.get("exit_status", "unknown"))
            consolidate(self.root, attributes)
        if self._lock is not None:
            self._lock.release()
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
