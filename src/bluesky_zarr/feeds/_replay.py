"""``replay``: recorded document files (suitcase-jsonl, suitcase-msgpack) to stores.

Files are read as a stream, one document at a time, so a file of any size
replays in bounded memory. A file that cannot be read or holds something
other than ``(name, document)`` pairs raises :class:`~bluesky_zarr.ReplayError`
naming the file and the line (JSON lines) or byte offset (msgpack); the stores
of the runs before it are kept and a run it leaves open is kept, marked
incomplete. A run whose file holds no stop document, a run some of whose
documents the writer refuses (kept in its store, see ``ZarrWriter``) and a
run whose store cannot be made do not stop the batch: the other documents
and files are replayed, then a ``ReplayError`` lists such runs. A run already
written (the same run in two files, or a store that already holds it) is
reported and skipped. SIGINT (Ctrl-C) or SIGTERM ends the replay after the
document at hand, with the open runs' stores finished as incomplete
(``ReplayInterrupted``).

ophyd v1 resources are read with the handlers given (``handler_registry=``),
this package's own, and those installed packages declare (``_handlers``).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .._errors import (
    BlueskyZarrError,
    MissingDependencyError,
    ReplayError,
    ReplayInterrupted,
    StoreExistsError,
)
from ..catalog._ls import count_written_points, run_attributes, summarise_root
from ..external._data import DEFAULT_HANDLERS, VIRTUAL_HANDLERS
from ..external._handlers import handler_registry
from ..write._writer import ZarrWriter

#: The ``location`` of the ReplayError raised after the last file, listing
#: the runs not replayed whole.
BATCH_END = "end of the batch"

#: File name endings understood, after an optional ``.gz``.
FORMATS = (".jsonl", ".msgpack")


@dataclass
class ReplayedRun:
    """One run found in a recorded file, and what became of it."""

    file: str
    uid: str
    store: Path | str | None = None
    plan_name: str = ""
    scan_id: Any = None
    num_events: int = 0
    exit_status: str | None = None
    #: Points of the scan's stream on disk, and the points the plan announced.
    written_points: int | None = None
    planned_points: int | None = None
    #: The scan's stream (``primary`` unless the plan says otherwise).
    stream: str = "primary"
    #: Per stream: points on disk, and the points expected (the stop
    #: document's ``num_events``, or the plan's for the scan's stream).
    streams: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    #: Why the run was not written again (it already was), else None.
    skipped: str | None = None
    #: Why the run was not written at all (its start was refused), else None.
    not_written: str | None = None
    #: Whether its file holds its stop document.
    stopped: bool = False
    #: Documents of the run the writer refused (kept in its store), and the
    #: first refusal: where in the file, and why.
    refused: int = 0
    first_refusal: str | None = None
    #: The signal that stopped the replay while the run was open, else None.
    interrupted: str | None = None
    #: As the store records its end: complete or not, and why not.
    complete: bool | None = None
    why: str | None = None

    def problem(self) -> str | None:
        """What keeps the run from being written whole from its file, or None."""
        head = f"{Path(self.file).name}: run {self.uid}"
        if self.not_written is not None:
            return f"{head} not written: {self.not_written}"
        if self.skipped is not None:
            return None
        if self.interrupted is not None:
            return f"{head} interrupted ({self.interrupted}), kept as incomplete"
        if self.refused:
            return (
                f"{head}: {self.refused} document(s) refused (kept in its store), the "
                f"first {self.first_refusal}"
            )
        if not self.stopped:
            return (
                f"{head} has no stop document in its file (truncated, or its RunEngine "
                f"was killed), kept as incomplete"
            )
        return None


@dataclass
class ReplayReport:
    """What :func:`replay` did: the runs written, per file, in order."""

    runs: list[ReplayedRun] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    #: ``(store, error)`` of each store that could not be registered with Tiled
    #: (``tiled=``); the stores are written all the same.
    tiled_failures: list[tuple[str, str]] = field(default_factory=list)
    #: Documents refused that belong to no run of the files (where, and why).
    strays: list[str] = field(default_factory=list)
    #: The signal that stopped the replay (``SIGINT``, ``SIGTERM``), else None.
    interrupted: str | None = None

    def problems(self) -> list[str]:
        """One sentence per run not written whole, and per stray document."""
        found = [p for p in (run.problem() for run in self.runs) if p is not None]
        return found + self.strays


def file_format(path: str | os.PathLike[str]) -> tuple[str, bool]:
    """The format (``.jsonl`` or ``.msgpack``) of a recorded file, and whether gzipped."""
    name = Path(path).name.lower()
    gzipped = name.endswith(".gz")
    if gzipped:
        name = name[: -len(".gz")]
    for suffix in FORMATS:
        if name.endswith(suffix):
            return suffix, gzipped
    raise ReplayError(
        f"{path}: unknown format; expected a suitcase-jsonl (.jsonl) or "
        f"suitcase-msgpack (.msgpack) file, optionally gzipped (.gz)",
        path=str(path),
    )


class _Counting(io.RawIOBase):
    """A read-only stream that counts the bytes read through it."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.stream.read(len(buffer))
        buffer[: len(data)] = data
        self.count += len(data)
        return len(data)


