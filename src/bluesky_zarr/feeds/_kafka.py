"""``serve --kafka``: a consumer-group service writing every run published to Kafka.

RunEngines publish their documents with bluesky-kafka's ``Publisher``: one
message per document, keyed by the publisher's ``key`` (so all the documents
of one publisher, hence of each of its runs, land in one partition, in order),
its value ``msgpack.dumps((name, doc))`` with ``msgpack_numpy`` encoding the
arrays. Several instances of this service in one consumer group share the
partitions, and so the runs.

The consumer is confluent-kafka's, used directly rather than through
bluesky-kafka's ``BlueskyConsumer``/``RemoteDispatcher``: the guarantees below
need control that those classes keep to themselves — offsets committed by hand
per partition, only up to the first document of the oldest run still open
there; partition revocation handled (the runs of a revoked partition closed
before another instance takes it); a partition rewound to a run's start. The
messages are decoded exactly as bluesky-kafka encodes them (msgpack with
``msgpack_numpy``).

Delivery guarantees
-------------------
* A partition's committed offset never passes the start document of a run
  still open in this instance: after a crash (even ``SIGKILL``), whoever takes
  the partition re-reads every unfinished run from its start and rewrites its
  store (the same store: ``overwrite="incomplete"`` replaces only an
  unfinished store of that run's uid). A store finished by its stop document
  is never rewritten: its run's documents are skipped when they are re-read.
* Documents delivered twice (the same uid within a run) are ignored.
* A document the writer refuses is kept in its run's store
  (``refused_documents.jsonl``), logged, and consumption goes on.
* SIGTERM or SIGINT: open runs are finished as incomplete (and rewritten from
  the broker when their partition is read again), offsets of finished runs
  are committed, the instance leaves the group.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._errors import (
    BlueskyZarrError,
    DocumentError,
    MissingDependencyError,
    ServeError,
    StoreLockedError,
)
from ..storage._records import run_finished
from ..write._writer import ZarrWriter
from ._serve import give_document

logger = logging.getLogger("bluesky_zarr.kafka")

#: Consumer settings the guarantees rest on; a user's configuration may not change them.
_FIXED_CONFIG = {"enable.auto.commit": "false", "enable.auto.offset.store": "false"}

#: Consumer settings used unless the user's configuration says otherwise.
_DEFAULT_CONFIG = {
    "auto.offset.reset": "earliest",
    # Moving one partition between instances, not all of them, at each join.
    "partition.assignment.strategy": "cooperative-sticky",
}

#: Finished runs remembered, to recognise their documents delivered again.
FINISHED_RUNS_KEPT = 1000

#: Seconds before a run whose store another live writer holds is tried again.
LOCKED_RETRY_SECONDS = 1.0


#: librdkafka's own log, passed through Python's logging; its lines about
#: brokers that cannot be reached are left out (they repeat several times a
#: second: the status line reports them).
librdkafka_logger = logging.getLogger("bluesky_zarr.kafka.librdkafka")

#: librdkafka log facilities that report a broker connection failing, which
#: its error callback reports too.
_CONNECTION_FACILITIES = frozenset({"FAIL"})

#: Seconds the status line waits at most to learn whether a broker answers.
PROBE_SECONDS = 2.0


class _QuietConnectionFailures(logging.Filter):
    """Leaves out librdkafka's lines about failing broker connections."""

    def filter(self, record: logging.LogRecord) -> bool:
        # confluent-kafka logs ("%s [%s] %s", facility, client name, message).
        args = record.args if isinstance(record.args, tuple) else ()
        return not (args and str(args[0]) in _CONNECTION_FACILITIES)


librdkafka_logger.addFilter(_QuietConnectionFailures())


