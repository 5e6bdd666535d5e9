"""external="virtual": detectors' HDF5 frames referenced in place, in an Icechunk
repository shaped like the scan.

ophyd-async's simulated detector (``SimBlobDetector``) writes its frames to
HDF5 and emits stream_resource/stream_datum documents. Every frame read back
through xarray must equal the frame the detector wrote at that point, while
the repository holds no frame bytes; files whose chunks no Zarr codec reads
are copied, and the store says so.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import warnings
from pathlib import Path, PurePath
from typing import Any
from urllib.parse import urlparse

import bluesky.plan_stubs as bps
import h5py
import hdf5plugin
import numpy as np
import pytest
import xarray as xr
from bluesky.plans import grid_scan
from ophyd_async import sim
from ophyd_async.core import (
    init_devices,
)
from ophyd_async.sim import _pattern_generator

from bluesky_zarr import ZarrWriter, open_virtual
from bluesky_zarr._cli import main
from bluesky_zarr.catalog._inspect import describe_store
from bluesky_zarr.external._data import AreaDetectorHDF5Handler

from conftest import blob_detector, fly, quick_sleep

Docs = list[tuple[str, dict[str, Any]]]
FRAME_BYTES = 240 * 320  # the simulated detector's uint8 frames


def compressed_pattern_file(filters: dict[str, Any]) -> type:
    """The simulated detector's file, its frames stored with ``filters`` (and
    ``chunks``, one frame by default)."""
    filters = dict(filters)
    chunks = filters.pop("chunks", None)

    class CompressedPatternFile(_pattern_generator.PatternFile):
        def __init__(self, path: PurePath, width: int = 320, height: int = 240) -> None:
            self.file = h5py.File(path, "w", libver="latest")
            self.data = self.file.create_dataset(
                name=_pattern_generator.DATA_PATH,
                shape=(0, height, width),
                dtype=np.uint8,
                maxshape=(None, height, width),
                chunks=chunks or (1, height, width),
                **filters,
            )
            self.sum = self.file.create_dataset(
                name=_pattern_generator.SUM_PATH,
                shape=(0,),
                dtype=np.int64,
                maxshape=(None,),
                chunks=(1024,),
            )
            self.file.swmr_mode = True
            self.blob = _pattern_generator.generate_gaussian_blob(height, width) * 255
            self.image_counter = 0

    return CompressedPatternFile


def record(RE: Any) -> Docs:
    docs: Docs = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    return docs


def hdf5_rows(docs: Docs, key: str) -> np.ndarray:
    (sres,) = [d for n, d in docs if n == "stream_resource" and d["data_key"] == key]
    with h5py.File(urlparse(sres["uri"]).path, "r") as file:
        return np.asarray(file[sres["parameters"]["dataset"]][()])


def open_primary(location: Any) -> xr.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return open_virtual(location)["primary"].to_dataset().load()


def tree_bytes(path: Path) -> dict[str, int]:
    """Bytes on disk below each top-level directory of ``path``."""
    sizes: dict[str, int] = {}
    for directory, _, files in os.walk(path):
        top = Path(directory).relative_to(path).parts[:1]
        name = top[0] if top else "."
        sizes[name] = sizes.get(name, 0) + sum(
            os.path.getsize(os.path.join(directory, f)) for f in files
        )
    return sizes


def assert_grid_frames(ds: xr.Dataset, frames: np.ndarray, dims: list[str]) -> None:
    """Every point holds the detector's frame of its seq_num, and the readback
    motors were at the point's setpoints."""
    for index in itertools.product(*(range(ds.sizes[d]) for d in dims)):
        point = dict(zip(dims, index))
        row = int(ds["seq_num"].isel(point)) - 1
        np.testing.assert_array_equal(
            ds["det"].isel(point).values, frames[row], err_msg=f"frame at {point}"
        )
        for dim in dims:
            assert float(ds[f"{dim}_readback"].isel(point)) == pytest.approx(
                float(ds[dim][point[dim]])
            )


def stage_and_detector(tmp_path: Path) -> tuple[Any, Any, Any]:
    pattern = sim.PatternGenerator(sleep=quick_sleep())
    with init_devices():
        stage = sim.SimStage(pattern)
    det = blob_detector(tmp_path, pattern)
    return pattern, stage, det


