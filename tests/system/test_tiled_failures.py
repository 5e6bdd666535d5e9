"""Tiled down or hung: failures are reported when they happen, and no thread
of the writer outlives ``close()``.

A real ``tiled serve`` is killed (SIGKILL) or frozen (SIGSTOP) in the middle
of a run. By the time the run's stop (its bounded wait) returns,
``writer.tiled_failures`` names the run with why; ``close()`` ends the
registration thread; ``replay --tiled`` and ``serve --tiled`` exit non-zero
and print the ``register`` command that registers the stores later.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bluesky import RunEngine
from bluesky.plans import count, grid_scan

from bluesky_zarr import ZarrWriter

from conftest import REPO, open_stream

pytest.importorskip("tiled.client")
pytest.importorskip("tiled.server")

from test_tiled import (  # noqa: E402
    API_KEY,
    PROXY,
    TiledServer,
    _grid_setup,
    _kill,
    _lines,
    _wait_for,
)

SRC = str(REPO / "src")


def registrar_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("bluesky-zarr-tiled")]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TiledServer]:
    """A Tiled server of the test's own, which the test may kill or freeze."""
    (tmp_path / "tiled").mkdir()
    server = TiledServer(tmp_path / "tiled")
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGCONT)
        server.stop()


def at_point(n: int, act: Any) -> Any:
    """A grid scan's per_step that calls ``act()`` before point ``n``."""
    from bluesky.plan_stubs import one_nd_step

    count_ = [0]

    def per_step(detectors: Any, step: Any, pos_cache: Any) -> Any:
        count_[0] += 1
        if count_[0] == n:
            act()
        return (yield from one_nd_step(detectors, step, pos_cache))

    return per_step


def scan_with(server: TiledServer, root: Path, act: Any, timeout: float) -> ZarrWriter:
    wavelength, position, cam = _grid_setup()
    writer = ZarrWriter(
        root, tiled=server.catalog_uri, tiled_api_key=API_KEY, tiled_timeout=timeout
    )
    RE = RunEngine({}, call_returns_result=False)
    RE.subscribe(writer)
    RE(grid_scan([cam], wavelength, 400, 700, 3, position, 0, 5, 4,
                 per_step=at_point(6, act)))
    return writer


def test_tiled_killed_mid_run_is_named_when_the_run_stops(server: TiledServer) -> None:
    root = server.stores / "killed"

    def kill() -> None:
        server.process.kill()
        server.process.wait(timeout=30)

    started = time.monotonic()
    writer = scan_with(server, root, kill, timeout=5)
    # The stop waited at most its bound, and says why the run is not in Tiled.
    (store,) = writer.stores
    failures = dict(writer.tiled_failures)
    assert list(failures) == [str(store)]
    assert "refused" in failures[str(store)], failures
    assert time.monotonic() - started < 60
    assert bool(open_stream(store)["_written"].all())

    closed = time.monotonic()
    writer.close()
    assert time.monotonic() - closed < 15
    assert registrar_threads() == []
    # What close() found is the same store, for the same cause (its last
    # attempt may word it without the stop's bound): no "client has been
    # closed".
    after = dict(writer.tiled_failures)
    assert list(after) == [str(store)]
    assert "refused" in after[str(store)] and "closed" not in after[str(store)], after


def test_tiled_hung_mid_run_is_named_when_the_run_stops(server: TiledServer) -> None:
    root = server.stores / "hung"

    def freeze() -> None:
        server.process.send_signal(signal.SIGSTOP)

    writer = scan_with(server, root, freeze, timeout=3)
    (store,) = writer.stores
    failures = dict(writer.tiled_failures)
    assert list(failures) == [str(store)]
    assert "did not answer" in failures[str(store)], failures

    closed = time.monotonic()
    writer.close()
    assert time.monotonic() - closed < 15
    assert registrar_threads() == []
    assert list(dict(writer.tiled_failures)) == [str(store)]

    # Thawed, the server takes the run: registered later, it is the same run.
    server.process.send_signal(signal.SIGCONT)
    from bluesky_zarr._cli import main

    assert main(["register", "--tiled", server.catalog_uri, "--api-key", API_KEY,
                 str(store)]) == 0