class BrokerHealth:
    """Whether the brokers are reached, from librdkafka's error callback: the
    first failure is logged at once, the following ones are counted and
    reported in the status line, once per interval."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        #: Broker errors since the last status line, and the last one.
        self.errors = 0
        self.last_error: str | None = None
        #: Whether the last status found the brokers unreachable.
        self.unreachable = False
        self._since: float | None = None

    def error(self, error: Any) -> None:
        """librdkafka's ``error_cb``: a broker failure (or a fatal error)."""
        self.errors += 1
        self.last_error = error.str() if hasattr(error, "str") else str(error)
        if not self.unreachable and self.errors == 1:
            logger.warning(
                "Kafka: %s (brokers %s); retrying, reported in each status line",
                self.last_error, self.bootstrap,
            )
        if self._since is None:
            self._since = time.monotonic()

    def check(self, probe: Any) -> str | None:
        """Called at each status line: None when the brokers answer, else
        what is wrong. ``probe()`` asks a broker (raising if none answers);
        it is called only after errors, to learn whether they are over."""
        if self.errors == 0 and not self.unreachable:
            return None
        errors, self.errors = self.errors, 0
        try:
            probe()
        except Exception as err:  # noqa: BLE001 - whatever the client raises
            self.unreachable = True
            since = time.monotonic() - (self._since or time.monotonic())
            return (
                f"NOT CONNECTED: cannot reach the Kafka brokers {self.bootstrap} for "
                f"{since:.0f} s ({errors} failure(s) since the last status; the last: "
                f"{self.last_error or err})"
            )
        if self.unreachable:
            logger.info("Kafka: the brokers %s answer again", self.bootstrap)
        self.unreachable = False
        self._since = None
        return None


def decode_message(value: bytes | None) -> tuple[str, dict[str, Any]]:
    """A bluesky-kafka message value as ``(name, doc)``, or a :class:`DocumentError`."""
    import msgpack
    import msgpack_numpy

    if value is None:
        raise DocumentError("a Kafka message without a value is not a bluesky document")
    try:
        message = msgpack.unpackb(
            value, object_hook=msgpack_numpy.decode, raw=False, strict_map_key=False
        )
    except Exception as err:  # noqa: BLE001 - any undecodable bytes
        raise DocumentError(f"a Kafka message is not msgpack: {err!r}") from err
    if (
        not isinstance(message, (list, tuple))
        or len(message) != 2
        or not isinstance(message[0], str)
        or not isinstance(message[1], dict)
    ):
        raise DocumentError(
            f"a Kafka message must hold (name, document) as bluesky-kafka's Publisher "
            f"sends it, got {type(message).__name__}"
        )
    return message[0], message[1]


def parse_config(items: Iterable[str]) -> dict[str, str]:
    """``key=value`` strings (librdkafka properties) as a dict, or a :class:`ServeError`."""
    config = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ServeError(
                f"expected a Kafka client property as key=value (e.g. "
                f"security.protocol=SASL_SSL), got {item!r}"
            )
        config[key.strip()] = value.strip()
    return config


def read_config_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """A Java-style properties file (``key=value`` lines, ``#`` comments)."""
    try:
        with open(path, encoding="utf-8") as file:
            lines = [line.strip() for line in file]
    except OSError as err:
        raise ServeError(f"cannot read the Kafka configuration file {path}: {err}") from err
    return parse_config(line for line in lines if line and not line.startswith(("#", "!")))


def _document_id(name: str, doc: Mapping[str, Any]) -> Any:
    """What identifies a document within its run (to recognise duplicates)."""
    if name in ("datum", "datum_page"):
        ident = doc.get("datum_id")
    else:
        ident = doc.get("uid")
    if isinstance(ident, list):
        ident = tuple(str(i) for i in ident)
    elif ident is not None:
        ident = str(ident)
    return None if ident is None else (name, ident)


@dataclass
class _Partition:
    """What this instance knows of one assigned partition."""

    #: Offset after the last message handled.
    next_offset: int | None = None
    #: Offset of the start document of each run open here, by run uid.
    open_runs: dict[str, int] = field(default_factory=dict)
    #: Offset last committed by this instance.
    committed: int | None = None

    def safe_offset(self) -> int | None:
        """The offset to commit: nothing of a run still open is passed."""
        if self.open_runs:
            return min(self.open_runs.values())
        return self.next_offset