@pytest.mark.parametrize("snake", [False, True])
def test_grid_scan_frames_are_referenced_at_their_points(RE, tmp_path, capsys, snake):
    _, stage, det = stage_and_detector(tmp_path)
    RE(bps.mv(stage.x.velocity, 0, stage.y.velocity, 0))
    docs = record(RE)
    writer = ZarrWriter(tmp_path / "data", external="virtual")
    RE.subscribe(writer)
    RE(grid_scan([det], stage.x, -2, 2, 3, stage.y, 0, 3, 4, snake_axes=snake))

    ds = open_primary(writer.stores[0])
    assert ds["det"].dims == ("stage-x", "stage-y", "y", "x")
    assert bool(ds["_written"].all())
    frames, sums = hdf5_rows(docs, "det"), hdf5_rows(docs, "det-sum")
    assert len({int(s) for s in sums}) > 6, "frames should differ from point to point"
    if snake:
        assert ds["seq_num"].values[1].tolist() == [8, 7, 6, 5]
    assert_grid_frames(ds, frames, ["stage-x", "stage-y"])
    # The sums are in chunks of 1024 rows, which span points: copied, and said so.
    for index in itertools.product(range(3), range(4)):
        assert int(ds["det-sum"].values[index]) == sums[int(ds["seq_num"].values[index]) - 1]
    assert ds.attrs["virtual"]["referenced"] == ["det"]
    assert "span several points" in ds.attrs["virtual"]["copied"]["det-sum"]
    # No frame byte was copied: the repository's chunks hold scalars only.
    sizes = tree_bytes(writer.stores[0])
    assert sizes.get("chunks", 0) < FRAME_BYTES, sizes
    assert sum(sizes.values()) < 0.2 * frames.nbytes, sizes
    info = describe_store(writer.stores[0])
    assert info["run"]["complete"] is True
    assert info["streams"]["primary"]["written_points"] == 12
    assert info["streams"]["primary"]["virtual"]["referenced"] == ["det"]
    capsys.readouterr()
    assert main(["inspect", str(writer.stores[0])]) == 0
    printed = capsys.readouterr().out
    assert "in place (detector files): det" in printed
    assert "copied det-sum: HDF5 chunks of 1024 rows" in printed


@pytest.mark.parametrize("frames_per_event", [1, 3])
def test_fly_scan_with_several_frames_per_point(RE, tmp_path, frames_per_event):
    positions = itertools.count(0.0, 0.37)
    pattern = sim.PatternGenerator()
    pattern.sleep = quick_sleep(lambda: pattern.set_x(next(positions)))
    det = blob_detector(tmp_path, pattern)
    docs = record(RE)
    writer = ZarrWriter(tmp_path / "data", external="virtual")
    RE.subscribe(writer)
    RE(fly(det, 12, frames_per_event))

    ds = open_primary(writer.stores[0])
    frames, sums = hdf5_rows(docs, "det"), hdf5_rows(docs, "det-sum")
    assert frames.shape == (12 * frames_per_event, 240, 320)
    assert len({int(s) for s in sums}) > 8
    if frames_per_event == 1:
        assert ds["det"].dims == ("time", "y", "x")
        np.testing.assert_array_equal(ds["det"].values, frames)
    else:
        assert ds["det"].dims == ("time", "frame", "y", "x")
        np.testing.assert_array_equal(
            ds["det"].values, frames.reshape(12, frames_per_event, 240, 320)
        )
        np.testing.assert_array_equal(ds["det-sum"].values, sums.reshape(12, frames_per_event))
    np.testing.assert_array_equal(ds["seq_num"], np.arange(1, 13))
    assert bool(ds["_written"].all())
    assert ds.attrs["virtual"]["referenced"] == ["det"]
    assert tree_bytes(writer.stores[0]).get("chunks", 0) < FRAME_BYTES


