"""The writer's threads and the rest of the process leave each other alone."""

from __future__ import annotations

import gc
import threading
import time
import warnings

import numpy as np
import zarr
from event_model import compose_run

from bluesky_zarr import ZarrWriter


def test_consolidation_ignores_warning_scopes_of_other_threads(tmp_path):
    bundle = compose_run(metadata={"hints": {"dimensions": [(["time"], "primary")]}})
    descriptor = bundle.compose_descriptor(
        data_keys={"k": {"dtype": "number", "shape": [], "source": "SIM:k"}}, name="primary"
    )
    # One point per block on a growing dimension: each write grows the arrays
    # and consolidates the metadata from a worker thread.
    writer = ZarrWriter(
        tmp_path, chunks={"k": (1,)}, max_buffer_bytes=1, workers=1, flush_interval=None
    )
    stop = threading.Event()

    def scope_warnings() -> None:
        # What numpy, xarray or a live viewer do in their own threads; the
        # scope stays open a moment, as it does around real work.
        while not stop.is_set():
            with warnings.catch_warnings():
                time.sleep(0.0002)

    other = threading.Thread(target=scope_warnings)
    other.start()
    try:
        writer("start", dict(bundle.start_doc))
        writer("descriptor", dict(descriptor.descriptor_doc))
        for n in range(1, 21):
            event = descriptor.compose_event(
                data={"k": float(n)}, timestamps={"k": 0.0}, seq_num=n, time=float(n)
            )
            writer("event", dict(event))
        writer("stop", dict(bundle.compose_stop()))
    finally:
        stop.set()
        other.join()
    group = zarr.open_group(writer.stores[0], mode="r")["primary"]
    assert isinstance(group, zarr.Group)
    np.testing.assert_array_equal(group["k"][...], np.arange(1.0, 21.0))
    assert bool(group["_written"][...].all())


def _writer_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("bluesky-zarr-")}


def _wait_until_gone(threads: set[threading.Thread]) -> None:
    for thread in threads:
        thread.join(timeout=10)
    assert not any(t.is_alive() for t in threads), "the writer's threads did not end"


def _one_run(writer: ZarrWriter, value: float) -> None:
    bundle = compose_run(metadata={})
    descriptor = bundle.compose_descriptor(
        data_keys={"k": {"dtype": "number", "shape": [], "source": "SIM:k"}}, name="primary"
    )
    writer("start", dict(bundle.start_doc))
    writer("descriptor", dict(descriptor.descriptor_doc))
    event = descriptor.compose_event(data={"k": value}, timestamps={"k": 0.0}, seq_num=1)
    writer("event", dict(event))
    writer("stop", dict(bundle.compose_stop()))


def test_a_closed_writer_ends_its_threads_and_a_later_run_starts_them_again(tmp_path):
    before = _writer_threads()
    writer = ZarrWriter(tmp_path)
    _one_run(writer, 1.5)
    started = _writer_threads() - before
    assert started, "the run wrote through no worker thread"
    writer.close()
    _wait_until_gone(started)
    _one_run(writer, 2.5)
    values = sorted(
        float(zarr.open_group(store, mode="r")["primary/k"][0]) for store in writer.stores
    )
    assert values == [1.5, 2.5]
    again = _writer_threads() - before
    writer.close()
    _wait_until_gone(again)


def test_a_writer_that_is_dropped_ends_its_threads(tmp_path):
    before = _writer_threads()
    writer = ZarrWriter(tmp_path)
    _one_run(writer, 1.0)
    started = _writer_threads() - before
    assert started
    del writer
    gc.collect()
    _wait_until_gone(started)


def test_no_thread_of_the_writer_outlives_close(tmp_path):
    """Workers, the reader of detector files and each run's flusher have ended
    when close() returns, also with a run left open (finished incomplete)."""
    from bluesky import RunEngine

    from conftest import step_scan_docs

    before = _writer_threads()
    docs = step_scan_docs(RunEngine({}, call_returns_result=False), tmp_path)
    writer = ZarrWriter(tmp_path / "data", flush_interval=0.05)
    for name, doc in docs:
        if name != "stop":
            writer(name, doc)
    _one_run(writer, 3.5)
    started = _writer_threads() - before
    names = {t.name.rstrip("0123456789").rstrip("-") for t in started}
    assert {"bluesky-zarr", "bluesky-zarr-reader", "bluesky-zarr-flusher"} <= names
    writer.close()
    assert [t.name for t in _writer_threads() - before if t.is_alive()] == []
    (store, _) = writer.stores
    info = zarr.open_group(store, mode="r").attrs["bluesky_zarr"]
    assert info["complete"] is False and "closed" in info["incomplete_reason"]