class KafkaDocumentService:
    """Write every run published to Kafka topics; :meth:`run` until a signal.

    Parameters
    ----------
    bootstrap_servers
        ``host:port[,host:port...]`` of the Kafka brokers.
    topics
        Topics the RunEngines publish to.
    group_id
        Consumer group: instances with the same group share the partitions.
    directory
        Root of the stores: a directory or an ``s3://bucket/prefix`` URL.
    config
        Further librdkafka properties (``security.protocol``,
        ``sasl.mechanism``, ``sasl.username``, ``ssl.ca.location``,
        ``session.timeout.ms``, ...), passed through.
    status_interval
        Seconds between status lines in the log.
    commit_interval
        Seconds between commits of the offsets of finished runs (they are
        also committed at each stop document).
    **options
        Keyword options of :class:`~bluesky_zarr.ZarrWriter` (not
        ``overwrite``: the service replaces only unfinished stores of a run
        it re-reads).
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topics: Sequence[str],
        group_id: str,
        directory: str | os.PathLike[str],
        *,
        config: Mapping[str, Any] | None = None,
        status_interval: float = 30.0,
        commit_interval: float = 5.0,
        **options: Any,
    ) -> None:
        if not bootstrap_servers or not isinstance(bootstrap_servers, str):
            raise ServeError(
                f"expected the Kafka bootstrap servers as host:port[,host:port], got "
                f"{bootstrap_servers!r}"
            )
        if isinstance(topics, str) or not topics or not all(
            isinstance(t, str) and t for t in topics
        ):
            raise ServeError(f"expected one or more topic names, got {topics!r}")
        if not group_id or not isinstance(group_id, str):
            raise ServeError(f"expected a consumer group id, got {group_id!r}")
        if "overwrite" in options:
            raise ServeError(
                "overwrite= does not apply to the Kafka service: it replaces only the "
                "unfinished store of a run it re-reads, never a finished one"
            )
        user = {str(k): str(v) for k, v in (config or {}).items()}
        for key in ("bootstrap.servers", "group.id"):
            if key in user:
                raise ServeError(f"give {key} as its own option, not in the Kafka config")
        for key, value in _FIXED_CONFIG.items():
            if key in user and user[key].lower() != value:
                raise ServeError(
                    f"{key}={user[key]} would commit offsets of documents not yet in a "
                    f"store; the service commits them itself"
                )
        self.health = BrokerHealth(bootstrap_servers)
        self.consumer_config: dict[str, Any] = {
            **_DEFAULT_CONFIG,
            **user,
            **_FIXED_CONFIG,
            "bootstrap.servers": bootstrap_servers,
            "group.id": group_id,
            # librdkafka's errors and log through this service, not to stderr
            # at the rate the client retries.
            "error_cb": self.health.error,
            "logger": librdkafka_logger,
        }
        try:
            import confluent_kafka  # noqa: F401
            import msgpack  # noqa: F401
            import msgpack_numpy  # noqa: F401
        except ImportError:
            raise MissingDependencyError(
                "serve --kafka needs confluent-kafka, msgpack and msgpack-numpy: "
                'pip install "bluesky-zarr[kafka]"'
            ) from None
        self.topics = list(topics)
        self.status_interval = float(status_interval)
        self.commit_interval = float(commit_interval)
        self.writer = ZarrWriter(directory, overwrite="incomplete", **options)
        self.stopped_by: str | None = None
        self.runs_started = 0
        self.runs_stopped = 0
        self.runs_skipped = 0
        self.refused = 0
        self.duplicates = 0
        self.documents = 0
        self._bytes = 0
        self._consumer: Any = None
        self._partitions: dict[tuple[str, int], _Partition] = {}
        #: Partition of each open run.
        self._run_partition: dict[str, tuple[str, int]] = {}
        #: Documents seen of each open (or skipped) run.
        self._seen: dict[str, set[Any]] = {}
        #: Run uid of each descriptor and resource of an open or skipped run.
        self._refs: dict[str, str] = {}
        #: Runs whose finished store exists: their documents are skipped.
        self._skipped: set[str] = set()
        self._ignored_runs: set[str] = set()
        #: Partitions rewound to an offset, to be read again from there at a time.
        self._rewound: dict[tuple[str, int], tuple[int, float]] = {}
        #: Start document of each open run.
        self._starts: dict[str, dict[str, Any]] = {}
        #: Runs finished lately (oldest first): their documents, delivered
        #: again, are duplicates.
        self._finished: OrderedDict[str, None] = OrderedDict()

    # ------------------------------------------------------------ documents
    def _run_uid(self, name: str, doc: Mapping[str, Any]) -> str | None:
        try:
            if name == "start":
                run = doc.get("uid")
            elif name in ("descriptor", "stop", "resource", "stream_resource"):
                run = doc.get("run_start")
            elif name in ("event", "event_page", "stream_datum"):
                run = self._refs.get(doc.get("descriptor"))  # type: ignore[arg-type]
            elif name in ("datum", "datum_page"):
                run = self._refs.get(doc.get("resource"))  # type: ignore[arg-type]
            else:
                run = None
        except TypeError:  # an unhashable id: the writer refuses the document
            return None
        return run if isinstance(run, str) else None

    def handle(self, key: tuple[str, int], offset: int, name: str, doc: dict[str, Any]) -> bool:
        """Take one document read at ``offset`` of partition ``key``; False if
        the partition must be read again from there later (a live writer holds
        the run's store)."""
        run = self._run_uid(name, doc)
        if run is not None and run in self._finished:
            self.duplicates += 1
            return True
        if run is not None and run in self._skipped:
            self._skip(run, name, doc)
            return True
        ident = _document_id(name, doc)
        if run is not None and ident is not None and run in self._seen:
            if ident in self._seen[run]:
                self.duplicates += 1
                logger.debug("ignoring a duplicate %s document of run %s", name, run)
                return True
        if name == "start" and run is not None:
            return self._start(key, offset, doc, run)
        if run is not None and ident is not None and run in self._seen:
            self._seen[run].add(ident)
        self._give(name, doc)
        if run is not None and name in ("descriptor", "resource", "stream_resource"):
            uid = doc.get("uid")
            if isinstance(uid, str) and run in self._run_partition:
                self._refs[uid] = run
        if name == "stop" and run is not None and run in self._run_partition:
            self._stopped(run, doc)
        return True

    def _start(self, key: tuple[str, int], offset: int, doc: dict[str, Any], run: str) -> bool:
        try:
            location, attributes = self.writer.storage.existing_attributes(
                self.writer.options.name_template, doc
            )
        except BlueskyZarrError:
            location, attributes = None, None  # the writer refuses it, loudly, below
        stored = (attributes or {}).get("start")
        same_run = isinstance(stored, Mapping) and stored.get("uid") == run
        if attributes is not None and same_run and run_finished(attributes):
            self._skipped.add(run)
            self._seen[run] = set()
            self.runs_skipped += 1
            logger.info("run %s is already written to %s; skipping it", run, location)
            return True
        if attributes is not None and not same_run:
            # Another run's store has this name (a name_template without the
            # uid): refused at once rather than waiting for that run's lock.
            self.refused += 1
            logger.error(
                "refused the start document of run %s: %s holds another run (%s); "
                "choose a name_template with {uid}",
                run, location, stored.get("uid") if isinstance(stored, Mapping) else "?",
            )
            return True
        try:
            self.writer("start", doc)
        except StoreLockedError as err:
            logger.warning(
                "run %s: %s; reading it again in %.0f s", run, err, LOCKED_RETRY_SECONDS
            )
            return False
        except BlueskyZarrError as err:
            self.refused += 1
            logger.error("refused the start document of run %s: %s", run, err)
            return True
        self._partitions.setdefault(key, _Partition()).open_runs[run] = offset
        self._run_partition[run] = key
        self._starts[run] = doc
        self._seen[run] = {_document_id("start", doc)}
        self.runs_started += 1
        logger.info(
            "run %s started (scan_id %s, %s[%d] offset %d): %s %s",
            run, doc.get("scan_id"), key[0], key[1], offset,
            "rewriting its unfinished store" if attributes is not None else "writing",
            self.writer.stores[-1],
        )
        return True

    def _give(self, name: str, doc: dict[str, Any]) -> None:
        """Hand a document to the writer; a refused document never stops the service."""
        if not give_document(self.writer, name, doc, self._ignored_runs, logger):
            self.refused += 1

    def _skip(self, run: str, name: str, doc: Mapping[str, Any]) -> None:
        if name in ("descriptor", "resource", "stream_resource"):
            uid = doc.get("uid")
            if isinstance(uid, str):
                self._refs[uid] = run
        if name == "stop":
            self._forget(run, finished=True)

    def _stopped(self, run: str, doc: Mapping[str, Any]) -> None:
        key = self._run_partition[run]
        attributes = None
        try:
            _, attributes = self.writer.storage.existing_attributes(
                self.writer.options.name_template, self._starts.get(run, {"uid": run})
            )
        except BlueskyZarrError:
            pass  # only for the log line
        info = (attributes or {}).get("bluesky_zarr") or {}
        self.runs_stopped += 1
        self._partitions[key].open_runs.pop(run, None)
        self._forget(run, finished=True)
        logger.info(
            "run %s stopped (%s): %s%s",
            run, doc.get("exit_status", "unknown"),
            "complete" if info.get("complete") else "incomplete",
            f" ({info['incomplete_reason']})" if info.get("incomplete_reason") else "",
        )
        self._commit([key])

    def _forget(self, run: str, *, finished: bool = False) -> None:
        """Drop what is kept of a run; a finished one is remembered for a while
        (with its descriptors and resources) so that its documents delivered
        again are recognised as duplicates."""
        self._run_partition.pop(run, None)
        self._seen.pop(run, None)
        self._skipped.discard(run)
        self._starts.pop(run, None)
        if finished:
            self._finished[run] = None
            while len(self._finished) > FINISHED_RUNS_KEPT:
                self._drop_refs(self._finished.popitem(last=False)[0])
        else:
            self._drop_refs(run)

    def _drop_refs(self, run: str) -> None:
        for ref in [r for r, owner in self._refs.items() if owner == run]:
            del self._refs[ref]

    # ----------------------------------------------------------- partitions
    def _commit(self, keys: Iterable[tuple[str, int]]) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        offsets = []
        for key in keys:
            part = self._partitions.get(key)
            if part is None:
                continue
            safe = part.safe_offset()
            if safe is not None and safe != part.committed:
                offsets.append(TopicPartition(key[0], key[1], safe))
        if not offsets or self._consumer is None:
            return
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as err:
            # Not fatal: the documents are re-read and skipped or rewritten.
            logger.warning("committing offsets failed: %s", err)
            return
        for tp in offsets:
            self._partitions[(tp.topic, tp.partition)].committed = tp.offset

    def _close_runs_of(self, keys: Iterable[tuple[str, int]], reason: str) -> None:
        for key in keys:
            part = self._partitions.get(key)
            if part is None:
                continue
            for run in list(part.open_runs):
                if run not in self._run_partition:
                    continue  # closed already
                try:
                    self.writer.close_run(run, reason)
                except BlueskyZarrError as err:
                    logger.error("closing run %s failed: %s", run, err)
                logger.info("run %s closed as incomplete: %s", run, reason)
                self._forget(run)

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        for tp in partitions:
            self._partitions[(tp.topic, tp.partition)] = _Partition()
        logger.info(
            "assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "-"
        )

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        self._commit(keys)
        self._close_runs_of(
            keys, "its partition went to another instance, which rewrites the run"
        )
        for key in keys:
            self._partitions.pop(key, None)
            self._rewound.pop(key, None)
        logger.info("revoked %s", ", ".join(f"{t}[{p}]" for t, p in keys) or "-")

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        self._close_runs_of(keys, "its partition was lost; another instance rewrites the run")
        for key in keys:
            self._partitions.pop(key, None)
            self._rewound.pop(key, None)
        logger.warning("lost %s", ", ".join(f"{t}[{p}]" for t, p in keys) or "-")

    def _rewind(self, key: tuple[str, int], offset: int) -> None:
        from confluent_kafka import TopicPartition

        self._consumer.pause([TopicPartition(key[0], key[1])])
        self._rewound[key] = (offset, time.monotonic() + LOCKED_RETRY_SECONDS)

    def _resume_rewound(self) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        now = time.monotonic()
        for key, (offset, when) in list(self._rewound.items()):
            if when > now:
                continue
            tp = TopicPartition(key[0], key[1], offset)
            try:
                self._consumer.resume([TopicPartition(key[0], key[1])])
                self._consumer.seek(tp)
            except KafkaException as err:
                logger.warning("rewinding %s[%d] failed (%s); trying again", *key, err)
                self._rewound[key] = (offset, now + LOCKED_RETRY_SECONDS)
                continue
            # Messages after ``offset`` fetched before the seek are dropped
            # until ``offset`` comes again.
            self._rewound[key] = (offset, float("inf"))

    # ------------------------------------------------------------- the loop
    def _message(self, message: Any) -> None:
        key = (message.topic(), message.partition())
        offset = message.offset()
        rewound = self._rewound.get(key)
        if rewound is not None:
            if rewound[1] != float("inf") or offset != rewound[0]:
                return  # fetched before the partition was rewound
            del self._rewound[key]
        part = self._partitions.setdefault(key, _Partition())
        value = message.value()
        self._bytes += len(value or b"")
        try:
            name, doc = decode_message(value)
        except DocumentError as err:
            self.refused += 1
            logger.error(
                "skipping message %s[%d] offset %d: %s (first bytes %r)",
                key[0], key[1], offset, err, (value or b"")[:64],
            )
            part.next_offset = offset + 1
            return
        self.documents += 1
        try:
            taken = self.handle(key, offset, name, doc)
        except Exception:  # noqa: BLE001 - logged loudly; the partition goes on
            self.refused += 1
            logger.exception(
                "failed to handle the %s document at %s[%d] offset %d", name, *key, offset
            )
            taken = True
        if not taken:
            self._rewind(key, offset)
            return
        part.next_offset = offset + 1

    def lag(self) -> int | None:
        """Messages not yet read in the assigned partitions (None if unknown)."""
        from confluent_kafka import KafkaException

        try:
            assigned = self._consumer.assignment()
            if not assigned:
                return 0
            total = 0
            for tp in self._consumer.position(assigned):
                _, high = self._consumer.get_watermark_offsets(tp, timeout=2.0)
                total += max(0, high - tp.offset) if tp.offset >= 0 else high
            return total
        except KafkaException:
            return None

    def _probe(self) -> None:
        """Ask a broker for the topics' metadata; raises if none answers."""
        self._consumer.list_topics(self.topics[0], timeout=PROBE_SECONDS)

    def _status(self, elapsed: float, documents: int, nbytes: int) -> None:
        trouble = self.health.check(self._probe)
        lag = None if trouble else self.lag()
        counts = (
            f"{len(self._run_partition)} run(s) open, {documents / elapsed:.1f} "
            f"documents/s, {nbytes / elapsed / 1e6:.2f} MB/s, lag "
            f"{'?' if lag is None else lag} message(s), {len(self._partitions)} "
            f"partition(s); {self.runs_stopped} run(s) stopped, {self.runs_skipped} "
            f"skipped, {self.duplicates} duplicate(s), {self.refused} refused"
        )
        if trouble:
            logger.warning("status: %s; %s", trouble, counts)
        else:
            logger.info("status: %s", counts)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stopped_by = signal.Signals(signum).name

    def run(self) -> None:
        """Consume and write until SIGINT or SIGTERM, then finish and leave the group."""
        from confluent_kafka import Consumer  # checked in __init__

        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGINT, signal.SIGTERM)
        }
        self._consumer = Consumer(self.consumer_config)
        self._consumer.subscribe(
            self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        logger.info(
            "consuming %s from %s as group %s; writing runs to %s",
            ", ".join(self.topics), self.consumer_config["bootstrap.servers"],
            self.consumer_config["group.id"], self.writer.directory,
        )
        last_status = last_commit = time.monotonic()
        documents = self.documents
        nbytes = self._bytes
        try:
            while self.stopped_by is None:
                for message in self._consumer.consume(num_messages=500, timeout=0.2):
                    error = message.error()
                    if error is not None:
                        if error.fatal():
                            raise ServeError(f"the Kafka consumer failed: {error}")
                        logger.warning("Kafka: %s", error)
                        continue
                    self._message(message)
                self._resume_rewound()
                now = time.monotonic()
                if now - last_commit >= self.commit_interval:
                    self._commit(list(self._partitions))
                    last_commit = now
                if now - last_status >= self.status_interval:
                    self._status(now - last_status, self.documents - documents,
                                 self._bytes - nbytes)
                    last_status, documents, nbytes = now, self.documents, self._bytes
        finally:
            self._shutdown()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        logger.info(
            "stopped on %s: %d run(s) started, %d stopped, %d skipped (already written), "
            "%d duplicate(s) ignored, %d document(s) refused",
            self.stopped_by, self.runs_started, self.runs_stopped, self.runs_skipped,
            self.duplicates, self.refused,
        )

    def _shutdown(self) -> None:
        keys = list(self._partitions)
        # Offsets first: they stop at the start of every run still open.
        self._commit(keys)
        open_runs = list(self._run_partition)
        if open_runs:
            logger.info(
                "finishing %d open run(s) as incomplete: %s", len(open_runs), ", ".join(open_runs)
            )
        self._close_runs_of(
            keys,
            f"the service stopped ({self.stopped_by or 'error'}) before the run stopped; "
            f"it is rewritten when its partition is read again",
        )
        try:
            self.writer.close(f"the service stopped ({self.stopped_by or 'error'})")
        finally:
            # Leave the group now, so the partitions move at once.
            self._consumer.close()