@pytest.mark.parametrize(
    "filters, referenced",
    [
        (hdf5plugin.Zstd(), True),
        (hdf5plugin.Blosc(cname="lz4", shuffle=hdf5plugin.Blosc.BITSHUFFLE), True),
        ({"compression": "gzip"}, False),
        ({"compression": "lzf"}, False),
        ({"chunks": (1, 100, 160)}, True),
        ({"chunks": (1, 100, 160), **hdf5plugin.Zstd()}, True),
        ({"compression": "gzip", "shuffle": True}, False),
        (hdf5plugin.LZ4(), False),
    ],
    ids=["zstd", "blosc", "gzip", "lzf", "tiled", "tiled-zstd", "shuffle-gzip", "lz4"],
)
def test_compressed_files_are_referenced_or_copied(
    RE, tmp_path, monkeypatch, filters, referenced
):
    monkeypatch.setattr(_pattern_generator, "PatternFile", compressed_pattern_file(filters))
    _, stage, det = stage_and_detector(tmp_path)
    RE(bps.mv(stage.x.velocity, 0, stage.y.velocity, 0))
    docs = record(RE)
    writer = ZarrWriter(tmp_path / "data", external="virtual")
    RE.subscribe(writer)
    RE(grid_scan([det], stage.x, -2, 2, 2, stage.y, 0, 3, 3, snake_axes=True))

    ds = open_primary(writer.stores[0])
    frames = hdf5_rows(docs, "det")
    assert bool(ds["_written"].all())
    assert_grid_frames(ds, frames, ["stage-x", "stage-y"])
    chunk_bytes = tree_bytes(writer.stores[0]).get("chunks", 0)
    if referenced:
        assert ds.attrs["virtual"]["referenced"] == ["det"]
        assert "det" not in ds.attrs["virtual"]["copied"]
        assert chunk_bytes < FRAME_BYTES
    else:
        assert "det" not in ds.attrs["virtual"]["referenced"]
        reason = ds.attrs["virtual"]["copied"]["det"]
        assert "no Zarr V3 codec" in reason, reason
        # Copied: the frames are in the repository (compressed by the writer).
        assert chunk_bytes > 0


def test_live_reader_sees_the_last_committed_snapshot(RE, tmp_path):
    _, stage, det = stage_and_detector(tmp_path)
    RE(bps.mv(stage.x.velocity, 0, stage.y.velocity, 0))
    docs = record(RE)
    writer = ZarrWriter(tmp_path / "data", external="virtual", flush_interval=0.2)
    RE.subscribe(writer)
    seen: dict[str, Any] = {}

    def watch(name: str, doc: dict[str, Any]) -> None:
        # Mid-run, on the RunEngine's thread: wait for the flusher's commit.
        if name != "event" or doc["seq_num"] != 7 or seen:
            return
        for _ in range(200):
            try:
                ds = open_primary(writer.stores[0])
            except KeyError:  # no commit holds the stream yet (a loaded machine)
                threading.Event().wait(0.05)
                continue
            if int(ds["_written"].sum()) >= 5:
                seen["ds"] = ds
                return
            threading.Event().wait(0.05)

    RE.subscribe(watch)
    RE(grid_scan([det], stage.x, -2, 2, 3, stage.y, 0, 3, 4, snake_axes=True))

    live = seen["ds"]
    written = live["_written"].values
    assert 5 <= written.sum() < 12
    frames = hdf5_rows(docs, "det")
    for index in zip(*np.nonzero(written)):
        np.testing.assert_array_equal(
            live["det"].values[index], frames[int(live["seq_num"].values[index]) - 1]
        )
    for index in zip(*np.nonzero(~written)):
        # Not in that snapshot: the fill value, never a half-placed frame.
        assert not live["det"].values[index].any()
    final = open_primary(writer.stores[0])
    assert bool(final["_written"].all())
    assert_grid_frames(final, frames, ["stage-x", "stage-y"])


def test_contiguous_dataset_is_referenced_at_fixed_strides(tmp_path):
    """A hand-made document stream: frames in a contiguous dataset."""
    from event_model import compose_run

    frames = np.arange(6 * 5 * 4, dtype="<u2").reshape(6, 5, 4) * 7
    path = tmp_path / "detector" / "contiguous.h5"
    path.parent.mkdir()
    with h5py.File(path, "w") as file:
        file.create_dataset("data", data=frames)
        assert file["data"].chunks is None
    writer = ZarrWriter(tmp_path / "data", external="virtual")
    bundle = compose_run(metadata={"shape": [2, 3], "snaking": [False, True],
                                   "motors": ["a", "b"],
                                   "hints": {"dimensions": [(["a"], "primary"),
                                                            (["b"], "primary")]}})
    writer("start", bundle.start_doc)
    desc = bundle.compose_descriptor(
        name="primary",
        data_keys={
            "cam": {"source": "sim", "dtype": "array", "dtype_numpy": "<u2",
                    "shape": [1, 5, 4], "external": "STREAM:"},
            "a": {"source": "sim", "dtype": "number", "shape": []},
            "b": {"source": "sim", "dtype": "number", "shape": []},
        },
    )
    writer("descriptor", desc.descriptor_doc)
    sres = bundle.compose_stream_resource(
        mimetype="application/x-hdf5", uri=path.as_uri(), data_key="cam",
        parameters={"dataset": "data"},
    )
    writer("stream_resource", sres.stream_resource_doc)
    positions = [(0, 0), (0, 1), (0, 2), (1, 2), (1, 1), (1, 0)]  # snaked
    for n, (a, b) in enumerate(positions):
        writer("stream_datum", sres.compose_stream_datum(
            indices={"start": n, "stop": n + 1},
            seq_nums={"start": n + 1, "stop": n + 2},
            descriptor=desc.descriptor_doc,
        ))
        writer("event", desc.compose_event(
            data={"a": float(a), "b": float(b)}, timestamps={"a": 0.0, "b": 0.0},
            seq_num=n + 1,
        ))
    writer("stop", bundle.compose_stop())

    ds = open_primary(writer.stores[0])
    assert ds.attrs["virtual"]["referenced"] == ["cam"]
    for n, (a, b) in enumerate(positions):
        np.testing.assert_array_equal(ds["cam"].values[a, b], frames[n])
    assert tree_bytes(writer.stores[0]).get("chunks", 0) < frames[0].nbytes


