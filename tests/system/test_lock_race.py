"""Three processes race for one store name: one writer at a time, clean refusals.

Promise 4 (never overwrite another run's data) with ``overwrite=True`` rests
on the store lock: a writer may replace a finished store of the same name,
never one that another writer holds. Here three processes write short runs
into one root under one name, as fast as they can, and the test checks, on
the monotonic clock the processes share, that no two of them ever held the
store at once; that a writer that could not take the store said so with this
package's exception; that every run that did start ended cleanly; and that
the store left at the end is the last run written, intact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from conftest import HELPERS, assert_frames_match, open_stream, open_tree

CHILD = HELPERS / "lock_race_child.py"

#: Seconds each writer process races (a scan takes 0.1-0.5 s).
WRITER_SECONDS = 15.0
#: Seconds each process races for the bare lock.
LOCK_SECONDS = 4.0
PROCESSES = 3


def race(tmp_path: Path, mode: str, path: Path, logs: list[Path], seconds: float) -> list[Any]:
    """Start PROCESSES children, let them go at once, return their summaries."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    children = []
    for n, log in enumerate(logs):
        stderr = open(tmp_path / f"stderr-{n}.txt", "w")  # closed below
        children.append(
            (
                subprocess.Popen(
                    [sys.executable, str(CHILD), mode, str(path), str(log), str(seconds)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                    text=True, env=env,
                ),
                stderr,
            )
        )
    summaries = []
    try:
        for child, _ in children:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
        for child, _ in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.close()
        for n, (child, _) in enumerate(children):
            assert child.stdout is not None
            out = child.stdout.read()
            child.wait(timeout=60)
            errors = (tmp_path / f"stderr-{n}.txt").read_text()
            assert child.returncode == 0, f"race process {n} failed:\n{errors}"
            summaries.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for child, stderr in children:
            if child.poll() is None:
                child.kill()
                child.wait()
            if child.stdout is not None:
                child.stdout.close()
            stderr.close()
    return summaries


def held(record: dict[str, Any]) -> tuple[float, float]:
    """An interval during which the run's writer held the store, if it worked.

    It took the store inside the start document and lets go of it inside the
    stop document: from just after the one returned to just before the other
    was handed over, it held it. (Just after the stop document returned, the
    next writer may rightly hold it already, if this process was descheduled
    in between.) A run that broke before its stop document holds until its
    RunEngine returned.
    """
    return record["t_open"], record.get("t_stopping", record["t_end"])


def overlaps(runs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Pairs of runs of different processes that held the store at one moment."""
    ordered = sorted(runs, key=lambda r: held(r)[0])
    found = []
    for i, first in enumerate(ordered):
        for second in ordered[i + 1:]:
            if held(second)[0] >= held(first)[1]:
                break
            if second["pid"] != first["pid"]:
                found.append((first, second))
    return found


def test_three_writers_of_one_store_name_take_turns(tmp_path):
    root = tmp_path / "root"
    logs = [tmp_path / f"runs-{n}.jsonl" for n in range(PROCESSES)]
    race(tmp_path, "writer", root, logs, WRITER_SECONDS)
    records = [json.loads(line) for log in logs for line in log.read_text().splitlines()]
    wrote = [r for r in records if r["outcome"] == "wrote"]
    refused = [r for r in records if r["outcome"] == "refused"]
    failed = [r for r in records if r["outcome"] == "failed"]
    summary = f"{len(wrote)} written, {len(refused)} refused, {len(failed)} failed"

    # Two writers never held the store at once.
    both = overlaps([r for r in records if "t_open" in r])
    assert not both, (
        f"{len(both)} times two processes held the store at once ({summary}), e.g. "
        + "; ".join(
            f"pid {a['pid']} {a['outcome']} [{held(a)[0]:.4f}, {held(a)[1]:.4f}] and "
            f"pid {b['pid']} {b['outcome']} [{held(b)[0]:.4f}, {held(b)[1]:.4f}]"
            for a, b in both[:3]
        )
    )
    # A writer that could not take the store said so with this package's exception.
    foreign = sorted(
        {f"{r['module']}.{r['error']}: {r['message']}" for r in refused
         if not r["module"].startswith("bluesky_zarr")}
    )
    assert not foreign, f"starts refused with exceptions of other packages ({summary}): {foreign}"
    # A run that started went to its end.
    assert not failed, f"runs failed after they started ({summary}): " + "; ".join(
        f"{e['document']}: {e['module']}.{e['error']}: {e['message']}"
        for r in failed[:5] for e in r.get("errors", [])
    )
    # Not vacuous: the processes did race.
    writers = {r["pid"] for r in wrote}
    assert len(writers) >= 2, f"only {len(writers)} process wrote ({summary})"
    assert refused, f"no start was refused: the processes did not race ({summary})"
    assert {r["error"] for r in refused} == {"StoreLockedError"}, summary

    # The store left is the last run written, complete and intact.
    store = root / "same.zarr"
    last = max(wrote, key=lambda r: r["t_closed"])
    tree = open_tree(store)
    assert tree.attrs["start"]["uid"] == last["uid"]
    assert tree.attrs["bluesky_zarr"]["complete"] is True
    ds = open_stream(store)
    assert bool(np.all(ds["_written"].values))
    assert assert_frames_match(ds, "cam_image", {"m1": "m1", "m2": "m2"}, (8, 8)) == 6
    hidden = {p.name for p in root.iterdir() if p.name.startswith(".")}
    assert sorted(p.name for p in root.iterdir() if p.name not in hidden) == ["same.zarr"]


def test_the_store_lock_is_held_by_one_process_at_a_time(tmp_path):
    log = tmp_path / "holds.txt"
    logs = [log] * PROCESSES
    summaries = race(tmp_path, "lock", tmp_path / "same.zarr", logs, LOCK_SECONDS)
    holders: set[str] = set()
    overlapping: list[int] = []
    errors: list[str] = []
    lines = log.read_text().splitlines()
    for number, line in enumerate(lines):
        pid, what, *rest = line.split(" ", 2)
        if what == "start":
            if holders - {pid}:
                overlapping.append(number)
            holders.add(pid)
        elif what == "end":
            holders.discard(pid)
        else:
            errors.append(" ".join(rest))
    holds = {s["pid"]: s["held"] for s in summaries}
    assert not overlapping, (
        f"{len(overlapping)} of {sum(holds.values())} holds began while another process "
        f"held the lock; first at line {overlapping[0] + 1}: "
        + " | ".join(lines[max(0, overlapping[0] - 3): overlapping[0] + 2])
    )
    assert not errors, f"taking the lock failed other than with StoreLockedError: {errors[:5]}"
    # Not vacuous: every process took the lock, and was refused it.
    assert all(n > 0 for n in holds.values()), summaries
    assert all(s["refused"] > 0 for s in summaries), summaries