def read_documents(
    path: str | os.PathLike[str], progress: Callable[[int], None] | None = None
) -> Iterator[tuple[str, dict[str, Any], str]]:
    """Yield ``(name, document, location)`` from a recorded file.

    ``location`` is ``"line N"`` or ``"byte N"``. ``progress`` is called with
    the number of bytes of the file (as stored, compressed or not) read so far.
    """
    suffix, gzipped = file_format(path)
    try:
        raw = open(path, "rb")
    except OSError as err:
        raise ReplayError(f"{path}: cannot open: {err}", path=str(path)) from err
    with raw:
        stream: IO[bytes] = (
            gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw  # type: ignore[assignment]
        )
        report = (lambda: progress(raw.tell())) if progress is not None else (lambda: None)
        if suffix == ".jsonl":
            yield from _read_jsonl(path, stream, report)
        else:
            yield from _read_msgpack(path, stream, report)


def _decode_failure(path: Any, where: str, err: Exception) -> ReplayError:
    if isinstance(err, (EOFError, gzip.BadGzipFile, zlib.error)):
        what = f"the gzip stream is truncated or corrupt ({err})"
    else:
        what = f"cannot read it: {err}"
    return ReplayError(f"{path}, {where}: {what}", path=str(path), location=where)


def _pair(path: Any, where: str, item: Any) -> tuple[str, dict[str, Any]]:
    if (
        not isinstance(item, (list, tuple))
        or len(item) != 2
        or not isinstance(item[0], str)
        or not isinstance(item[1], dict)
    ):
        preview = repr(item)
        preview = preview if len(preview) <= 80 else preview[:77] + "..."
        raise ReplayError(
            f"{path}, {where}: expected a [name, document] pair, got {preview}",
            path=str(path),
            location=where,
        )
    return item[0], item[1]


def _read_jsonl(
    path: Any, stream: IO[bytes], report: Callable[[], None]
) -> Iterator[tuple[str, dict[str, Any], str]]:
    lineno = 0
    while True:
        where = f"line {lineno + 1}"
        try:
            line = stream.readline()
        except (OSError, EOFError, zlib.error) as err:
            raise _decode_failure(path, where, err) from err
        if not line:
            return
        lineno += 1
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except (ValueError, UnicodeDecodeError) as err:
            hint = "" if line.endswith(b"\n") else " (the file ends mid-line: truncated?)"
            raise ReplayError(
                f"{path}, {where}: not valid JSON{hint}: {err}", path=str(path), location=where
            ) from err
        name, doc = _pair(path, where, item)
        report()
        yield name, doc, where


