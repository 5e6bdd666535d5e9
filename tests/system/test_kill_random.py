"""Killed at uniformly random times, a store is complete and valid, or absent.

test_kill.py kills the writer at chosen moments; here the moments are drawn
at random over the whole life of a writer process: while it builds its
devices and writer, while the start document makes the store, between and
inside events, in stop and after it. Whatever the moment, the store either
does not exist, or it opens (xarray, and tensorstore as a second Zarr V3
reader), every point it marks written holds its frame, and it claims
completeness only with a stop document. Nothing but the store (and hidden
lock or temporary files) is left beside it, and a new run can take its name.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorstore
from bluesky.plans import count

from bluesky_zarr import ZarrWriter
from bluesky_zarr.sim import PointCamera, frame_at, motors

from conftest import HELPERS, open_stream, open_tree

CHILD = HELPERS / "kill_random_child.py"

#: Draws of this seed fall in every phase: some before the store is made,
#: some after the process has ended, the rest between.
SEED = 2025
#: Delays after ``ready`` (the forked writer process starts) are drawn as
#: fractions of a span: SPAN times the life of an unkilled writer process,
#: measured first in the same session (1.9-2.8 s with two such processes on
#: two cores, longer on a loaded machine), so some kills land after its end.
SPAN = 1.5
#: Scans run at once (each in its own directory).
PARALLEL = 3

_rng = random.Random(SEED)
KILLS: list[tuple[str, float]] = [("ready", _rng.uniform(0.0, 1.0)) for _ in range(50)] + [
    # While the start document makes the store: seconds after ``start``.
    ("start", _rng.uniform(0.0, 0.005))
    for _ in range(10)
]
IDS = [
    f"seed{SEED}-{n:02d}-ready+{draw:.3f}span"
    if marker == "ready"
    else f"seed{SEED}-{n:02d}-{marker}+{draw * 1e3:.1f}ms"
    for n, (marker, draw) in enumerate(KILLS)
]

SCAN_SHAPE = (4, 5)
FRAME = (32, 32)


@dataclass
class Kill:
    """One killed writer process: where it wrote and what it said first."""

    root: Path
    marker: str
    delay: float
    pid: int = 0
    status: int | None = None
    #: (label, seconds after ``ready``) of every line the process said.
    said: list[tuple[str, float]] = field(default_factory=list)
    #: absent / incomplete / complete / invalid, read right after the kill.
    outcome: str = ""

    @property
    def killed(self) -> bool:
        return self.status is not None and os.WIFSIGNALED(self.status)

    def describe(self) -> str:
        labels = " ".join(f"{label}@{t:.3f}" for label, t in self.said[-4:])
        how = "killed" if self.killed else f"exited (status {self.status})"
        return f"{how} {self.delay * 1e3:.1f} ms after {self.marker!r}; last said: {labels}"


class Forker:
    """A kill_random_child.py process: forks scans, reaps them."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(CHILD)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        assert self._answer() == "imported"

    def _answer(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("kill_random_child.py ended unexpectedly")
        return line.strip()

    def ask(self, command: str) -> str:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)
        self.process.stdout.close()


class Said:
    """Lines a forked scan writes to its named pipe."""

    def __init__(self, fifo: Path) -> None:
        self.fd = os.open(fifo, os.O_RDONLY)  # returns once the scan opened it
        self.pending = b""
        self.lines: list[tuple[str, float]] = []

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            raise TimeoutError("the forked scan said nothing for a long time")
        data = os.read(self.fd, 65536)
        self.pending += data
        *complete, self.pending = self.pending.split(b"\n")
        for line in complete:
            label, _, stamp = line.decode().rpartition(" ")
            self.lines.append((label, float(stamp)))
        return bool(data)

    def wait_for(self, label: str, timeout: float = 60.0) -> None:
        while not any(said == label for said, _ in self.lines):
            if not self._read(timeout):
                raise RuntimeError(f"the forked scan ended before saying {label!r}: {self.lines}")

    def ends_before(self, deadline: float) -> bool:
        """Whether the process ends (closes the pipe) before ``deadline``."""
        while (left := deadline - time.monotonic()) > 0:
            try:
                if not self._read(left):
                    return True
            except TimeoutError:
                return False
        return False

    def rest(self) -> list[tuple[str, float]]:
        """Everything said until the process ended, as seconds after ``ready``."""
        while self._read(60.0):
            pass
        os.close(self.fd)
        if not self.lines:
            return []
        t0 = self.lines[0][1]
        return [(label, t - t0) for label, t in self.lines]


def outcome_of(root: Path) -> str:
    """What a kill left, read before anything else touches the directory."""
    store = root / "scan.zarr"
    if not store.exists():
        return "absent"
    try:
        attributes = json.loads((store / "zarr.json").read_bytes())["attributes"]
        info = attributes["bluesky_zarr"]
        attributes["start"]
    except (OSError, ValueError, KeyError):
        return "invalid"
    return "complete" if info.get("complete") is True else "incomplete"


def kill_one(forker: Forker, kill: Kill, fifo: Path) -> None:
    kill.root.mkdir()
    os.mkfifo(fifo)
    kill.pid = int(forker.ask(f"run {kill.root} {fifo}"))
    said = Said(fifo)
    try:
        said.wait_for(kill.marker)
        # A kill after the process has ended changes nothing: do not wait for it.
        said.ends_before(time.monotonic() + kill.delay)
    finally:
        os.kill(kill.pid, signal.SIGKILL)  # a zombie until reaped: the pid is still its own
        kill.status = int(forker.ask(f"reap {kill.pid}"))
        kill.said = said.rest()
    kill.outcome = outcome_of(kill.root)


