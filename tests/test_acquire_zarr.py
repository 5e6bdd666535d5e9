"""Detector frames that another writer, acquire-zarr, writes into a Zarr store
of its own, read while it writes them.

The layout is that of a detector integration seen in the wild (redsun's,
through acquire-zarr): every data key of the device is an array named after
the key inside one shared store (a multiscale image's full resolution at
``<key>/0``), each stream_resource names the store without a ``path``, and
acquire-zarr writes an array's ``zarr.json`` only as whole shards complete
(older releases only at close), after the stream_datum documents that name
the frames.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from bluesky import RunEngine
from bluesky.plans import grid_scan
from event_model import ComposeStreamResource, StreamRange
from ophyd import Device
from ophyd.status import Status

from bluesky_zarr import ExternalIndexError, ZarrWriter
from bluesky_zarr.external._formats import ZarrSource
from bluesky_zarr.sim import frame_at, motors
from bluesky_zarr.write._run import REFUSED_FILE

from conftest import open_stream

az = pytest.importorskip("acquire_zarr")

FRAME = (6, 8)
ROWS, COLUMNS = 3, 4


class AcquireCamera(Device):
    """A camera whose integration appends each frame to an acquire-zarr
    stream: ``<name>_image`` a plain array, ``<name>_overview`` a multiscale
    image (OME-NGFF, full resolution at ``<name>_overview/0``), both in one
    store; the frames are named by stream_resource and stream_datum
    documents as soon as they are appended."""

    def __init__(
        self, watched: list[Any], store: Path, *, frames_per_shard: int, name: str = "acq"
    ) -> None:
        super().__init__(name=name)
        self.watched = watched
        self.store = store
        self.frames_per_shard = frames_per_shard
        self.keys = {f"{name}_image": False, f"{name}_overview": True}
        self.stream: Any = None
        self.appended = 0
        self.collected = 0
        self.datum_composers: dict[str, Any] = {}

    def _dimensions(self) -> list[Any]:
        height, width = FRAME
        return [
            az.Dimension(name="t", kind=az.DimensionType.TIME, array_size_px=0,
                         chunk_size_px=1, shard_size_chunks=self.frames_per_shard),
            az.Dimension(name="y", kind=az.DimensionType.SPACE, array_size_px=height,
                         chunk_size_px=height, shard_size_chunks=1),
            az.Dimension(name="x", kind=az.DimensionType.SPACE, array_size_px=width,
                         chunk_size_px=width, shard_size_chunks=1),
        ]

    def stage(self) -> list[Any]:
        settings = az.StreamSettings(
            store_path=str(self.store),
            version=az.ZarrVersion.V3,
            arrays=[
                az.ArraySettings(output_key=key, dimensions=self._dimensions(),
                                 data_type=np.uint16, is_ngff=multiscale)
                for key, multiscale in self.keys.items()
            ],
        )
        self.stream = az.ZarrStream(settings)
        return [self]

    def unstage(self) -> list[Any]:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        return [self]

    @staticmethod
    def frames(positions: dict[str, float]) -> dict[str, np.ndarray]:
        image = frame_at(positions, FRAME)
        return {"acq_image": image, "acq_overview": image // 4}

    def trigger(self) -> Status:
        positions = {m.name: float(m.position) for m in self.watched}
        for key, frame in self.frames(positions).items():
            self.stream.append(frame, key=key)
        self.appended += 1
        status = Status(obj=self)
        status.set_finished()
        return status

    def describe(self) -> OrderedDict[str, dict[str, Any]]:
        return OrderedDict(
            (key, {"source": f"acquire-zarr:{self.store}", "dtype": "array",
                   "dtype_numpy": "<u2", "shape": [1, *FRAME], "external": "STREAM:"})
            for key in self.keys
        )

    def read(self) -> OrderedDict[str, Any]:
        return OrderedDict()  # the frames are in the store, named by stream_datum

    def get_index(self) -> int:
        return self.appended

    def collect_asset_docs(self, index: int | None = None) -> Any:
        if not self.datum_composers:
            for key in self.keys:
                bundle = ComposeStreamResource()(
                    mimetype="application/x-zarr",
                    uri=self.store.as_uri(),
                    data_key=key,
                    parameters={},  # no "path": the array is named after the key
                )
                self.datum_composers[key] = bundle.compose_stream_datum
                yield "stream_resource", bundle.stream_resource_doc
        stop = self.appended if index is None else index
        if stop > self.collected:
            for key in self.keys:
                indices = StreamRange(start=self.collected, stop=stop)
                yield "stream_datum", self.datum_composers[key](indices=indices)
            self.collected = stop


def _metadata(store: Path, array: str) -> dict[str, Any] | None:
    path = store / array / "zarr.json"
    return json.loads(path.read_text()) if path.exists() else None


def _grid(RE: RunEngine, tmp_path: Path, *callbacks: Any) -> tuple[AcquireCamera, list]:
    wavelength, position = motors("wavelength", "position")
    camera = AcquireCamera(
        [wavelength, position], tmp_path / "detector" / "acq.zarr", frames_per_shard=COLUMNS
    )
    camera.store.parent.mkdir()
    documents: list[tuple[str, dict[str, Any]]] = []
    RE.subscribe(lambda name, doc: documents.append((name, doc)))
    for callback in callbacks:
        RE.subscribe(callback)
    RE(grid_scan([camera], wavelength, 400, 700, ROWS, position, 0, 5, COLUMNS,
                 snake_axes=True))
    return camera, documents


def _assert_every_frame_at_its_point(ds: Any, points: int = ROWS * COLUMNS) -> None:
    checked = 0
    for i, j in np.ndindex(ROWS, COLUMNS):
        if not ds["_written"].values[i, j]:
            continue
        at = {"wavelength": float(ds["wavelength"][i]), "position": float(ds["position"][j])}
        for key, frame in AcquireCamera.frames(at).items():
            np.testing.assert_array_equal(ds[key].values[i, j], frame, err_msg=f"{key} {i, j}")
        checked += 1
    assert checked == points


def test_frames_are_read_while_acquire_zarr_writes_them(RE: RunEngine, tmp_path: Path) -> None:
    seen: dict[str, Any] = {}
    writer = ZarrWriter(tmp_path / "data")

    def before_the_writer(name: str, doc: dict[str, Any]) -> None:
        # When the first frame is named, acquire-zarr has not yet written the
        # metadata of an array holding it (its first shard is not complete).
        if name == "stream_datum" and "metadata" not in seen:
            seen["metadata"] = _metadata(tmp_path / "detector" / "acq.zarr", "acq_image")
            seen["stop"] = doc["indices"]["stop"]

    camera, documents = _grid(RE, tmp_path, before_the_writer, writer)

    stated = seen["metadata"]["shape"][0] if seen["metadata"] is not None else 0
    assert stated < seen["stop"], "the frame was named before its array's metadata held it"
    # The layout read: no path; arrays named after the data keys.
    resources = [d for n, d in documents if n == "stream_resource"]
    assert [r["parameters"] for r in resources] == [{}, {}]
    assert {r["uri"] for r in resources} == {camera.store.as_uri()}
    assert _metadata(camera.store, "acq_image")["shape"] == [ROWS * COLUMNS, *FRAME]
    assert _metadata(camera.store, "acq_overview/0")["shape"] == [ROWS * COLUMNS, *FRAME]
    assert _metadata(camera.store, "acq_overview")["node_type"] == "group"

    (store,) = writer.stores
    ds = open_stream(store)
    assert ds["acq_image"].dims == ("wavelength", "position", "y", "x")
    assert bool(ds["_written"].all())
    _assert_every_frame_at_its_point(ds)
    info = zarr.open_group(store, mode="r").attrs["bluesky_zarr"]
    assert info["complete"] is True and info["refused_documents"] == 0


def _stale(store: Path, array: str, rows: int) -> None:
    """Make an array's zarr.json state fewer rows than its shards hold, as a
    producer that rewrites it only at close leaves it while it writes."""
    path = store / array / "zarr.json"
    document = json.loads(path.read_text())
    document["shape"][0] = rows
    path.write_text(json.dumps(document))


def test_rows_past_a_stale_zarr_json_are_read_from_whole_shards(
    RE: RunEngine, tmp_path: Path
) -> None:
    camera, documents = _grid(RE, tmp_path)
    for array in ("acq_image", "acq_overview/0"):
        _stale(camera.store, array, COLUMNS)  # one shard of three
    writer = ZarrWriter(tmp_path / "data")
    for name, doc in documents:
        writer(name, doc)
    ds = open_stream(writer.stores[0])
    assert bool(ds["_written"].all())
    _assert_every_frame_at_its_point(ds)


def test_a_shard_still_being_written_is_waited_for_never_read_as_fill(
    RE: RunEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    camera, documents = _grid(RE, tmp_path)
    for array in ("acq_image", "acq_overview/0"):
        _stale(camera.store, array, COLUMNS)
    # The last shard of the image as it is while acquire-zarr writes it:
    # its frames so far, without the index that ends a shard.
    last = camera.store / "acq_image" / "c" / str(ROWS - 1) / "0" / "0"
    last.write_bytes(last.read_bytes()[: 2 * np.prod(FRAME) * 2])
    monkeypatch.setattr(ZarrSource, "patience", 0.5)  # instead of waiting 30 s for it
    writer = ZarrWriter(tmp_path / "data")
    refusals = []
    for name, doc in documents:
        try:
            writer(name, doc)
        except ExternalIndexError as err:  # raised at the next document, and at stop
            refusals.append(str(err))
    assert refusals and all("of the Zarr array 'acq_image'" in r for r in refusals)
    assert "and no new row for 0.5 s" in refusals[0]
    (store,) = writer.stores
    ds = open_stream(store)
    # The two rows whose shards are whole are written; the third is not, and
    # nothing claims it is.
    np.testing.assert_array_equal(ds["_written"].values, [[True] * 4, [True] * 4, [False] * 4])
    _assert_every_frame_at_its_point(ds, points=8)
    info = zarr.open_group(store, mode="r").attrs["bluesky_zarr"]
    assert info["complete"] is False
    refused = [json.loads(line) for line in (store / REFUSED_FILE).read_text().splitlines()]
    # The stream_datum of each point of the third row, kept with why.
    assert [r["name"] for r in refused] == ["stream_datum"] * COLUMNS
    assert all("ExternalIndexError" in r["error"] for r in refused)
    assert sorted(r["doc"]["indices"]["start"] for r in refused) == [8, 9, 10, 11]