def _read_msgpack(
    path: Any, stream: IO[bytes], report: Callable[[], None]
) -> Iterator[tuple[str, dict[str, Any], str]]:
    try:
        import msgpack
        import msgpack_numpy
    except ImportError:
        raise MissingDependencyError(
            "replaying .msgpack files needs msgpack and msgpack-numpy: "
            "pip install \"bluesky-zarr[replay]\""
        ) from None
    counting = _Counting(stream)
    unpacker = msgpack.Unpacker(
        counting, object_hook=msgpack_numpy.decode, raw=False, strict_map_key=False
    )
    offset = 0
    while True:
        where = f"byte {offset}"
        try:
            item = next(unpacker)
        except StopIteration:
            break
        except (ValueError, msgpack.UnpackException, OSError, EOFError, zlib.error) as err:
            raise _decode_failure(path, where, err) from err
        name, doc = _pair(path, where, item)
        report()
        yield name, doc, where
        offset = unpacker.tell()
    if counting.count > offset:
        where = f"byte {offset}"
        raise ReplayError(
            f"{path}, {where}: the file ends inside a document "
            f"({counting.count - offset} bytes left over): truncated?",
            path=str(path),
            location=where,
        )


def replay(
    paths: Sequence[str | os.PathLike[str]],
    directory: str | os.PathLike[str],
    *,
    progress: bool = True,
    installed_handlers: bool = True,
    **options: Any,
) -> ReplayReport:
    """Write the runs recorded in ``paths`` into stores below ``directory``.

    A document the writer refuses does not stop the replay: it is kept in its
    run's store (``refused_documents.jsonl``), the run is marked incomplete,
    and the other documents and files are replayed.

    Parameters
    ----------
    paths
        suitcase-jsonl (``.jsonl``) or suitcase-msgpack (``.msgpack``) files,
        optionally gzipped (``.gz``).
    directory
        Root of the stores: a directory or an ``s3://bucket/prefix`` URL.
    progress
        Show a progress bar (tqdm) per file, on stderr.
    installed_handlers
        Also read ophyd v1 resources with the handlers that installed
        packages declare (entry points ``databroker.handlers``, as
        ``area-detector-handlers`` installs them) for the specs this package
        does not read itself; ``handler_registry=`` comes first.
    **options
        Keyword options of :class:`~bluesky_zarr.ZarrWriter` (with ``tiled=``,
        each run is registered with Tiled as it is written).

    Raises
    ------
    ReplayError
        At the first file that is unreadable, malformed or truncated; after
        the last file if runs had no stop document, had documents refused, or
        could not be written. ``error.report`` holds what was written.
    ReplayInterrupted
        On SIGINT (Ctrl-C) or SIGTERM, once the open runs are finished and
        kept as incomplete; ``error.report`` holds what was written. (A second
        Ctrl-C raises ``KeyboardInterrupt`` at once.)
    """
    for path in paths:
        # Every file, before anything is written: a mistyped name among many
        # is said at once, not after hours of replay.
        file_format(path)
        try:
            with open(path, "rb"):
                pass
        except OSError as err:
            raise ReplayError(f"{path}: cannot open: {err}", path=str(path)) from err
    if installed_handlers:
        built_in = set(DEFAULT_HANDLERS)
        if options.get("external") == "virtual":
            built_in |= set(VIRTUAL_HANDLERS)
        options["handler_registry"] = handler_registry(
            options.get("handler_registry"), built_in
        )
    writer = ZarrWriter(directory, **options)
    report = ReplayReport()
    batch = _Batch(writer, options.get("storage_options"))
    with _Interruption() as interruption:
        for path in paths:
            try:
                _replay_file(batch, path, report, progress, interruption)
            except BaseException as err:
                what = (
                    "the replay was interrupted" if isinstance(err, KeyboardInterrupt)
                    else f"replaying {path} failed"
                )
                writer.close(f"{what} before the run stopped")
                report.tiled_failures = writer.tiled_failures
                for run in report.runs:
                    if run.written_points is None and run.skipped is None:
                        batch.count(run)
                if isinstance(err, ReplayError):
                    err.report = report
                raise
            report.files.append(str(path))
            if interruption.signal is not None:
                break
    writer.close()  # no run is open: this waits for Tiled and closes its connection
    report.tiled_failures = writer.tiled_failures
    if interruption.signal is not None:
        report.interrupted = interruption.signal
        raise ReplayInterrupted(interruption.signal, report)
    problems = report.problems()
    if problems:
        error = ReplayError(
            f"{len(problems)} run(s) or document(s) not replayed whole: " + "; ".join(problems),
            path=next((run.file for run in report.runs if run.problem()), ""),
            location=BATCH_END,
        )
        error.report = report
        raise error
    return report