@pytest.fixture(scope="module")
def kills(tmp_path_factory: pytest.TempPathFactory) -> list[Kill]:
    """Every kill of KILLS, run PARALLEL at a time, each in its own directory."""
    base = tmp_path_factory.mktemp("random-kills")
    # The life of unkilled writer processes, PARALLEL at once as below, here
    # and now, sets the span.
    unkilled = [Kill(base / f"unkilled-{n}", "ready", 600.0) for n in range(PARALLEL)]
    _run_in_parallel(unkilled, base)
    lives = [t for kill in unkilled for label, t in kill.said if label == "done"]
    assert len(lives) == PARALLEL, f"unkilled scans did not finish: {unkilled}"
    lifetime = max(lives)
    done = [
        Kill(base / f"{n:02d}", marker, draw * SPAN * lifetime if marker == "ready" else draw)
        for n, (marker, draw) in enumerate(KILLS)
    ]
    # Interleave so that each worker gets random and start-document kills.
    _run_in_parallel(done, base)
    return done


def _run_in_parallel(kills: list[Kill], base: Path) -> None:
    """Run ``kills``, PARALLEL at a time."""
    errors: list[BaseException] = []

    def worker(share: list[Kill]) -> None:
        try:
            forker = Forker()
            try:
                for kill in share:
                    kill_one(forker, kill, kill.root.with_suffix(".fifo"))
            finally:
                forker.close()
        except BaseException as err:  # noqa: BLE001 - raised in the test below
            errors.append(err)

    threads = [
        threading.Thread(target=worker, args=(kills[i::PARALLEL],)) for i in range(PARALLEL)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def read_with_tensorstore(array: Path) -> np.ndarray:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(array)}}
    return np.asarray(tensorstore.open(spec, open=True).result().read().result())


def check_store(store: Path) -> tuple[int, bool]:
    """The store opens, tells the truth, and two Zarr readers agree on it.

    Returns the number of points marked written, and whether it says it is
    complete.
    """
    attributes = json.loads((store / "zarr.json").read_bytes())["attributes"]
    assert "bluesky_zarr" in attributes and "start" in attributes, (
        f"the store's root zarr.json lacks the writer's attributes: {sorted(attributes)}"
    )
    tree = open_tree(store)
    complete = tree.attrs["bluesky_zarr"]["complete"]
    assert complete in (False, True)
    if complete:
        assert "stop" in tree.attrs, "the store claims completeness without a stop document"
    if "primary" not in tree.children:
        assert not complete, "a complete store lacks its primary stream"
        return 0, complete
    ds = open_stream(store)
    written = ds["_written"].values
    assert written.shape == SCAN_SHAPE
    if complete:
        assert written.all(), "a complete store has unwritten points"
    by_tensorstore = read_with_tensorstore(store / "primary" / "cam_image")
    by_zarr = ds["cam_image"].values
    assert by_tensorstore.shape == by_zarr.shape == SCAN_SHAPE + FRAME
    for index in zip(*np.nonzero(written)):
        positions = {
            "wavelength": float(ds["wavelength"].values[index[0]]),
            "position": float(ds["position"].values[index[1]]),
        }
        np.testing.assert_array_equal(
            by_zarr[index], frame_at(positions, FRAME),
            err_msg=f"point {index} is marked written but does not hold its frame",
        )
        np.testing.assert_array_equal(
            by_tensorstore[index], by_zarr[index],
            err_msg=f"tensorstore reads another frame than zarr-python at point {index}",
        )
        assert ds["seq_num"].values[index] > 0
    return int(written.sum()), complete


def leftovers(root: Path) -> list[str]:
    """Names beside the store other than hidden ones (locks, temporary files)."""
    return sorted(p.name for p in root.iterdir() if p.name != "scan.zarr" and p.name[0] != ".")


def write_again(RE: Any, root: Path) -> None:
    """A new run takes the killed run's store name: no stale lock, nothing in the way."""
    (motor,) = motors("motor")
    cam = PointCamera([motor], shape=(8, 8), name="cam")
    RE.subscribe(ZarrWriter(root, name_template="scan", overwrite=True))
    (uid,) = RE(count([cam], 2))
    attributes = json.loads((root / "scan.zarr" / "zarr.json").read_bytes())["attributes"]
    assert attributes["start"]["uid"] == uid
    assert attributes["bluesky_zarr"]["complete"] is True
    assert open_stream(root / "scan.zarr")["_written"].values.all()
    assert leftovers(root) == []


@pytest.mark.parametrize("n", range(len(KILLS)), ids=IDS)
def test_randomly_killed_store_is_complete_and_valid_or_absent(kills, n, RE):
    kill = kills[n]
    assert not any(label.startswith("error") for label, _ in kill.said), kill.said
    store = kill.root / "scan.zarr"
    assert leftovers(kill.root) == [], (
        f"files left outside the store ({kill.describe()})"
    )
    if store.exists():
        try:
            check_store(store)
        except AssertionError as err:
            raise AssertionError(f"{err}\n({kill.describe()})") from err
        except Exception as err:
            raise AssertionError(
                f"the store left by a kill does not open: {err!r}\n({kill.describe()})"
            ) from err
    write_again(RE, kill.root)


def test_random_kills_hit_every_phase(kills):
    """Not vacuous: the kills left no store, unfinished stores and finished ones."""
    outcomes = {name: 0 for name in ("absent", "incomplete", "complete", "invalid")}
    for kill in kills:
        outcomes[kill.outcome] += 1
    lifetimes = sorted(t for kill in kills for label, t in kill.said if label == "done")
    killed = sum(kill.killed for kill in kills)
    summary = f"outcomes {outcomes}; {killed} killed; lifetimes of the unkilled: {lifetimes}"
    assert outcomes["absent"] > 0, summary
    assert outcomes["incomplete"] > 0, summary
    assert outcomes["complete"] > 0, summary