@pytest.fixture
def s3(request) -> Any:
    """A moto S3 server on 127.0.0.1 with a bucket, and the writer's options."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="testing",
        aws_secret_access_key="testing", region_name="us-east-1",
    )
    client.create_bucket(Bucket="runs")
    options = {
        "key": "testing", "secret": "testing", "endpoint_url": endpoint,
        "client_kwargs": {"region_name": "us-east-1"},
    }
    try:
        yield client, options
    finally:
        server.stop()


def test_repository_on_s3_references_local_detector_files(RE, tmp_path, s3):
    client, options = s3
    _, stage, det = stage_and_detector(tmp_path)
    RE(bps.mv(stage.x.velocity, 0, stage.y.velocity, 0))
    docs = record(RE)
    writer = ZarrWriter("s3://runs/beamline", storage_options=options, external="virtual")
    RE.subscribe(writer)
    RE(grid_scan([det], stage.x, -2, 2, 2, stage.y, 0, 3, 3, snake_axes=True))

    (url,) = writer.stores
    assert str(url).startswith("s3://runs/beamline/")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = open_virtual(url, options)["primary"].to_dataset().load()
    assert bool(ds["_written"].all())
    assert_grid_frames(ds, hdf5_rows(docs, "det"), ["stage-x", "stage-y"])
    prefix = str(url).partition("s3://runs/")[2]
    objects = client.list_objects_v2(Bucket="runs", Prefix=prefix)["Contents"]
    chunk_bytes = sum(o["Size"] for o in objects if o["Key"].startswith(f"{prefix}/chunks/"))
    assert chunk_bytes < FRAME_BYTES
    assert describe_store(url, options)["streams"]["primary"]["written_points"] == 6


def area_detector_run(directory: Path, frame_per_point: int, **filters: Any) -> tuple[Docs, Any]:
    """Documents of a 2 × 3 snaked grid whose frames an area detector wrote to
    one HDF5 file (spec ``AD_HDF5``, ``frame_per_point`` rows a point), and
    the frames."""
    from event_model import compose_run

    frames = (np.arange(6 * frame_per_point * 5 * 4, dtype="<u2") * 3).reshape(
        6 * frame_per_point, 5, 4
    )
    directory.mkdir()
    with h5py.File(directory / "ad.h5", "w") as file:
        file.create_dataset("/entry/data/data", data=frames, chunks=(1, 5, 4), **filters)
    bundle = compose_run(metadata={
        "shape": [2, 3], "snaking": [False, True], "motors": ["a", "b"],
        "hints": {"dimensions": [(["a"], "primary"), (["b"], "primary")]},
    })
    docs: Docs = [("start", bundle.start_doc)]
    shape = [frame_per_point, 5, 4] if frame_per_point > 1 else [5, 4]
    desc = bundle.compose_descriptor(name="primary", data_keys={
        "cam": {"source": "ad", "dtype": "array", "dtype_numpy": "<u2", "shape": shape,
                "external": "FILESTORE:"},
        "a": {"source": "sim", "dtype": "number", "shape": []},
        "b": {"source": "sim", "dtype": "number", "shape": []},
    })
    docs.append(("descriptor", desc.descriptor_doc))
    resource = bundle.compose_resource(
        spec="AD_HDF5", root=str(directory), resource_path="ad.h5",
        resource_kwargs={"frame_per_point": frame_per_point},
    )
    docs.append(("resource", resource.resource_doc))
    positions = [(0, 0), (0, 1), (0, 2), (1, 2), (1, 1), (1, 0)]
    for n, (a, b) in enumerate(positions):
        datum = resource.compose_datum(datum_kwargs={"point_number": n})
        docs.append(("datum", datum))
        docs.append(("event", desc.compose_event(
            data={"cam": datum["datum_id"], "a": float(a), "b": float(b)},
            timestamps={"cam": 0.0, "a": 0.0, "b": 0.0}, seq_num=n + 1,
            filled={"cam": False},
        )))
    docs.append(("stop", bundle.compose_stop()))
    expected = np.zeros((2, 3) + tuple(shape), dtype="<u2")
    for n, (a, b) in enumerate(positions):
        expected[a, b] = frames[n * frame_per_point : (n + 1) * frame_per_point].reshape(shape)
    return docs, expected


@pytest.mark.parametrize("frame_per_point", [1, 2])
def test_area_detector_hdf5_datums_are_referenced(tmp_path, frame_per_point):
    docs, expected = area_detector_run(tmp_path / "ad", frame_per_point)
    virtual = ZarrWriter(tmp_path / "virtual", external="virtual")
    filled = ZarrWriter(
        tmp_path / "filled", handler_registry={"AD_HDF5": AreaDetectorHDF5Handler}
    )
    for name, doc in docs:
        virtual(name, doc)
    for name, doc in docs:
        filled(name, doc)
    ds = open_primary(virtual.stores[0])
    np.testing.assert_array_equal(ds["cam"].values, expected)
    assert bool(ds["_written"].all())
    assert ds.attrs["virtual"]["referenced"] == ["cam"]
    assert ds.attrs["virtual"]["copied"] == {}
    # The file referenced, with its size and modification time then.
    h5 = tmp_path / "ad" / "ad.h5"
    assert ds.attrs["virtual"]["files"] == {
        str(h5): {"size": h5.stat().st_size, "mtime": h5.stat().st_mtime_ns / 1e9}
    }
    assert tree_bytes(virtual.stores[0]).get("chunks", 0) < expected[0, 0].nbytes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        copy = xr.open_zarr(filled.stores[0], group="primary").load()
    np.testing.assert_array_equal(copy["cam"].values, expected)


def test_area_detector_file_with_lzf_is_copied(tmp_path):
    docs, expected = area_detector_run(tmp_path / "ad", 1, compression="lzf")
    writer = ZarrWriter(tmp_path / "virtual", external="virtual")
    for name, doc in docs:
        writer(name, doc)
    ds = open_primary(writer.stores[0])
    np.testing.assert_array_equal(ds["cam"].values, expected)
    assert bool(ds["_written"].all())
    assert ds.attrs["virtual"]["referenced"] == []
    assert "LZF" in ds.attrs["virtual"]["copied"]["cam"]


KILLED_CHILD = """
import asyncio, os, signal, sys
from pathlib import PurePath
import bluesky.plan_stubs as bps
from bluesky import RunEngine
from bluesky.plans import grid_scan
from ophyd_async import sim
from ophyd_async.core import StaticPathProvider, UUIDFilenameProvider, init_devices
from bluesky_zarr import ZarrWriter

