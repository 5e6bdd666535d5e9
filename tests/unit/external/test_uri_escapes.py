"""Detector files in directories whose names a URI must escape."""

from __future__ import annotations

import asyncio
import itertools
import warnings
from pathlib import Path, PurePath

import bluesky.plan_stubs as bps
import h5py
import numpy as np
import pytest
import xarray as xr
from bluesky import RunEngine
from bluesky.plans import grid_scan
from event_model import compose_run
from ophyd_async import sim
from ophyd_async.core import StaticPathProvider, UUIDFilenameProvider, init_devices

from bluesky_zarr import DocumentError, ZarrWriter, open_virtual


async def _quick_sleep(seconds: float) -> None:
    await asyncio.sleep(0.002)


@pytest.mark.parametrize("external", ["fill", "virtual"])
def test_detector_directory_with_a_space_hash_and_accent(
    RE: RunEngine, tmp_path: Path, external: str
) -> None:
    # ophyd-async puts the directory into the stream_resource's URI as it is
    # (file://localhost/.../run #2 é/<uuid>.h5): '#' is part of the path there.
    directory = tmp_path / "run #2 é"
    directory.mkdir()
    pattern = sim.PatternGenerator(sleep=_quick_sleep)
    with init_devices():
        stage = sim.SimStage(pattern)
        det = sim.SimBlobDetector(
            StaticPathProvider(UUIDFilenameProvider(), PurePath(directory)), pattern
        )
    RE(bps.mv(stage.x.velocity, 0, stage.y.velocity, 0))
    uris: list[str] = []
    writer = ZarrWriter(tmp_path / "data", external=external)
    RE(
        grid_scan([det], stage.x, -1, 1, 2, stage.y, 0, 1, 3),
        [writer, lambda name, doc: uris.append(doc["uri"]) if name == "stream_resource" else 0],
    )
    assert "#2 é/" in uris[0]
    (h5,) = directory.glob("*.h5")
    with h5py.File(h5, "r") as file:
        frames = np.asarray(file["/entry/data/data"][()])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if external == "virtual":
            ds = open_virtual(writer.stores[0])["primary"].to_dataset().load()
        else:
            ds = xr.open_zarr(writer.stores[0], group="primary").load()
    assert bool(ds["_written"].all())
    for index in itertools.product(range(2), range(3)):
        row = int(ds["seq_num"].values[index]) - 1
        np.testing.assert_array_equal(ds["det"].values[index], frames[row])
    assert len({int(f.sum()) for f in frames}) > 1


def test_a_zarr_stream_resource_inside_the_runs_own_store_is_refused(tmp_path: Path) -> None:
    # The run's arrays are pre-sized (a grid of 3 points): read back as the
    # detector's frames before they are on disk, they would be fill values.
    writer = ZarrWriter(tmp_path, name_template="own")
    bundle = compose_run(
        metadata={"shape": [3], "motors": ["m"], "hints": {"dimensions": [[["m"], "primary"]]}}
    )
    writer("start", bundle.start_doc)
    store = writer.stores[-1]
    assert isinstance(store, Path)
    stream = bundle.compose_descriptor(
        name="primary",
        data_keys={
            "d": {"source": "sim", "dtype": "array", "shape": [4], "dtype_numpy": "<f8"},
            "ext": {"source": "sim", "dtype": "array", "shape": [1, 4], "dtype_numpy": "<f8",
                    "external": "STREAM:"},
        },
    )
    writer("descriptor", stream.descriptor_doc)
    resource = bundle.compose_stream_resource(
        mimetype="application/x-zarr", uri=store.as_uri(), data_key="ext",
        parameters={"path": "primary/d"},
    )
    with pytest.raises(DocumentError, match="own store"):
        writer("stream_resource", resource.stream_resource_doc)
    for n in range(3):
        event = stream.compose_event(data={"d": np.full(4, n + 1.0)}, timestamps={"d": 0.0})
        writer("event", event)
    writer("stop", bundle.compose_stop())
    ds = xr.open_zarr(store, group="primary").load()
    np.testing.assert_array_equal(ds["d"].values, [[1.0] * 4, [2.0] * 4, [3.0] * 4])
    assert not ds["_written"].values.any()  # "ext" has no frames
