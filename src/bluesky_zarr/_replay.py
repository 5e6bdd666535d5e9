"""``replay``: recorded document files (suitcase-jsonl, suitcase-msgpack) to stores.

Files are read as a stream, one document at a time, so a file of any size
replays in bounded memory. A file that cannot be read or holds something
other than ``(name, document)`` pairs raises :class:`~bluesky_zarr.ReplayError`
naming the file and the line (JSON lines) or byte offset (msgpack); the stores
of the runs before it are kept and a run it leaves open is kept, marked
incomplete. A run whose file holds no stop document is kept, marked
incomplete, and the other files are replayed before a ``ReplayError`` lists
such runs. A run already written
(the same run in two files, or a store that already holds it) is reported
and skipped.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ._catalog import count_written_points, run_attributes, summarise_root
from ._errors import BlueskyZarrError, MissingDependencyError, ReplayError, StoreExistsError
from ._plan import store_name, store_path
from ._storage import LocalRoot
from ._writer import ZarrWriter

#: File name endings understood, after an optional ``.gz``.
FORMATS = (".jsonl", ".msgpack")


@dataclass
class ReplayedRun:
    """One run found in a recorded file, and where it went."""

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
    #: Why the run was not written again (it already was), else None.
    skipped: str | None = None


@dataclass
class ReplayReport:
    """What :func:`replay` did: the runs written, per file, in order."""

    runs: list[ReplayedRun] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    #: ``(store, error)`` of each store that could not be registered with Tiled
    #: (``tiled=``); the stores are written all the same.
    tiled_failures: list[tuple[str, str]] = field(default_factory=list)


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
    **options: Any,
) -> ReplayReport:
    """Write the runs recorded in ``paths`` into stores below ``directory``.

    Parameters
    ----------
    paths
        suitcase-jsonl (``.jsonl``) or suitcase-msgpack (``.msgpack``) files,
        optionally gzipped (``.gz``).
    directory
        Root of the stores: a directory or an ``s3://bucket/prefix`` URL.
    progress
        Show a progress bar (tqdm) per file, on stderr.
    **options
        Keyword options of :class:`~bluesky_zarr.ZarrWriter` (with ``tiled=``,
        each run is registered with Tiled as it is written).

    Raises
    ------
    ReplayError
        At the first file that is unreadable, malformed or truncated, or whose
        documents the writer refuses; after the last file if runs had no stop
        document. ``error.report`` holds what was written.
    """
    for path in paths:
        file_format(path)
    writer = ZarrWriter(directory, **options)
    report = ReplayReport()
    batch = _Batch(writer, options.get("storage_options"))
    for path in paths:
        try:
            _replay_file(batch, path, report, progress)
        except BaseException as err:
            writer.close(f"replaying {path} failed before the run stopped")
            report.tiled_failures = writer.tiled_failures
            for run in report.runs:
                if run.written_points is None and run.skipped is None:
                    batch.count(run)
            if isinstance(err, ReplayError):
                err.report = report
            raise
        report.files.append(str(path))
    writer.close()  # no run is open: this waits for Tiled and closes its connection
    report.tiled_failures = writer.tiled_failures
    if batch.unstopped:
        listed = "; ".join(f"{path}: {uid}" for path, uid in batch.unstopped)
        error = ReplayError(
            f"{len(batch.unstopped)} run(s) have no stop document in their file "
            f"(truncated, or its RunEngine was killed), kept as incomplete: {listed}",
            path=batch.unstopped[0][0],
            location="end of file",
        )
        error.report = report
        raise error
    return report


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
        #: (file, start uid) of the runs whose file holds no stop document.
        self.unstopped: list[tuple[str, str]] = []

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

    def store_of(self, start: Mapping[str, Any]) -> str:
        """Where the writer puts a run's store (without making anything)."""
        storage = self.writer.storage
        template = self.writer.options.name_template
        if isinstance(storage, LocalRoot):
            return str(store_path(storage.directory, template, start))
        return "/".join([str(storage.display), *store_name(template, start)])

    def count(self, run: ReplayedRun) -> None:
        """Fill in the points the run's store holds, as its root records them."""
        if run.store is None:
            return
        try:
            attrs = run_attributes(run.store, self.storage_options)
        except (BlueskyZarrError, OSError):
            return
        if attrs is not None:
            entry = summarise_root(str(run.store), attrs, ())
            run.written_points = entry["written_points"]
            run.planned_points = entry["planned_points"]
            if run.written_points is None:  # the writer never recorded its end
                run.written_points = count_written_points(
                    str(run.store), entry["stream"], self.storage_options
                )


