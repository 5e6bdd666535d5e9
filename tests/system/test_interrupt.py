"""Ctrl-C (SIGINT) or SIGTERM during a scan: the process ends within seconds
and the store is finished.

Real signals go to real processes at random moments: a user's script
(``interrupt_child.py``: a RunEngine, a ZarrWriter, a grid scan, no handling
of its own) and ``bluesky-zarr demo``. Ctrl-C pauses the RunEngine at its next
point; the script then ends with ``RunEngineInterrupted`` and the writer
finishes the run at exit, the demo aborts the run (its stop document says
``abort``, ``interrupted``). SIGTERM makes the writer finish the run, then
ends the process by SIGTERM. Whatever the moment, the process ends (a
process still there 30 s after its signal hangs), and the store, if the run
started, is finished: its end recorded, exit status ``success`` (the signal
came after the scan) or ``abort`` with the reason ``interrupted``, every
event the writer took written, every point marked written holding its frame,
its lock released; ``ls`` and ``inspect`` say the same.
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from bluesky_zarr.catalog._inspect import describe_store, format_description
from bluesky_zarr.catalog._ls import list_stores

from conftest import HELPERS, REPO, assert_written_points_hold_their_frames, open_stream

CHILD = HELPERS / "interrupt_child.py"
SRC = REPO / "src"

SEED = 20
#: The script, with thread starts refused at exit (interrupt_child.py).
NO_THREADS_AT_EXIT = "script, no thread at exit"
_rng = random.Random(SEED)
#: (what runs, the signal, the moment as a fraction of an uninterrupted
#: scan, from the line that says it started to the line that says it ended):
#: 38 trials.
TRIALS = [
    (kind, sig, _rng.uniform(0.0, 1.0))
    for kind, sig, n in [
        ("script", "SIGINT", 12),
        ("script", "SIGTERM", 8),
        ("demo", "SIGINT", 8),
        ("demo", "SIGTERM", 4),
        # Python 3.12 starts no thread in atexit handlers (where the writer
        # finishes the run): the same on every Python.
        (NO_THREADS_AT_EXIT, "SIGINT", 6),
    ]
    for _ in range(n)
]
#: A process still there this long after its signal hangs.
HANG = 30.0
#: Trials run at once.
PARALLEL = 2
#: The demo's frames (the script's are interrupt_child.FRAME).
DEMO_SIZE = 64
FRAME = (64, 64)


@dataclass
class Trial:
    kind: str
    sig: str
    fraction: float
    root: Path
    delay: float = 0.0
    said: list[str] = field(default_factory=list)
    stderr: str = ""
    returncode: int | None = None
    #: Seconds from the signal to the end of the process (None: it hung).
    ended_after: float | None = None
    outcome: str = ""

    def describe(self) -> str:
        return (
            f"{self.kind} {self.sig} {self.delay:.3f} s after its marker: exit "
            f"{self.returncode} {self.ended_after and round(self.ended_after, 2)} s after "
            f"the signal; said {self.said[-3:]}; stderr {self.stderr[-600:]!r}"
        )


def _command(kind: str, root: Path) -> tuple[list[str], str, str]:
    """The command of a trial, and the lines it says when its scan starts and
    when it has ended."""
    if kind.startswith("script"):
        return [sys.executable, str(CHILD), str(root)], "start", "done"
    return (
        [sys.executable, "-m", "bluesky_zarr._cli", "demo", "--out", str(root),
         "--size", str(DEMO_SIZE)],
        "Scanning",
        "Wrote",
    )


def run(trial: Trial, lifetime: float | None) -> float:
    """Run one trial (``lifetime`` None: uninterrupted); returns the seconds
    from the line that says its scan started to the line that says it ended
    (uninterrupted) or to the end of the process."""
    command, marker, end = _command(trial.kind, trial.root)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]
    ))
    if trial.kind == NO_THREADS_AT_EXIT:
        env["INTERRUPT_CHILD_NO_THREADS_AT_EXIT"] = "1"
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    lines: queue.Queue[str | None] = queue.Queue()
    errors: list[str] = []
    #: Whether the end of the output (its sentinel) has been taken.
    ended = False

    def read_out() -> None:
        assert process.stdout is not None
        with process.stdout:
            for line in process.stdout:
                lines.put(line.rstrip("\n"))
        lines.put(None)

    def read_err() -> None:
        assert process.stderr is not None
        with process.stderr:
            errors.append(process.stderr.read())

    readers = [threading.Thread(target=read_out), threading.Thread(target=read_err)]
    for reader in readers:
        reader.start()
    try:
        while True:
            line = lines.get(timeout=180)
            if line is None:
                raise RuntimeError(f"ended before its scan started: {trial.said}")
            trial.said.append(line)
            if marker in line:
                break
        started = time.monotonic()
        if lifetime is not None:
            trial.delay = trial.fraction * lifetime
            time.sleep(trial.delay)
            sent = time.monotonic()
            process.send_signal(getattr(signal, trial.sig))
        else:
            while (line := lines.get(timeout=600)) is not None:
                trial.said.append(line)
                if end in line:
                    break
            else:
                ended = True  # the output ended (the sentinel is taken)
            sent = time.monotonic()
        life = sent - started
        try:
            process.wait(HANG if lifetime is not None else 600)
            trial.ended_after = time.monotonic() - sent
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
        for reader in readers:
            reader.join(30)
    while not ended and (line := lines.get(timeout=60)) is not None:
        trial.said.append(line)
    trial.stderr = "".join(errors)
    trial.returncode = process.returncode
    return life


def _run_all(trials: list[Trial], lifetimes: dict[str, float] | None) -> list[float]:
    lives: list[float] = [0.0] * len(trials)
    failures: list[BaseException] = []

    def worker(share: list[int]) -> None:
        for i in share:
            try:
                lives[i] = run(
                    trials[i],
                    None if lifetimes is None else lifetimes[trials[i].kind.split(",")[0]],
                )
            except BaseException as err:  # noqa: BLE001 - raised below
                failures.append(err)

    threads = [
        threading.Thread(target=worker, args=(list(range(len(trials)))[n::PARALLEL],))
        for n in range(PARALLEL)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return lives


@pytest.fixture(scope="module")
def trials(tmp_path_factory: pytest.TempPathFactory) -> list[Trial]:
    base = tmp_path_factory.mktemp("interrupt")
    # The life of each kind after its marker, uninterrupted, here and now.
    plain = [Trial(kind, "", 0.0, base / f"plain-{kind}") for kind in ("script", "demo")]
    lives = _run_all(plain, None)
    for trial in plain:
        assert trial.returncode == 0, trial.describe()
    lifetimes = {trial.kind: life for trial, life in zip(plain, lives)}
    done = [
        Trial(kind, sig, fraction, base / f"{n:02d}-{kind.replace(', ', '-')}-{sig}")
        for n, (kind, sig, fraction) in enumerate(TRIALS)
    ]
    _run_all(done, lifetimes)
    return done


def _store(trial: Trial) -> Path | None:
    stores = sorted(trial.root.glob("*.zarr"))
    assert len(stores) <= 1
    return stores[0] if stores else None


def check(trial: Trial) -> str:
    """What the trial left, checked; its outcome."""
    assert trial.ended_after is not None, f"hung: {trial.describe()}"
    store = _store(trial)
    if store is None:
        # Signalled before the run started: nothing to finish.
        assert trial.returncode != 0, trial.describe()
        return "no run"
    attributes = json.loads((store / "zarr.json").read_bytes())["attributes"]
    info = attributes["bluesky_zarr"]
    assert "streams" in info, f"the run's end is not recorded: {trial.describe()}"
    assert not store.with_name(f".{store.name}.lock").exists(), trial.describe()
    exit_status = attributes.get("exit_status")
    assert exit_status in ("success", "abort"), trial.describe()
    if exit_status == "abort":
        stop = attributes.get("stop") or {}
        why = f"{stop.get('reason')} {info.get('incomplete_reason')}"
        assert "interrupted" in why, trial.describe()
        if trial.sig == "SIGTERM":
            assert "SIGTERM" in why, trial.describe()
    else:
        assert info["complete"] is True, trial.describe()
    written = assert_written_points_hold_their_frames(
        store, FRAME if trial.kind.startswith("script") else (DEMO_SIZE, DEMO_SIZE)
    )
    if trial.kind.startswith("script"):
        # Every event the writer took is on disk.
        ds = open_stream(store)
        on_disk = {int(s) for s in ds["seq_num"].values[ds["_written"].values]}
        taken = {
            int(match.group(1))
            for line in trial.said
            if (match := re.search(r"event (\d+)$", line))
        }
        assert taken <= on_disk, f"{sorted(taken - on_disk)} not written: {trial.describe()}"
    # ls and inspect say the same.
    (entry,) = list_stores(trial.root)
    description = describe_store(store)
    assert entry["exit_status"] == description["run"]["exit_status"] == exit_status
    assert entry["written_points"] == int(np.count_nonzero(written))
    text = format_description(description)
    if exit_status == "abort":
        assert entry["state"] == "abort" and "interrupted" in entry["why"], entry
        assert "exit status: abort" in text, text
    else:
        assert entry["state"] == "complete" and "complete  yes" in text, (entry, text)
    assert "still being written" not in text and "killed" not in (entry["why"] or "")
    return "finished after the scan" if exit_status == "success" else "interrupted"


def test_every_interrupted_process_ends_and_finishes_its_store(trials: list[Trial]) -> None:
    outcomes: dict[str, int] = {}
    for trial in trials:
        trial.outcome = check(trial)
        outcomes[trial.outcome] = outcomes.get(trial.outcome, 0) + 1
        assert trial.ended_after is not None and trial.ended_after < HANG
    # Many signals fell in the middle of a scan (the scans here may run faster
    # than the one timed first, on a machine whose load changes): the trials
    # test interruption.
    assert outcomes.get("interrupted", 0) >= len(trials) // 3, outcomes
    ends: dict[str, list[float]] = {}
    for trial in trials:
        ends.setdefault(f"{trial.kind} {trial.sig} {trial.outcome}", []).append(
            trial.ended_after or 0.0
        )
    print(f"\n{len(trials)} trials: {outcomes}; seconds from the signal to the end:")
    for what, seconds in sorted(ends.items()):
        print(f"  {what}: {len(seconds)}, median {np.median(seconds):.2f}, "
              f"max {max(seconds):.2f}")


def test_the_exit_status_says_how_the_process_ended(trials: list[Trial]) -> None:
    for trial in trials:
        if trial.outcome == "finished after the scan":
            assert trial.returncode in (0, 130, -signal.SIGINT, -signal.SIGTERM), trial.describe()
            continue
        if trial.sig == "SIGTERM":
            # Ended by SIGTERM, as without the writer, after the store was finished.
            assert trial.returncode == -signal.SIGTERM, trial.describe()
        elif trial.kind == "demo":
            assert trial.returncode == 130, trial.describe()
        else:
            # The script ends with RunEngineInterrupted, as any script does.
            assert trial.returncode == 1, trial.describe()
            assert "RunEngineInterrupted" in trial.stderr, trial.describe()