class _Interruption:
    """SIGINT and SIGTERM while a replay runs: the first one stops the replay
    after the document at hand (so every store is finished); a second
    SIGINT raises ``KeyboardInterrupt`` at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        #: The name of the signal received, else None.
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def _received(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __enter__(self) -> _Interruption:
        # Signal handlers belong to the main thread; elsewhere no signal
        # interrupts the replay anyway.
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                if signal.getsignal(signum) == signal.SIG_IGN:
                    continue  # ignored by whoever started us (a background job)
                self._previous[signum] = signal.signal(signum, self._received)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class _Batch:
    """What a replay keeps across its files: the runs written, and those skipped."""

    def __init__(self, writer: ZarrWriter, storage_options: Any) -> None:
        self.writer = writer
        self.storage_options = storage_options
        #: Every run written so far, by start uid.
        self.written: dict[str, ReplayedRun] = {}
        self.skipped_runs: set[str] = set()
        #: Descriptors and (stream) resources of the skipped runs.
        self.skipped_ids: set[Any] = set()
        #: The start uid of each descriptor and (stream) resource of the runs written.
        self.owners: dict[str, str] = {}

    def skips(self, name: str, doc: Mapping[str, Any]) -> bool:
        """Whether a document belongs to a run that is skipped."""
        try:
            if name in ("descriptor", "resource", "stream_resource"):
                if doc.get("run_start") in self.skipped_runs:
                    self.skipped_ids.add(doc.get("uid"))
                    return True
                return False
            if name == "stop":
                return doc.get("run_start") in self.skipped_runs
            if name in ("event", "event_page"):
                return doc.get("descriptor") in self.skipped_ids
            if name in ("datum", "datum_page"):
                return doc.get("resource") in self.skipped_ids
            if name == "stream_datum":
                return (
                    doc.get("stream_resource") in self.skipped_ids
                    or doc.get("descriptor") in self.skipped_ids
                )
        except TypeError:  # an unhashable id: the writer refuses it clearly
            return False
        return False

    def skip(self, run: ReplayedRun, why: str) -> None:
        run.skipped = why
        self.skipped_runs.add(run.uid)

    def owner(
        self, name: str, doc: Mapping[str, Any], latest: ReplayedRun | None
    ) -> ReplayedRun | None:
        """The run a document belongs to (noting the descriptors and resources
        of each run); ``latest``, the run its file started last, for old
        resource documents that do not name their run."""
        try:
            if name in ("descriptor", "stop", "resource", "stream_resource"):
                uid = doc.get("run_start")
                if uid is None and name == "resource" and latest is not None:
                    uid = latest.uid
                if name != "stop" and isinstance(doc.get("uid"), str) and isinstance(uid, str):
                    self.owners[doc["uid"]] = uid
            elif name in ("event", "event_page", "stream_datum"):
                uid = self.owners.get(doc.get("descriptor"))  # type: ignore[arg-type]
            elif name in ("datum", "datum_page"):
                uid = self.owners.get(doc.get("resource"))  # type: ignore[arg-type]
            else:
                uid = None
            return self.written.get(uid) if isinstance(uid, str) else None
        except TypeError:  # an unhashable id
            return None

    def store_of(self, start: Mapping[str, Any]) -> str:
        """Where the writer puts a run's store (without making anything)."""
        return str(self.writer.storage.where(self.writer.options.name_template, start))

    def count(self, run: ReplayedRun) -> None:
        """Fill in the points the run's store holds, and how it ended, as its
        root records them."""
        if run.store is None:
            return
        try:
            attrs = run_attributes(run.store, self.storage_options)
        except (BlueskyZarrError, OSError):
            return
        if attrs is None:
            return
        entry = summarise_root(str(run.store), attrs, ())
        run.stream = str(entry["stream"])
        run.written_points = entry["written_points"]
        run.planned_points = entry["planned_points"]
        if run.written_points is None:  # the writer never recorded its end
            run.written_points = count_written_points(
                str(run.store), entry["stream"], self.storage_options
            )
        info = attrs.get("bluesky_zarr") or {}
        run.complete = bool(info.get("complete"))
        run.why = info.get("incomplete_reason")
        kept = info.get("refused_documents")
        if isinstance(kept, int) and kept > run.refused:
            # The store counts refusals the replay did not see raised (a
            # document held until its point was known, refused then).
            run.refused = kept
        stop = attrs.get("stop") if isinstance(attrs.get("stop"), Mapping) else {}
        num_events = stop.get("num_events") if isinstance(stop, Mapping) else None
        expected = dict(num_events) if isinstance(num_events, Mapping) else {}
        found = info.get("streams")
        summaries: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
        run.streams = {}
        for name in sorted(set(summaries) | set(expected)):
            summary = summaries.get(name)
            written = int(summary.get("written_points", 0)) if isinstance(summary, Mapping) else 0
            count = expected.get(name)
            run.streams[str(name)] = (
                written, int(count) if isinstance(count, int) else None
            )
        if run.stream in run.streams or run.written_points:
            run.streams[run.stream] = (run.written_points or 0, run.planned_points)


