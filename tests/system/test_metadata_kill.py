"""The root's consolidated metadata of a run whose writer is killed at random
moments: valid JSON, listing only nodes whose ``zarr.json`` exists, never an
array longer than its own ``zarr.json`` says, and opened by xarray."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import HELPERS, open_tree

CHILD = HELPERS / "metadata_kill_child.py"
SEED = 7
KILLS = 8


@pytest.fixture(autouse=True)
def time_limit():
    """The test may not hang on a run that never ends: stopped after two minutes."""

    def expire(signum, frame):
        raise TimeoutError("the killed-runs test took more than two minutes")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(120)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def forker():
    process = subprocess.Popen(
        [sys.executable, str(CHILD)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert process.stdout is not None and process.stdin is not None
    assert process.stdout.readline().strip() == "imported"

    def ask(command: str) -> str:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(command + "\n")
        process.stdin.flush()
        return process.stdout.readline().strip()

    try:
        yield ask
    finally:
        process.stdin.close()
        process.wait(timeout=30)
        process.stdout.close()


def test_killed_runs_keep_consolidated_metadata_that_matches_their_nodes(
    forker, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    # The first run is not killed: how long a whole run takes here.
    began = time.monotonic()
    pid = int(forker(f"run {tmp_path / 'whole'}"))
    assert forker(f"reap {pid}") == "0"
    span = time.monotonic() - began
    roots = [tmp_path / "whole"]
    for n in range(KILLS):
        root = tmp_path / f"kill{n}"
        pid = int(forker(f"run {root}"))
        time.sleep(rng.uniform(0.0, 1.2) * span)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        forker(f"reap {pid}")
        roots.append(root)
    checked = 0
    for root in roots:
        store = root / "run.zarr"
        if not store.exists():
            continue
        top = json.loads((store / "zarr.json").read_bytes())
        listed = top["consolidated_metadata"]["metadata"]
        for path, node in listed.items():
            own = store / path / "zarr.json"
            assert own.exists(), f"{root.name}: {path} is listed, its zarr.json absent"
            if node["node_type"] == "array":
                on_disk = json.loads(own.read_bytes())
                # Each node is written before the root that lists it.
                assert all(a <= b for a, b in zip(node["shape"], on_disk["shape"])), path
                assert {**node, "shape": on_disk["shape"]} == on_disk, path
        tree = open_tree(store)
        if "primary" in tree.children:
            ds = tree["primary"].to_dataset().load()
            written = ds["_written"].values
            assert (ds["d"].values[written] == ds["seq_num"].values[written] - 1).all()
        checked += 1
    assert checked >= KILLS // 2
    whole = open_tree(tmp_path / "whole" / "run.zarr")
    assert whole.attrs["bluesky_zarr"]["complete"] is True
    assert int(whole["primary"]["_written"].sum()) == 400
