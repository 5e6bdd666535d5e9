"""The writer's threads and the rest of the process leave each other alone."""

from __future__ import annotations

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