def _replay_file(
    batch: _Batch,
    path: str | os.PathLike[str],
    report: ReplayReport,
    progress: bool,
    interruption: _Interruption,
) -> None:
    try:
        from tqdm import tqdm
    except ImportError:
        raise MissingDependencyError(
            "replay needs tqdm: pip install \"bluesky-zarr[replay]\""
        ) from None

    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise ReplayError(f"{path}: cannot open: {err}", path=str(path)) from err
    runs: dict[str, ReplayedRun] = {}
    latest: ReplayedRun | None = None
    with tqdm(
        total=size,
        unit="B",
        unit_scale=True,
        desc=Path(path).name,
        disable=not progress,
        leave=True,
    ) as bar:

        def advance(position: int) -> None:
            bar.update(position - bar.n)

        writer = batch.writer
        for name, doc, where in read_documents(path, advance):
            if interruption.signal is not None:
                break
            if batch.skips(name, doc):
                continue
            if name == "start":
                started = _start(batch, path, doc, report, runs)
                latest = started or latest
                continue
            run = batch.owner(name, doc, latest)
            if name == "stop" and run is not None and run.uid in runs:
                # The file holds the stop document, whether or not the
                # writer takes it (a stop always finishes its store).
                run.stopped = True
                run.exit_status = str(doc.get("exit_status", "unknown"))
                num_events = doc.get("num_events") or {}
                if isinstance(num_events, Mapping):
                    run.num_events = int(
                        sum(n for n in num_events.values() if isinstance(n, int))
                    )
            try:
                writer(name, doc)
            except BlueskyZarrError as err:
                # Kept in the run's store by the writer; the replay goes on.
                refusal = f"at {where}: {type(err).__name__}: {err}"
                if run is None:
                    report.strays.append(
                        f"{Path(path).name}, {where}: a {name} document of no run "
                        f"in the files was refused: {type(err).__name__}: {err}"
                    )
                else:
                    run.refused += 1
                    if run.first_refusal is None:
                        run.first_refusal = refusal
            if name == "stop" and run is not None and runs.pop(run.uid, None) is not None:
                batch.count(run)
    if runs:
        # Runs this file never stops (its RunEngine was killed, the file
        # was cut at the end of a line, or the replay was interrupted): kept,
        # marked incomplete, and the batch goes on; replay() raises once
        # every file is written.
        if interruption.signal is not None:
            reason = f"the replay was interrupted ({interruption.signal}) before the run stopped"
        else:
            reason = f"{Path(path).name} holds no stop document for this run"
        batch.writer.close(reason)
        for run in runs.values():
            run.interrupted = interruption.signal
            batch.count(run)


