"""The public callback: one :class:`ZarrWriter` serves every run.

**Interrupted, the runs are finished.** A run whose stop document never
comes because the process ends is finished by the writer itself: what is
buffered is written, the store records ``exit_status`` ``"abort"`` and why
(``"interrupted: ..."``), its lock is released and the worker threads end.
This happens at the interpreter's exit (``atexit``: a script whose RunEngine
was paused by Ctrl-C raises ``RunEngineInterrupted`` and ends), and on
SIGTERM, whose default action (ending the process at once, no ``atexit``)
is replaced, while no one else handles SIGTERM, by: finish the runs, then
end the process by SIGTERM as before. A document that comes after (a
RunEngine emitting a stop while the interpreter shuts down) is refused at
once, never waited on: no thread can start then.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from event_model import bulk_events_to_event_pages

from .._errors import BlueskyZarrError, DocumentError, DocumentOrderError, OptionError, WriteError
from ..catalog import DEFAULT_TILED_TIMEOUT, TiledRegistrar, check_tiled_option
from ..plan import (
    DEFAULT_NAME_TEMPLATE,
    DEFAULT_SHARD_BYTES,
    check_bulk_events,
    check_document,
    json_verbatim,
)
from ..storage import is_url, resolve_root
from ._buffer import BlockBuffer
from ._options import DEFAULT_MAX_BUFFER_BYTES, WriterOptions, make_options
from ._routes import KINDS, Routes
from ._run import RunWriter

logger = logging.getLogger(__name__)

#: Why the runs still open when the process exits were finished.
EXIT_REASON = (
    "interrupted: the process exited before the run's stop document came (a "
    "RunEngine paused by Ctrl-C, or an exception, ended the script)"
)
SIGTERM_REASON = "interrupted: SIGTERM came before the run's stop document"

#: Seconds an interruption waits for a document being written to be done
#: before it finishes the runs anyway.
INTERRUPT_WAIT = 10.0

#: The writers of this process, finished at exit or on SIGTERM.
_writers: weakref.WeakSet[ZarrWriter] = weakref.WeakSet()
_sigterm_installed = False


def _interrupt_all(reason: str) -> None:
    """Finish the open runs of every writer of this process as aborted."""
    for writer in list(_writers):
        try:
            writer._interrupt(reason)
        except Exception:  # noqa: BLE001 - the other writers are finished all the same
            logger.exception("bluesky-zarr: finishing the runs of %r failed", writer)


atexit.register(_interrupt_all, EXIT_REASON)


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM: finish the open runs (on a thread: the main thread may be in
    the middle of a document), then end the process by SIGTERM. A second
    SIGTERM ends it at once."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def finish_then_end() -> None:
        try:
            _interrupt_all(SIGTERM_REASON)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=finish_then_end, name="bluesky-zarr-sigterm").start()


def _handle_sigterm() -> None:
    """Finish the runs on SIGTERM, if SIGTERM has its default action (nobody
    else handles it) and this is the main thread (the only one that can set
    a handler)."""
    global _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)
        _sigterm_installed = True


class ZarrWriter:
    """Write every Bluesky run, live, into a Zarr V3 store shaped like the scan.

    Subscribe an instance to a RunEngine (``RE.subscribe(ZarrWriter("data/"))``)
    or call it with ``(name, doc)`` pairs. Each run becomes one store,
    ``<directory>/<name>.zarr``, with one group per stream; each data key is an
    array with the scan dimensions first, then the frame dimensions.

    Parameters
    ----------
    directory
        Root directory of the stores (created if missing; ``~`` is the home
        directory), or an object storage URL, ``s3://bucket/prefix`` (needs
        the ``s3`` extra).
    storage_options
        For object storage: options of ``s3fs.S3FileSystem`` (``key``,
        ``secret``, ``endpoint_url``, ``client_kwargs``, ...), the same that
        ``xr.open_zarr(..., storage_options=...)`` takes. Without them the
        standard AWS environment variables and configuration files apply.
    dims
        Names for the scan dimensions, overriding the scanned motors' names.
    chunks, shards
        Per data key (or array name), the chunk and shard shapes, scan
        dimensions first. By default a chunk is one frame and a shard the frames
        of a row of the innermost scan dimension, up to ``shard_bytes``.
    compressors
        Zarr codecs for compression; ``"default"`` (Blosc LZ4 with
        bit-shuffle) or ``None`` for none.
    shard_bytes
        Size target of a default shard.
    max_buffer_bytes
        Memory bound of the frames held before they are written, and of the
        copies made while writing them, for all the runs of this writer
        together. When it is reached, partially filled chunks are written
        early and merged later.
    flush_interval
        Seconds after which a partially filled chunk is written anyway, so a
        slow scan becomes visible on disk; ``None`` to only write full chunks.
    workers
        Background threads that encode and write, shared by all the runs
        of this writer.
    name_template
        Store name, formatted over the start document (values are sanitised);
        ``/`` makes subdirectories.
    overwrite
        Replace an existing store of the same name instead of refusing (a
        store another writer is writing is never replaced). ``"incomplete"``:
        replace only an unfinished store of the same run (same start ``uid``,
        no stop document recorded), as a service re-reading a run does.
    on_error
        ``"raise"`` (default): a failed write raises :class:`WriteError` at
        the next document and at stop. ``"log"``: the scan goes on; failures
        are logged and recorded in the store's ``bluesky_zarr`` attribute.
    store_wrapper
        Optional callable applied to each run's zarr store before use, e.g.
        a ``zarr.storage.WrapperStore`` subclass that counts or checks writes.
    external
        What to do with data that events point to (``resource``/``datum`` of
        ophyd v1 detectors, ``stream_resource``/``stream_datum`` of
        ophyd-async ones): ``"fill"`` reads the frames from their files and
        writes them at their points, raising :class:`ExternalFileError` when a
        file cannot be read here; ``"reference"`` reads nothing and records
        the documents in each stream group's ``external`` attribute, leaving
        those points unwritten (``_written`` False).
        ``"virtual"`` makes each run's store an Icechunk repository in which
        frames in detectors' HDF5 files are referenced in place (virtual
        chunks, no copy) where their layout allows, and copied otherwise;
        read it with :func:`open_virtual` (see ``_virtual``).
    handler_registry
        Handler classes by resource ``spec``, added to the default ones
        (``NPY_SEQ``), in the ``event_model.Filler`` convention:
        ``handler_class(full_path, **resource_kwargs)`` returns a handler,
        ``handler(**datum_kwargs)`` returns the frame.
    root_map
        Directories by the ``root`` that resources name, for files mounted
        elsewhere here than where the detector wrote them; also applied to the
        leading directories of stream resources' ``file://`` URIs.
    frame_coords
        Frame dimensions mapped to the configuration keys that hold their
        coordinate, for names that do not match, e.g.
        ``{"channel": "mca_bin_energies"}``. Without it, a frame dimension
        named in its data key's ``dims`` (``energy``) takes as its coordinate
        the 1-D array of its length that its device's configuration holds
        under that name (``energy`` or ``<device>_energy``). The coordinate
        holds the values of the stream's first descriptor; if a later
        descriptor (a device reconfigured during the run) brings others, a
        per-point coordinate ``<dim>_per_point`` holds each point's values.
    durable
        Flush every file (and its directory) to the device before a point is
        marked written, so that what ``_written`` claims survives a power
        loss, at the cost of an ``fsync`` per file. Off by default: the
        operating system writes the files back within seconds.
    tiled
        A Tiled server to register each run with, by reference (nothing is
        copied): its URI (``http://host:port/api/v1/metadata/<catalog>``) or a
        Tiled client container node. The run is registered when its store
        exists, its streams as their descriptors come (so Tiled serves the run
        while it is written), and brought up to date at stop. Each flush
        interval, the arrays written to are updated with the region that
        reached the disk, which Tiled (with a streaming cache) publishes to
        their subscribers (``node.subscribe()``); their streams close when the
        run ends. Needs the ``tiled`` extra. Tiled being unreachable never stops the scan nor
        loses data: the failure is logged and listed in
        :attr:`tiled_failures`, and ``bluesky-zarr register`` registers the
        store later.
    tiled_api_key
        The API key for a ``tiled`` URI; by default Tiled's own
        ``TILED_API_KEY`` environment variable.
    tiled_timeout
        Seconds the stop document waits at most for the run's final
        registration. A registration gives up this long after it was asked
        for (no request of it waits longer); a run not registered when the
        stop's wait ends is in :attr:`tiled_failures` with why, and taken off
        if a later registration succeeds.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        storage_options: Mapping[str, Any] | None = None,
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
        durable: bool = False,
        tiled: Any = None,
        tiled_api_key: str | None = None,
        tiled_timeout: float = DEFAULT_TILED_TIMEOUT,
    ) -> None:
        if not isinstance(durable, bool):
            raise OptionError(f"durable= must be True or False, got {durable!r}")
        check_tiled_option(tiled, tiled_api_key)
        if (
            not isinstance(tiled_timeout, (int, float))
            or isinstance(tiled_timeout, bool)
            or not tiled_timeout > 0
        ):
            raise OptionError(
                f"tiled_timeout= must be a positive number of seconds, got {tiled_timeout!r}"
            )
        if not is_url(directory):
            # "~/data" is the user's data directory, not a folder named "~".
            directory = os.path.expanduser(directory)
        self.storage = resolve_root(
            directory, storage_options, durable, repositories=external == "virtual"
        )
        self.directory: Path | str = self.storage.display
        self.options: WriterOptions = make_options(
            dims=dims,
            chunks=chunks,
            shards=shards,
            compressors=compressors,
            shard_bytes=shard_bytes,
            max_buffer_bytes=max_buffer_bytes,
            flush_interval=flush_interval,
            workers=workers,
            name_template=name_template,
            overwrite=overwrite,
            on_error=on_error,
            store_wrapper=store_wrapper,
            external=external,
            handler_registry=handler_registry,
            root_map=root_map,
            frame_coords=frame_coords,
        )
        self.buffer = BlockBuffer(self.options.max_buffer_bytes, self.options.workers)
        # The threads end with the writer (or at close()). Not at exit: the
        # runs still open are finished then (_interrupt_all, which ends the
        # threads after), and weakref's exit hook runs before it (atexit runs
        # the last registered first): stopped there, the workers would have to
        # start again, which Python 3.12 refuses in atexit handlers.
        weakref.finalize(self, self.buffer.stop).atexit = False
        #: Held while a document is taken, and while runs are finished.
        self._lock = threading.RLock()
        #: Why the writer was shut (the process is ending): it takes no
        #: document any more.
        self._shut: str | None = None
        _writers.add(self)
        _handle_sigterm()
        #: The runs, and which run each document belongs to.
        self._routes: Routes[RunWriter] = Routes()
        #: Stores written so far, in order: paths, or URLs for object storage.
        self.stores: list[Path | str] = []
        self._tiled: TiledRegistrar | None = None
        if tiled is not None and self.options.external == "virtual":
            raise OptionError(
                "tiled= cannot register runs written with external='virtual': Tiled "
                "reads Zarr arrays from their directories or objects, and an Icechunk "
                "repository has none; read such runs with open_virtual()"
            )
        if tiled is not None:
            self._tiled = TiledRegistrar(
                tiled,
                api_key=tiled_api_key,
                storage_options=storage_options,
                timeout=float(tiled_timeout),
                interval=self.options.flush_interval,
            )

    def __repr__(self) -> str:
        return f"ZarrWriter({str(self.directory)!r})"

    def __call__(self, name: str, doc: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Take one document; every exception raised is a :class:`BlueskyZarrError`.

        A document that a run refuses is kept verbatim in that run's store
        (``refused_documents.jsonl``) before the refusal is raised: callers
        such as ophyd's subscription threads only log exceptions. That holds
        also for a document of a run that has ended (a start delivered twice,
        an event sent after the stop): it is kept in the ended run's store,
        which then no longer claims to be complete. A failure in the
        background (a write, the frames of an earlier stream_datum) is raised
        after the next document of its run is taken, which is not refused for
        it.
        """
        if sys.is_finalizing():
            # Refused at once, no lock taken: no thread runs or starts any more.
            raise WriteError(
                f"the {name} document is not written: the Python interpreter is shutting down"
            )
        with self._lock:
            return self._call(name, doc)

    def _call(self, name: str, doc: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if self._shut is not None:
            raise WriteError(
                f"the {name} document is not written: the writer was shut ({self._shut})"
            )
        if name == "bulk_events" and isinstance(doc, Mapping):
            # The legacy batch of events: the same events as event pages.
            check_bulk_events(doc)
            for page in bulk_events_to_event_pages(dict(doc)):
                self._call("event_page", page)
            return name, doc
        # The run the document belongs to as it came (a stop that fails ends
        # its run before the failure is raised: it is not kept as refused).
        run = self._routes.run_of(name, doc)
        try:
            result = self._take(name, doc)
        except BlueskyZarrError as err:
            self._keep_refused(run, name, doc, err)
            raise
        except OSError as err:
            wrapped: BlueskyZarrError = WriteError(
                f"writing the {name} document to its store failed: {err!r}"
            )
            self._keep_refused(run, name, doc, wrapped)
            raise wrapped from err
        except Exception as err:  # noqa: BLE001 - a malformed document met unchecked code
            wrapped = DocumentError(f"the {name} document cannot be written: {err!r}")
            self._keep_refused(run, name, doc, wrapped)
            raise wrapped from err
        # What failed in the background since (a write, the frames of an
        # earlier stream_datum) is raised now: this document itself is taken.
        if isinstance(run, RunWriter) and not run.finished:
            run.raise_failures()
        return result

    def _take(self, name: str, doc: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if name not in KINDS:
            raise DocumentError(f"unknown document kind {name!r}")
        if not isinstance(doc, Mapping):
            raise DocumentError(f"a {name} document must be a mapping, got {type(doc).__name__}")
        check_document(name, doc)
        self._routes.check(name, doc)
        if name == "start":
            run = RunWriter(self.storage, self.options, self.buffer, len(self._routes.runs))
            run.open(doc)  # type: ignore[arg-type]
            self._routes.open(doc["uid"], run)
        target = self._routes.run_of(name, doc)
        if not isinstance(target, RunWriter):
            raise DocumentOrderError(f"the {name} document belongs to no open run")
        try:
            result = target(name, doc)
        except BaseException:
            if name == "start":
                self._routes.runs.pop(doc["uid"])
                target.close_incomplete("the start document was refused")
            if name == "stop":
                # The run was finalised even though its stop raised (a write
                # failure reported late): it is no longer open.
                self._register_finished(doc["run_start"])
                self._forget(doc["run_start"])
            raise
        if self._tiled is not None and name in ("start", "descriptor"):
            # The run, then each stream as it appears: readable through Tiled
            # while it is written; what reaches the disk is told to Tiled's
            # subscribers.
            self._tiled.opened(target.path, target.take_written_regions)
        self._routes.add(name, doc)
        if name == "start":
            path = target.path
            if path is not None:
                self.stores.append(path)
        if name == "stop":
            self._register_finished(doc["run_start"])
            self._forget(doc["run_start"])
        return result

    def _register_finished(self, run_start: str) -> None:
        run = self._routes.runs.get(run_start)
        if self._tiled is not None and run is not None:
            self._tiled.finish(run.path)

    @property
    def tiled_failures(self) -> list[tuple[str, str]]:
        """``(store, error)`` of each registration with Tiled that failed."""
        return list(self._tiled.failures) if self._tiled is not None else []

    def _keep_refused(
        self, run: RunWriter | str | None, name: str, doc: Any, error: BaseException
    ) -> None:
        if isinstance(run, str):
            self._keep_after_end(run, name, doc, error)
            return
        if run is None or run.finished or getattr(error, "kept", False):
            # (A refusal the run kept itself: a document it held, refused
            # when a later one let it be placed.)
            return
        run.refuse(name, doc, error)
        # A refused descriptor's events cannot be placed, a refused resource's
        # datums not read: they are refused (and kept) too.
        self._routes.refuse(name, doc, repr(error))

    def _keep_after_end(self, run_uid: str, name: str, doc: Any, error: BaseException) -> None:
        """Keep a document of an ended run in that run's store (see ``_ended``)."""
        line = json.dumps(
            {"name": name, "doc": doc, "error": f"{type(error).__name__}: {error}"},
            default=json_verbatim,
        ).encode() + b"\n"
        store = self._routes.ended[run_uid]
        try:
            self.storage.keep_after_end(store, run_uid, line)
        except Exception as err:  # noqa: BLE001 - logged; the refusal is raised anyway
            # A store that is gone, held by another writer, or holds another
            # run now is left alone.
            logger.error(
                "bluesky-zarr: cannot keep a document refused after run %s ended in its "
                "store %s: %r", run_uid, store, err,
            )
        self._routes.kept_after_end(name, doc, run_uid)

    def _forget(self, run_start: str, *, ended: bool = True) -> None:
        """Drop what this writer keeps of a run that has stopped; an ended run
        is remembered for a while, to keep its documents that come after the end."""
        run = self._routes.runs.get(run_start)
        self._routes.close(run_start, run.path if run is not None else None, ended=ended)

    def flush(self) -> None:
        """Write every buffered point of every open run to disk, and wait.

        With ``tiled=``, then bring their registration up to date (waiting
        ``tiled_timeout`` seconds at most).
        """
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        for run in list(self._routes.runs.values()):
            run.flush()
        if self._tiled is not None:
            for run in list(self._routes.runs.values()):
                if run.path is not None:
                    self._tiled.sync(run.path)

    def close(self, reason: str = "the writer was closed before the run stopped") -> None:
        """Finish every open run as incomplete: write what arrived, keep the store.

        For runs whose stop document will never come (a service shutting
        down, a recorded file that ends early). Their stores keep
        ``bluesky_zarr.complete == False`` and record ``reason``. With
        ``tiled=``, also closes the connection to Tiled (a later run opens
        it again); a run not registered by then is in :attr:`tiled_failures`.
        When it returns, no thread of the writer runs (a later run starts
        them again).
        """
        with self._lock:
            self._close_runs(reason)

    def _close_runs(self, reason: str, exit_status: str | None = None) -> None:
        errors: list[BaseException] = []
        for uid in list(self._routes.runs):
            run = self._routes.runs[uid]
            try:
                run.close_incomplete(reason, exit_status)
            except Exception as err:  # noqa: BLE001 - finish the others, then raise
                errors.append(err)
            self._register_finished(uid)
            self._forget(uid)
        if self._tiled is not None:
            self._tiled.close()
        self.buffer.stop(join=True)
        if errors:
            raise errors[0]

    def _interrupt(self, reason: str) -> None:
        """The process is ending: finish every open run as aborted (exit
        status ``"abort"``, ``reason``), end the threads, and take no document
        any more. Waits at most ``INTERRUPT_WAIT`` seconds for a document being
        taken on another thread (a RunEngine's) to be done."""
        locked = self._lock.acquire(timeout=INTERRUPT_WAIT)
        try:
            self._shut = reason
            for uid, run in list(self._routes.runs.items()):
                if isinstance(run.path, Path) and not run.path.is_dir():
                    logger.warning("bluesky-zarr: %s; the store %s is gone", reason, run.path)
                    run.discard()
                    self._forget(uid)
            if self._routes.runs:
                runs = self._routes.runs
                logger.warning(
                    "bluesky-zarr: %s; finishing %d open run(s): %s", reason, len(runs),
                    ", ".join(str(run.path) for run in runs.values()),
                )
            self._close_runs(reason, exit_status="abort")
        finally:
            if locked:
                self._lock.release()

    def close_run(self, uid: str, reason: str) -> None:
        """Finish one open run as incomplete (as :meth:`close` does) and forget
        it, so that its documents may be given again from its start document
        (which then replaces the unfinished store with ``overwrite="incomplete"``)."""
        with self._lock:
            run = self._routes.runs.get(uid)
            if run is None:
                self._routes.close(uid, None, ended=False)
                return
            try:
                run.close_incomplete(reason)
            finally:
                # Its documents may come again: they are the run's, not late ones.
                self._forget(uid, ended=False)

    @property
    def open_runs(self) -> Iterable[Path | str]:
        """Stores of the runs started and not yet stopped."""
        return [run.path for run in self._routes.runs.values() if run.path is not None]
