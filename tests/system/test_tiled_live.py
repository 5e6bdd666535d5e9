"""Tiled's websocket subscribers hear of each region as it reaches the disk.

A real ``tiled serve`` with its streaming cache in a real Redis (Debian's
``redis-server``, on 127.0.0.1), and a real subscriber from Tiled's client
(``node.subscribe()``), which reads each region back through the server.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky import plan_stubs as bps
from bluesky.plans import grid_scan

from bluesky_zarr import ZarrWriter
from bluesky_zarr.sim import frame_at

from conftest import open_stream

pytest.importorskip("tiled.client")
pytest.importorskip("tiled.server")
pytest.importorskip("redis")

from test_tiled import API_KEY, SHAPE, TiledServer, _free_port, _grid_setup, _uid  # noqa: E402

#: Seconds a test waits for what must come; only a failure waits this long.
PATIENCE = 60.0


@pytest.fixture(scope="module")
def redis_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis server of its own, on 127.0.0.1, keeping nothing on disk."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("needs redis-server (apt-get install redis-server)")
    import redis

    base = tmp_path_factory.mktemp("redis")
    port = _free_port()
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(base)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        deadline = time.monotonic() + PATIENCE
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("redis-server did not start")
                time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}"
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=20)


@pytest.fixture(scope="module")
def live_server(
    tmp_path_factory: pytest.TempPathFactory, redis_uri: str
) -> Iterator[TiledServer]:
    server = TiledServer(tmp_path_factory.mktemp("tiled-live"), cache=redis_uri)
    try:
        yield server
    finally:
        server.stop()


def _wait(condition: threading.Condition, predicate: Any, what: str) -> None:
    with condition:
        if not condition.wait_for(predicate, timeout=PATIENCE):
            pytest.fail(f"waited {PATIENCE:g} s for {what}")


def _node(catalog: Any, uid: str, *path: str) -> Any:
    """The node at ``path`` of run ``uid`` once the writer has registered it."""
    deadline = time.monotonic() + PATIENCE
    while True:
        try:
            node = catalog[uid]
            for part in path:
                node = node[part]
            return node
        except KeyError:
            if time.monotonic() > deadline:
                pytest.fail(f"{uid}/{'/'.join(path)} was never registered")
            time.sleep(0.05)


# Tiled's client (0.2.20) connects with websockets' connect() outside a
# context manager, which websockets 17.1 deprecates, in the subscription's
# thread: not this package's to change.
@pytest.mark.filterwarnings(
    "ignore:connect\\(\\) must be used as a context manager:DeprecationWarning"
)
def test_a_subscriber_receives_each_region_of_a_snaked_grid_as_it_is_written(
    live_server: TiledServer, RE: RunEngine
) -> None:
    root = live_server.stores / "snaked"
    root.mkdir()
    wavelength, position, cam = _grid_setup()
    writer = ZarrWriter(
        root, tiled=live_server.catalog_uri, tiled_api_key=API_KEY, flush_interval=0.2
    )
    RE.subscribe(writer)
    catalog = live_server.catalog()
    received: list[tuple[tuple[int, ...], tuple[int, ...], np.ndarray]] = []
    masks: list[tuple[tuple[int, ...], np.ndarray]] = []
    arrived = threading.Condition()
    closed = threading.Event()
    subscriptions: list[Any] = []

    # Held here: Tiled's client keeps weak references to callbacks.
    def on_region(update: Any) -> None:
        region = (tuple(update.patch.offset), tuple(update.patch.shape), update.data())
        with arrived:
            received.append(region)
            arrived.notify_all()

    def on_mask(update: Any) -> None:
        with arrived:
            masks.append((tuple(update.patch.offset), update.data()))
            arrived.notify_all()

    def on_closed(subscription: Any) -> None:
        closed.set()

    steps: list[Any] = []

    def per_step(detectors: Any, step: Any, pos_cache: Any) -> Any:
        steps.append(step)
        if len(steps) == 2:
            # The stream is registered at its descriptor (the first point):
            # subscribe, from the first update on.
            (store,) = writer.open_runs
            uid = _uid(store)
            image = _node(catalog, uid, "primary", "cam_image")
            written = _node(catalog, uid, "primary", "_written")
            for node, callback in ((image, on_region), (written, on_mask)):
                subscription = node.subscribe()
                subscription.new_data.add_callback(callback)
                subscription.stream_closed.add_callback(on_closed)
                subscriptions.append(subscription.start_in_thread(1))
        if len(steps) in (5, 9):
            # A row is written (one shard): its region arrives before the
            # next row is measured.
            rows = len(steps) // 4
            _wait(arrived, lambda: len(received) >= rows, f"row {rows - 1}'s region")
        yield from bps.one_nd_step(detectors, step, pos_cache)

    RE(grid_scan([cam], wavelength, 400, 700, 3, position, 0, 5, 4, snake_axes=True,
                 per_step=per_step))
    writer.close()
    assert writer.tiled_failures == []
    # The run ended: the streams close, after the last region.
    assert closed.wait(PATIENCE), "the array's stream did not close at the end of the run"
    for subscription in subscriptions:
        subscription.disconnect()

    (store,) = writer.stores
    ds = open_stream(store)
    # Whole rows (shards), first seen in the order written: a snaked grid's
    # rows. Each update is the bounding box of what was written since the
    # one before, so on a busy machine a row's late mask or coordinate write
    # can make the next region span it again (rows 0-1 after row 0): the
    # last region holding a row holds its final frames.
    first_seen: list[int] = []
    last_frames: dict[int, np.ndarray] = {}
    for offset, shape, frames in received:
        assert offset[1:] == (0, 0, 0) and shape[1:] == (4,) + SHAPE, (offset, shape)
        for k in range(shape[0]):
            row = offset[0] + k
            if row not in first_seen:
                first_seen.append(row)
            last_frames[row] = frames[k]
    assert first_seen == [0, 1, 2]
    assert len(received) >= 2, "the rows did not arrive as they were written"
    for row, frames in last_frames.items():
        for column in range(4):
            at = {"wavelength": float(ds["wavelength"][row]),
                  "position": float(ds["position"][column])}
            np.testing.assert_array_equal(frames[column], frame_at(at, SHAPE))
    # The mask's updates say which points were complete, up to all of them.
    assert masks, "no update of _written"
    final = np.zeros((3, 4), dtype=bool)
    for offset, values in masks:
        region = tuple(slice(o, o + n) for o, n in zip(offset, values.shape))
        final[region] = values
    assert final.all()
    assert bool(ds["_written"].all())


def test_without_a_streaming_cache_the_run_is_registered_all_the_same(
    tmp_path: Path, RE: RunEngine
) -> None:
    """A Tiled server without a cache takes the region updates (and publishes
    nothing): registration and the run are unaffected."""
    server = TiledServer(tmp_path)
    try:
        wavelength, position, cam = _grid_setup()
        writer = ZarrWriter(
            server.stores, tiled=server.catalog_uri, tiled_api_key=API_KEY, flush_interval=0.2
        )
        RE.subscribe(writer)
        RE(grid_scan([cam], wavelength, 400, 700, 3, position, 0, 5, 4, snake_axes=True))
        writer.close()
        assert writer.tiled_failures == []
        (store,) = writer.stores
        run = server.catalog()[_uid(store)]
        through_tiled = run["primary"]["cam_image"].read()
        np.testing.assert_array_equal(through_tiled, open_stream(store)["cam_image"].values)
    finally:
        server.stop()