# ------------------------------------------------------------- the commands
def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [SRC, *filter(None, [os.environ.get("PYTHONPATH")])]
    )}


def _recorded_run(tmp_path: Path) -> Path:
    import suitcase.jsonl

    wavelength, position, cam = _grid_setup()
    documents: list[tuple[str, dict[str, Any]]] = []
    RunEngine({})(
        grid_scan([cam], wavelength, 400, 700, 3, position, 0, 5, 4),
        lambda name, doc: documents.append((name, doc)),
    )
    (recorded,) = suitcase.jsonl.export(documents, tmp_path, file_prefix="grid")["all"]
    return Path(recorded)


@pytest.mark.parametrize("fault", ["down", "hung"])
def test_replay_with_tiled_down_or_hung_exits_1_with_the_register_command(
    server: TiledServer, tmp_path: Path, fault: str
) -> None:
    recorded = _recorded_run(tmp_path)
    if fault == "down":
        server.process.kill()
        server.process.wait(timeout=30)
    else:
        server.process.send_signal(signal.SIGSTOP)
    out = server.stores / fault
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "bluesky_zarr._cli", "replay", str(recorded), "--out", str(out),
         "--no-progress", "--tiled", server.catalog_uri, "--tiled-api-key", API_KEY],
        capture_output=True, text=True, env=_env(), timeout=180,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    (store,) = out.glob("*.zarr")
    assert f"register them with: bluesky-zarr register --tiled {server.catalog_uri} {store}" in (
        done.stderr
    )
    assert f"{store} not registered with Tiled" in done.stderr
    assert "Traceback" not in done.stderr
    assert "12 of 12 points written" in done.stdout
    # Bounded by the stop's wait (30 s by default), not by Tiled's retries.
    assert elapsed < 120


def test_serve_with_tiled_hung_exits_1_with_the_register_command(
    server: TiledServer,
) -> None:
    from bluesky.callbacks.zmq import Publisher
    from ophyd.sim import det

    root = server.stores / "served"
    proxy = subprocess.Popen([sys.executable, "-c", PROXY], stdout=subprocess.PIPE, text=True)
    service = None
    try:
        match = _wait_for(_lines(proxy.stdout), [], r"tcp://(\S+) tcp://(\S+)", 60)
        assert match, "the 0MQ proxy did not start"
        inbound, outbound = match.group(1), match.group(2)
        service = subprocess.Popen(
            [sys.executable, "-m", "bluesky_zarr._cli", "serve", "--zmq", outbound,
             "--out", str(root), "--tiled", server.catalog_uri, "--tiled-api-key", API_KEY],
            stderr=subprocess.PIPE, text=True, env=_env(),
        )
        lines, seen = _lines(service.stderr), []
        assert _wait_for(lines, seen, "registering them with Tiled at", 60), "\n".join(seen)
        server.process.send_signal(signal.SIGSTOP)
        RE = RunEngine({}, call_returns_result=False)
        publisher = Publisher(inbound)
        try:
            # 0MQ drops messages until both subscriptions are up: short runs
            # until one arrives.
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                (uid,) = RE(count([det]), publisher)
                if _wait_for(lines, seen, f"run {uid} started", 2.0):
                    break
            else:
                pytest.fail("the service never received a run:\n" + "\n".join(seen))
            # Its stop waits for Tiled (30 s by default), then goes on.
            assert _wait_for(lines, seen, f"run {uid} stopped", 120), "\n".join(seen)
        finally:
            publisher.close()
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=120) == 1
        _wait_for(lines, seen, "stopped on SIGTERM", 10)
        text = "\n".join(seen)
        assert f"bluesky-zarr register --tiled {server.catalog_uri}" in text, text
        assert "Traceback" not in text, text
    finally:
        if service is not None:
            _kill(service)
        _kill(proxy)
