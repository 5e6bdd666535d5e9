"""Killed at any moment, the store still opens and tells the truth."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xarray as xr

from conftest import assert_written_points_hold_their_frames, open_tree

CHILD = Path(__file__).with_name("scan_child.py")

# (marker printed by the child, seconds to wait after it) for each kill:
# before any event, after each of many events, and inside stop.
_rng = random.Random(1234)
MOMENTS = [("descriptor", 0.0), ("descriptor", 0.02)] + [
    (f"event {n}", _rng.uniform(0.0, 0.03)) for n in range(1, 21)
] + [("stop", 0.0), ("stop", 0.005), ("stop", 0.02)]


def run_and_kill(directory: Path, marker: str, delay: float) -> int:
    """Kill the child ``delay`` seconds after it printed ``marker``; the last
    event it printed (each is printed before the writer sees it)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with subprocess.Popen(
        [sys.executable, str(CHILD), str(directory)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    ) as child:
        assert child.stdout is not None
        printed: list[str] = []
        try:
            for line in child.stdout:
                printed.append(line.strip())
                if line.strip() == marker:
                    break
            else:
                pytest.fail(f"the child ended before printing {marker!r}")
            if delay:
                time.sleep(delay)
            child.send_signal(signal.SIGKILL)
            # What it printed until it died is still in the pipe.
            printed += [line.strip() for line in child.stdout]
        finally:
            child.wait(timeout=60)
    events = [int(line.split()[1]) for line in printed if line.startswith("event ")]
    return max(events, default=0)


def check_store(store: Path) -> int:
    tree = open_tree(store)
    if "primary" not in tree.children:
        return 0
    return int(assert_written_points_hold_their_frames(store, (32, 32)).sum())


@pytest.mark.parametrize("marker, delay", MOMENTS, ids=[f"{m}+{d:.3f}s" for m, d in MOMENTS])
def test_killed_writer_leaves_an_openable_truthful_store(tmp_path, marker, delay):
    last_event = run_and_kill(tmp_path, marker, delay)
    store = tmp_path / "scan.zarr"
    assert store.is_dir()
    written = check_store(store)
    # No point is claimed before its event came.
    assert written <= last_event
    tree = open_tree(store)
    assert tree.attrs["bluesky_zarr"]["complete"] in (False, True)
    if tree.attrs["bluesky_zarr"]["complete"] is False:
        assert "stop" not in tree.attrs


def test_a_killed_writer_leaves_no_stale_lock(tmp_path):
    run_and_kill(tmp_path, "event 3", 0.0)
    from bluesky_zarr.storage._lock import StoreLock

    lock = StoreLock(tmp_path / "scan.zarr")  # would raise StoreLockedError if held
    lock.release()
    assert xr.open_datatree(tmp_path / "scan.zarr", engine="zarr") is not None