def _replay_file(
    batch: _Batch, path: str | os.PathLike[str], report: ReplayReport, progress: bool
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

        where = "line 1"
        writer = batch.writer
        try:
            for name, doc, location in read_documents(path, advance):
                where = location
                if batch.skips(name, doc):
                    continue
                if name == "start":
                    _start(batch, path, doc, report, runs)
                    continue
                writer(name, doc)
                if name == "stop" and doc.get("run_start") in runs:
                    run = runs.pop(doc["run_start"])
                    run.exit_status = str(doc.get("exit_status", "unknown"))
                    num_events = doc.get("num_events") or {}
                    run.num_events = int(sum(num_events.values()))
                    batch.count(run)
        except ReplayError:
            raise
        except BlueskyZarrError as err:
            raise ReplayError(f"{path}, {where}: {err}", path=str(path), location=where) from err
    if runs:
        # Runs this file never stops (its RunEngine was killed, or the file
        # was cut at the end of a line): kept, marked incomplete, and the
        # batch goes on; replay() raises once every file is written.
        batch.writer.close(f"{Path(path).name} holds no stop document for this run")
        for run in runs.values():
            batch.count(run)
            batch.unstopped.append((str(path), run.uid))


def _start(
    batch: _Batch,
    path: str | os.PathLike[str],
    doc: dict[str, Any],
    report: ReplayReport,
    runs: dict[str, ReplayedRun],
) -> None:
    """Start a run's store, or skip the run if it was already written."""
    uid = doc.get("uid")
    run = ReplayedRun(
        file=str(path),
        uid=str(uid),
        plan_name=str(doc.get("plan_name", "")),
        scan_id=doc.get("scan_id"),
    )
    earlier = batch.written.get(uid) if isinstance(uid, str) else None
    if earlier is not None:
        run.store = earlier.store
        report.runs.append(run)
        why = f"already written from {Path(earlier.file).name}"
        if (earlier.file, uid) in batch.unstopped:
            why += (
                ", incomplete: that file holds no stop document for it (replay this file "
                "alone, and pass overwrite=True to write it whole)"
            )
        batch.skip(run, why)
        return
    try:
        batch.writer("start", doc)
    except StoreExistsError:
        store = batch.store_of(doc)
        attrs = run_attributes(store, batch.storage_options)
        start = attrs.get("start") if attrs is not None else None
        if not isinstance(start, Mapping) or start.get("uid") != uid:
            raise  # another run's store: never overwritten
        run.store = store
        report.runs.append(run)
        entry = summarise_root(store, attrs or {}, ())
        state = "" if entry["state"] == "complete" else f", {entry['state']}: {entry['why']}"
        batch.skip(run, f"already written{state} (pass overwrite=True to write it again)")
        return
    run.store = batch.writer.stores[-1]
    runs[run.uid] = run
    report.runs.append(run)
    batch.written[run.uid] = run


def format_summary(report: ReplayReport, directory: str | os.PathLike[str]) -> str:
    """A person's summary of a replay: one line per run."""
    skipped = sum(run.skipped is not None for run in report.runs)
    lines = [
        f"Replayed {len(report.files)} file(s), {len(report.runs) - skipped} run(s) into "
        f"{directory}" + (f", {skipped} run(s) skipped" if skipped else "") + ":"
    ]
    for run in report.runs:
        head = (
            f"  {Path(run.file).name}: {run.plan_name or '?'} scan_id={run.scan_id} "
            f"uid={run.uid[:8]}"
        )
        if run.skipped is not None:
            lines.append(f"{head} skipped: {run.skipped} -> {run.store}")
            continue
        written = "?" if run.written_points is None else run.written_points
        planned = "?" if run.planned_points is None else run.planned_points
        status = run.exit_status or "INCOMPLETE (no stop document)"
        lines.append(
            f"{head} {written} of {planned} points written, {status} -> {run.store}"
        )
    return "\n".join(lines)