async def sleep(seconds):
    await asyncio.sleep(0.005)

directory = sys.argv[1]
pattern = sim.PatternGenerator(sleep=sleep)
RE = RunEngine({}, call_returns_result=False)
with init_devices():
    stage = sim.SimStage(pattern)
    det = sim.SimBlobDetector(
        StaticPathProvider(UUIDFilenameProvider(), PurePath(directory, "detector")), pattern
    )
RE(bps.mv(stage.x.velocity, 0, stage.y.velocity, 0))
writer = ZarrWriter(os.path.join(directory, "data"), external="virtual", flush_interval=None)
RE.subscribe(writer)

def kill(name, doc):
    if name == "stream_resource" and doc["data_key"] == "det":
        print(doc["uri"], flush=True)
    if name == "event" and doc["seq_num"] == 6:
        writer.flush()  # commits points 1..6
    if name == "event" and doc["seq_num"] == 8:
        os.kill(os.getpid(), signal.SIGKILL)

RE.subscribe(kill)
RE(grid_scan([det], stage.x, -2, 2, 3, stage.y, 0, 3, 4, snake_axes=True))
"""


def test_killed_writer_leaves_its_last_commit(tmp_path):
    import subprocess
    import sys

    (tmp_path / "detector").mkdir()
    child = subprocess.run(
        [sys.executable, "-c", KILLED_CHILD, str(tmp_path)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
    )
    assert child.returncode == -9, child.stderr
    uri = [line for line in child.stdout.splitlines() if line.startswith("file:")][0]
    # A SWMR file whose writer was killed opens for SWMR reading.
    with h5py.File(urlparse(uri).path, "r", swmr=True) as file:
        frames = np.asarray(file["/entry/data/data"][()])
    (store,) = [p for p in (tmp_path / "data").iterdir() if not p.name.startswith(".")]
    ds = open_primary(store)
    written = ds["_written"].values
    # Points 1..6 were committed; 7 and 8 may not be: nothing after the last commit.
    assert int(written.sum()) == 6
    assert sorted(int(s) for s in ds["seq_num"].values[written]) == [1, 2, 3, 4, 5, 6]
    for index in zip(*np.nonzero(written)):
        np.testing.assert_array_equal(
            ds["det"].values[index], frames[int(ds["seq_num"].values[index]) - 1]
        )
    assert describe_store(store)["run"]["complete"] is False


def test_an_existing_repository_is_not_overwritten_unless_asked(tmp_path):
    from bluesky_zarr import StoreExistsError

    docs, expected = area_detector_run(tmp_path / "ad", 1)
    first = ZarrWriter(tmp_path / "data", external="virtual", name_template="scan")
    for name, doc in docs:
        first(name, doc)
    second = ZarrWriter(tmp_path / "data", external="virtual", name_template="scan")
    with pytest.raises(StoreExistsError):
        second(*docs[0])
    again = ZarrWriter(
        tmp_path / "data", external="virtual", name_template="scan", overwrite=True
    )
    for name, doc in docs:
        again(name, doc)
    assert again.stores == first.stores
    ds = open_primary(again.stores[0])
    np.testing.assert_array_equal(ds["cam"].values, expected)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["scan.zarr"]


def with_bad_datum(docs: Docs) -> Docs:
    """The documents, with one more event whose datum points past the file."""
    from event_model import compose_datum, compose_event

    resource = next(doc for name, doc in docs if name == "resource")
    descriptor = next(doc for name, doc in docs if name == "descriptor")
    datum = compose_datum(resource=resource, counter=itertools.count(99),
                          datum_kwargs={"point_number": 99})
    event = compose_event(
        descriptor=descriptor, event_counters={}, seq_num=6,
        data={"cam": datum["datum_id"], "a": 1.0, "b": 0.0},
        timestamps={"cam": 0.0, "a": 0.0, "b": 0.0}, filled={"cam": False},
    )
    return docs[:-1] + [("datum", datum), ("event", event), docs[-1]]


def feed_refusing(writer: Any, docs: Docs) -> int:
    from bluesky_zarr import ExternalIndexError

    refused = 0
    for name, doc in docs:
        try:
            writer(name, doc)
        except ExternalIndexError:
            refused += 1
    return refused


def test_refused_documents_are_kept_beside_a_local_repository(tmp_path):
    docs, expected = area_detector_run(tmp_path / "ad", 1)
    writer = ZarrWriter(tmp_path / "data", external="virtual")
    assert feed_refusing(writer, with_bad_datum(docs)) == 1
    store = writer.stores[0]
    (line,) = (store / "refused_documents.jsonl").read_text().splitlines()
    assert json.loads(line)["name"] == "event"
    info = describe_store(store)
    assert info["run"]["refused_documents"] == 1 and info["run"]["complete"] is False
    np.testing.assert_array_equal(open_primary(store)["cam"].values, expected)


def test_refused_documents_are_kept_beside_a_repository_on_s3(tmp_path, s3):
    client, options = s3
    docs, expected = area_detector_run(tmp_path / "ad", 1)
    writer = ZarrWriter("s3://runs/beamline", storage_options=options, external="virtual")
    assert feed_refusing(writer, with_bad_datum(docs)) == 1
    (url,) = writer.stores
    key = str(url).partition("s3://runs/")[2] + "/refused_documents.jsonl"
    (line,) = client.get_object(Bucket="runs", Key=key)["Body"].read().splitlines()
    assert json.loads(line)["name"] == "event"
    assert describe_store(url, options)["run"]["refused_documents"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = open_virtual(url, options)["primary"].to_dataset().load()
    np.testing.assert_array_equal(ds["cam"].values, expected)
