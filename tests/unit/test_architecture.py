"""The package has floors, and they hold.

Each floor (``plan``, ``storage``, ``external`` and ``catalog``, ``write``,
``feeds``, the command line) imports only the floors below it, through their
``__init__`` (import-linter's contracts in ``pyproject.toml``, run here as CI
runs them); no module imports another that imports it back; and an event,
from the callback to its bytes on disk, goes only downwards: traced call by
call, no function of a lower floor calls one of a higher floor.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import grimp
import numpy as np
import pytest
from event_model import compose_run

from bluesky_zarr import ZarrWriter

from conftest import REPO

#: The floors from the bottom up (``catalog`` and ``external`` share one).
FLOORS = {
    "_errors": 0, "_version": 0, "plan": 1, "storage": 2, "catalog": 3, "external": 3,
    "write": 4, "feeds": 5, "_cli": 6,
}


def floor_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "bluesky_zarr" or len(parts) < 2:
        return None
    return FLOORS.get(parts[1])


def test_the_import_contracts_hold() -> None:
    """``lint-imports`` (import-linter, configured in pyproject.toml) passes."""
    command = shutil.which("lint-imports")
    if command is None:
        pytest.fail("lint-imports (import-linter) is not installed")
    result = subprocess.run([command], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def strongly_connected(graph: Any) -> list[list[str]]:
    """The import cycles of ``graph`` (Tarjan's components of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return cycles


def test_no_module_imports_one_that_imports_it_back() -> None:
    """No import cycle, imports for type checking included."""
    graph = grimp.build_graph("bluesky_zarr", exclude_type_checking_imports=False)
    assert len(graph.modules) > 40  # the whole package was read
    assert strongly_connected(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The control for the test above: a graph with a cycle is caught."""
    graph = grimp.ImportGraph()
    for module in ("a", "b", "c"):
        graph.add_module(module)
    graph.add_import(importer="a", imported="b")
    graph.add_import(importer="b", imported="c")
    graph.add_import(importer="c", imported="a")
    assert strongly_connected(graph) == [["a", "b", "c"]]


class CallTrace:
    """Every call into the package, by thread, and the calls from a lower
    floor into a higher one (``climbs``), while it is on."""

    def __init__(self) -> None:
        self.on = False
        self.modules: dict[str, list[str]] = defaultdict(list)
        self.climbs: set[tuple[str, str, str]] = set()

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        if event != "call" or not self.on:
            return
        callee = frame.f_globals.get("__name__", "")
        if not callee.startswith("bluesky_zarr"):
            return
        caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back else ""
        self.modules[threading.current_thread().name].append(callee)
        lower, higher = floor_of(caller), floor_of(callee)
        if lower is not None and higher is not None and higher > lower:
            self.climbs.add((caller, callee, frame.f_code.co_name))


def test_an_event_reaches_the_disk_going_only_downwards(tmp_path: Path) -> None:
    """An event that completes a row: the callback places its frame, a worker
    writes the row's shard. Traced, the event's path goes from the writer
    down to storage and never back up; the worker visits only the buffer and
    storage (then tells the stream which points are on disk)."""
    trace = CallTrace()
    threading.setprofile(trace)  # the writer's worker threads start below
    try:
        writer = ZarrWriter(tmp_path, flush_interval=None, workers=1)
        bundle = compose_run(metadata={
            "shape": [2, 3], "motors": ["a", "b"], "plan_pattern": "outer_product",
            "hints": {"dimensions": [(["a"], "primary"), (["b"], "primary")]},
        })
        writer("start", dict(bundle.start_doc))
        keys = {
            "cam": {"dtype": "array", "dtype_numpy": "<u2", "shape": [64, 64], "source": "c"},
            "a": {"dtype": "number", "shape": [], "source": "a"},
            "b": {"dtype": "number", "shape": [], "source": "b"},
        }
        descriptor = bundle.compose_descriptor(name="primary", data_keys=keys)
        writer("descriptor", dict(descriptor.descriptor_doc))

        def event(n: int) -> dict[str, Any]:
            frame = np.full((64, 64), n, dtype="<u2")
            return dict(descriptor.compose_event(
                data={"cam": frame, "a": 0.0, "b": float(n - 1)},
                timestamps={k: 0.0 for k in keys}, seq_num=n,
            ))

        writer("event", event(1))
        writer("event", event(2))
        sys.setprofile(trace)
        trace.on = True
        writer("event", event(3))  # completes the first row: its shard is written
        deadline = time.monotonic() + 30
        shard = next(tmp_path.glob("*.zarr")) / "primary" / "cam" / "c.0.0.0.0"
        while not shard.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # the worker marks the points after the write
        trace.on = False
        writer("stop", dict(bundle.compose_stop()))
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
    assert shard.exists()
    assert trace.climbs == set()
    main = set(trace.modules["MainThread"])
    workers = set().union(
        *(set(m) for thread, m in trace.modules.items() if thread != "MainThread")
    )
    # The frame's path: the run, its stream, the buffer; then a worker: the
    # buffer, the shard writer, the file writer.
    assert {"bluesky_zarr.write._run", "bluesky_zarr.write._stream",
            "bluesky_zarr.write._buffer"} <= main
    assert {"bluesky_zarr.write._buffer", "bluesky_zarr.storage._shards",
            "bluesky_zarr.storage._files"} <= workers
    assert {floor_of(m) for m in workers} <= {FLOORS["write"], FLOORS["storage"]}
    assert not any(".external." in m or ".catalog." in m for m in main | workers)
