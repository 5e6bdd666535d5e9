"""``bluesky-zarr serve`` behind bluesky's own 0MQ proxy, fed by a real RunEngine.

The proxy and the service run as subprocesses on 127.0.0.1; this process
publishes with ``bluesky.callbacks.zmq.Publisher``, as a RunEngine host does.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest
from bluesky.callbacks.zmq import Publisher
from bluesky.plans import count, grid_scan
from ophyd.sim import det

from bluesky_zarr import ServeError
from bluesky_zarr.feeds._serve import parse_address
from bluesky_zarr.sim import PointCamera, frame_at, motors

from conftest import assert_frames_match, open_stream, open_tree

SRC = Path(__file__).resolve().parents[1] / "src"
MOTORS_AT = {"wavelength": "wavelength", "position": "position"}

PROXY = """
from bluesky.callbacks.zmq import Proxy
proxy = Proxy(in_address="tcp://127.0.0.1", out_address="tcp://127.0.0.1")
print(proxy.in_port, proxy.out_port, flush=True)
proxy.start()
"""


class Lines:
    """The lines a subprocess writes to a pipe, read as they come."""

    def __init__(self, pipe: IO[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe: IO[str]) -> None:
        with pipe:
            for line in pipe:
                self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str] | None:
        """The first line (seen or to come) matching ``pattern``, or None at the deadline."""
        regex = re.compile(pattern)
        for line in self.seen:
            if match := regex.search(line):
                return match
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if match := regex.search(line):
                return match
        return None

    def text(self) -> str:
        return "\n".join(self.seen)


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


@pytest.fixture
def proxy() -> Iterator[tuple[str, str]]:
    """bluesky's 0MQ proxy on 127.0.0.1: (inbound, outbound) HOST:PORT."""
    process = subprocess.Popen(
        [sys.executable, "-c", PROXY], stdout=subprocess.PIPE, text=True
    )
    try:
        match = Lines(process.stdout).wait_for(r"tcp://(\S+) tcp://(\S+)", 60)  # type: ignore[arg-type]
        assert match, "the 0MQ proxy did not start"
        yield match.group(1), match.group(2)
    finally:
        _stop(process)


@pytest.fixture
def service(proxy, tmp_path) -> Iterator[tuple[subprocess.Popen[str], Lines, Path]]:
    out = tmp_path / "stores"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]
    )}
    process = subprocess.Popen(
        [sys.executable, "-m", "bluesky_zarr._cli", "serve", "--zmq", proxy[1], "--out", str(out)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines = Lines(process.stderr)  # type: ignore[arg-type]
    try:
        assert lines.wait_for("listening to the 0MQ proxy", 60), lines.text()
        yield process, lines, out
    finally:
        _stop(process)


def _connect(RE: Any, publisher: Publisher, lines: Lines) -> None:
    """Publish short runs until the service has one: 0MQ drops messages until
    both subscriptions are up, and nothing else tells when they are."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        (uid,) = RE(count([det]), publisher)
        if lines.wait_for(f"run {uid} stopped", 1.0):
            return
    pytest.fail("the service never received a run:\n" + lines.text())


def test_serve_writes_published_runs_and_finishes_open_ones_on_sigterm(RE, proxy, service):
    process, lines, out = service
    publisher = Publisher(proxy[0])
    try:
        _connect(RE, publisher, lines)
        wavelength, position = motors("wavelength", "position")
        cam = PointCamera([wavelength, position], shape=(8, 8), name="cam")

        def plan() -> Any:
            return grid_scan(
                [cam, det], wavelength, 400, 700, 3, position, 0, 5, 4, snake_axes=True
            )

        # A whole scan, published live by the RunEngine.
        (uid,) = RE(plan(), publisher)
        started = lines.wait_for(rf"run {uid} started \(scan_id \d+\): writing (\S+)", 60)
        assert started and lines.wait_for(rf"run {uid} stopped \(success\)", 60), lines.text()
        store = Path(started.group(1))
        ds = open_stream(store)
        assert ds["_written"].all()
        assert assert_frames_match(ds, "cam_image", MOTORS_AT, (8, 8)) == 12
        assert open_tree(store).attrs["bluesky_zarr"]["complete"] is True

        # A scan whose RunEngine host goes away after seven points.
        recorded: list[tuple[str, dict[str, Any]]] = []
        RE(plan(), lambda name, doc: recorded.append((name, doc)))
        events = 0
        for name, doc in recorded:
            events += name == "event"
            if events > 7:
                break
            publisher(name, doc)
        cut_uid = recorded[0][1]["uid"]
        started = lines.wait_for(rf"run {cut_uid} started \(scan_id \d+\): writing (\S+)", 60)
        assert started, lines.text()
        # Documents arrive in order: once a later run is through, so is the cut one.
        _connect(RE, publisher, lines)
    finally:
        publisher.close()

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, lines.text()
    assert lines.wait_for("finishing 1 open run", 5), lines.text()
    assert lines.wait_for(r"stopped on SIGTERM: \d+ run\(s\) started", 5), lines.text()
    assert "Traceback" not in lines.text()

    partial = Path(started.group(1))
    info = open_tree(partial).attrs["bluesky_zarr"]
    assert info["complete"] is False
    assert "SIGTERM" in info["incomplete_reason"]
    ds = open_stream(partial)
    assert int(ds["_written"].sum()) == 7
    for index in zip(*np.nonzero(ds["_written"].values)):
        positions = {m: float(ds[m][i]) for m, i in zip(MOTORS_AT, index)}
        np.testing.assert_array_equal(ds["cam_image"].values[index], frame_at(positions, (8, 8)))
    assert {p.name for p in out.glob("*.zarr")} >= {store.name, partial.name}


def test_serve_stops_on_sigint_with_nothing_open(service):
    process, lines, _ = service
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 0, lines.text()
    assert lines.wait_for(r"stopped on SIGINT: 0 run\(s\) started", 5), lines.text()


@pytest.mark.parametrize("address", ["localhost", "localhost:http", ":5568", "host:0"])
def test_serve_refuses_a_bad_address(address):
    with pytest.raises(ServeError, match="HOST:PORT"):
        parse_address(address)