def _start(
    batch: _Batch,
    path: str | os.PathLike[str],
    doc: dict[str, Any],
    report: ReplayReport,
    runs: dict[str, ReplayedRun],
) -> ReplayedRun | None:
    """Start a run's store, or skip the run if it was already written (or
    cannot be written); the run, if it is written."""
    uid = doc.get("uid")
    run = ReplayedRun(
        file=str(path),
        uid=str(uid),
        plan_name=str(doc.get("plan_name", "")),
        scan_id=doc.get("scan_id"),
    )
    report.runs.append(run)
    earlier = batch.written.get(uid) if isinstance(uid, str) else None
    if earlier is not None:
        run.store = earlier.store
        why = f"already written from {Path(earlier.file).name}"
        if not earlier.stopped:
            why += (
                ", incomplete: that file holds no stop document for it (replay this file "
                "alone, and pass overwrite=True to write it whole)"
            )
        batch.skip(run, why)
        return None
    try:
        batch.writer("start", doc)
    except StoreExistsError as err:
        store = batch.store_of(doc)
        attrs = run_attributes(store, batch.storage_options)
        start = attrs.get("start") if attrs is not None else None
        if not isinstance(start, Mapping) or start.get("uid") != uid:
            # Another run's store: never overwritten.
            run.not_written = str(err)
            batch.skipped_runs.add(run.uid)
            return None
        run.store = store
        entry = summarise_root(store, attrs or {}, ())
        state = "" if entry["state"] == "complete" else f", {entry['state']}: {entry['why']}"
        batch.skip(run, f"already written{state} (pass overwrite=True to write it again)")
        return None
    except BlueskyZarrError as err:
        run.not_written = f"{type(err).__name__}: {err}"
        batch.skipped_runs.add(run.uid)
        return None
    run.store = batch.writer.stores[-1]
    runs[run.uid] = run
    batch.written[run.uid] = run
    return run


def _points(run: ReplayedRun) -> str:
    """The points written of each stream: the scan's stream first."""

    def share(counts: tuple[int, int | None]) -> str:
        return f"{counts[0]} of {'?' if counts[1] is None else counts[1]}"

    others = [f"{name} {share(c)}" for name, c in run.streams.items() if name != run.stream]
    if run.stream in run.streams:
        text = f"{share(run.streams[run.stream])} points written"
        return text + (f" ({', '.join(others)})" if others else "")
    if others:
        return f"no {run.stream} stream; points written: {', '.join(others)}"
    written = "?" if run.written_points is None else run.written_points
    planned = "?" if run.planned_points is None else run.planned_points
    return f"{written} of {planned} points written"


def _status(run: ReplayedRun) -> str:
    if run.interrupted is not None:
        return f"INTERRUPTED ({run.interrupted}) before its stop document, kept as incomplete"
    if not run.stopped:
        return "INCOMPLETE (no stop document)"
    status = run.exit_status or "unknown"
    if run.refused:
        status += (
            f", INCOMPLETE: {run.refused} document(s) REFUSED, kept in the store; the "
            f"first {run.first_refusal}"
        )
    elif run.complete is False and run.why:
        status += f", INCOMPLETE: {run.why}"
    return status


def format_summary(report: ReplayReport, directory: str | os.PathLike[str]) -> str:
    """A person's summary of a replay: one line per run."""
    skipped = sum(run.skipped is not None for run in report.runs)
    failed = sum(run.not_written is not None for run in report.runs)
    written = len(report.runs) - skipped - failed
    head = f"Replayed {len(report.files)} file(s), {written} run(s) into {directory}"
    if skipped:
        head += f", {skipped} run(s) skipped"
    if failed:
        head += f", {failed} run(s) NOT WRITTEN"
    if report.interrupted:
        head += f" (INTERRUPTED by {report.interrupted}: files after it were not replayed)"
    lines = [head + ":"]
    for run in report.runs:
        name = (
            f"  {Path(run.file).name}: {run.plan_name or '?'} scan_id={run.scan_id} "
            f"uid={run.uid[:8]}"
        )
        if run.skipped is not None:
            lines.append(f"{name} skipped: {run.skipped} -> {run.store}")
        elif run.not_written is not None:
            lines.append(f"{name} NOT WRITTEN: {run.not_written}")
        else:
            lines.append(f"{name} {_points(run)}, {_status(run)} -> {run.store}")
    lines.extend(f"  {stray}" for stray in report.strays)
    return "\n".join(lines)
