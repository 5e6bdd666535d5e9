"""Every stream_resource format ophyd-async emits: frames in TIFF, JPEG and NPY
file series and in Zarr arrays, written by the libraries detectors use.

The detector is a real ophyd-async ``StandardDetector`` whose data logic
writes one file per frame and describes it with ophyd-async's own
``StreamResourceDataProvider``, as its areaDetector TIFF and JPEG writers do:
``uri`` the directory, ``template`` ``"<name>_{:06d}.tiff"``, ``chunk_shape``
``(1, height, width)``. Each frame depends on where the stage was when it was
taken, so a frame in the store can be checked against the point it sits at.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import sys
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any
from urllib.parse import urlparse

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
import pytest
import tifffile
import zarr
from bluesky.plans import grid_scan
from ophyd_async import sim
from ophyd_async.core import (
    DetectorAcquireLogic,
    DetectorDataLogic,
    DetectorTriggerLogic,
    PathProvider,
    StandardDetector,
    StaticPathProvider,
    StreamableDataProvider,
    StreamResourceDataProvider,
    StreamResourceInfo,
    TriggerInfo,
    UUIDFilenameProvider,
    init_devices,
)
from PIL import Image

import bluesky_zarr.external._data
from bluesky_zarr import (
    DataShapeError,
    DocumentError,
    ExternalFileError,
    MissingDependencyError,
    UnknownSpecError,
    ZarrWriter,
)
from bluesky_zarr.sim import frame_at

from conftest import by_kind, fly, iter_points, open_stream, record

Docs = list[tuple[str, dict[str, Any]]]

HEIGHT, WIDTH = 24, 32

MIMETYPES = {
    "tiff": "multipart/related;type=image/tiff",
    "jpeg": "multipart/related;type=image/jpeg",
    "npy": "multipart/related;type=application/x-npy",
    "zarr": "application/x-zarr",
}
EXTENSIONS = {"tiff": ".tiff", "jpeg": ".jpg", "npy": ".npy"}
DTYPES = {"tiff": "uint16", "jpeg": "uint8", "npy": "uint16", "zarr": "uint16"}
ZARR_PATH = "entry/data"


# ------------------------------------------------------------- the detector
class Generator(sim.PatternGenerator):
    """ophyd-async's pattern generator (the clock and frame counting of its
    sim detector), writing through :class:`FrameFiles`; it keeps where the
    stage is, which the stage tells it."""

    def __init__(self) -> None:
        super().__init__(sleep=quick_sleep)
        self.x = self.y = 0.0

    def set_x(self, x: float) -> None:
        super().set_x(x)
        self.x = x

    def set_y(self, y: float) -> None:
        super().set_y(y)
        self.y = y

    def open_frames(self, frames: FrameFiles) -> None:
        self._file = frames  # type: ignore[assignment]
        self._update_images_written(0)


async def quick_sleep(seconds: float) -> None:
    await asyncio.sleep(0.002)


@dataclass
class Written:
    """One frame as the detector wrote it."""

    x: float
    y: float
    where: str  # the file, or the row of the Zarr array
    frame: np.ndarray


@dataclass
class FrameFiles:
    """Writes each frame the generator makes: a file per frame (tifffile,
    Pillow, numpy), or a row of a Zarr array (zarr-python)."""

    generator: Generator
    directory: Path
    filename: str
    fmt: str
    log: list[Written]
    image_counter: int = 0
    array: Any = None

    def __post_init__(self) -> None:
        if self.fmt == "zarr":
            group = zarr.open_group(self.directory / f"{self.filename}.zarr", mode="w")
            self.array = group.create_array(
                ZARR_PATH, shape=(0, HEIGHT, WIDTH), chunks=(1, HEIGHT, WIDTH), dtype="uint16"
            )

    def frame(self) -> np.ndarray:
        # Each frame differs: by where the stage is, and by its number.
        image = frame_at({"x": self.generator.x, "y": self.generator.y}, (HEIGHT, WIDTH))
        image = image + 3 * (self.image_counter % 5)
        if self.fmt == "jpeg":
            return (image // 20).astype("uint8")
        return image.astype("uint16")

    def write_image_to_file(self, intensity: float) -> None:
        frame = self.frame()
        n = self.image_counter
        if self.fmt == "zarr":
            self.array.resize((n + 1, HEIGHT, WIDTH))
            self.array[n] = frame
            where = f"row {n}"
        else:
            where = str(self.directory / f"{self.filename}_{n:06d}{EXTENSIONS[self.fmt]}")
            if self.fmt == "tiff":
                tifffile.imwrite(where, frame)
            elif self.fmt == "jpeg":
                Image.fromarray(frame).save(where, quality=90)
            else:
                np.save(where, frame)
        self.log.append(Written(self.generator.x, self.generator.y, where, frame))
        self.image_counter += 1

    def close(self) -> None:
        pass


@dataclass
class FrameFilesDataLogic(DetectorDataLogic):
    """Composes its stream_resource as ophyd-async's areaDetector file writers
    do (``ADMultipartDataLogic``), through ``StreamResourceDataProvider``."""

    path_provider: PathProvider
    generator: Generator
    fmt: str
    log: list[Written]
    chunk_shape: tuple[int, ...] = (1, HEIGHT, WIDTH)

    async def prepare_unbounded(self, datakey_name: str) -> StreamableDataProvider:
        path_info = self.path_provider(datakey_name)
        directory = Path(path_info.directory_path)
        self.generator.open_frames(
            FrameFiles(self.generator, directory, path_info.filename, self.fmt, self.log)
        )
        if self.fmt == "zarr":
            uri = f"{path_info.directory_uri}{path_info.filename}.zarr"
            parameters: dict[str, Any] = {"path": ZARR_PATH}
        else:
            uri = path_info.directory_uri
            parameters = {"template": path_info.filename + "_{:06d}" + EXTENSIONS[self.fmt]}
        resource = StreamResourceInfo(
            data_key=datakey_name,
            shape=(HEIGHT, WIDTH),
            chunk_shape=self.chunk_shape,
            dtype_numpy=np.dtype(DTYPES[self.fmt]).str,
            parameters=parameters,
        )
        return StreamResourceDataProvider(
            uri=uri,
            resources=[resource],
            mimetype=MIMETYPES[self.fmt],
            collections_written_signal=self.generator.images_written,
        )

    async def stop(self) -> None:
        self.generator.close_file()

    def get_hinted_fields(self, datakey_name: str) -> Sequence[str]:
        return [datakey_name]


@dataclass
class Trigger(DetectorTriggerLogic):
    generator: Generator

    async def prepare_internal(self, num: int, livetime: float, deadtime: float) -> None:
        self.generator.setup_acquisition_parameters(
            exposure=livetime, period=livetime + deadtime, number_of_frames=num
        )

    async def default_trigger_info(self) -> TriggerInfo:
        return TriggerInfo()


@dataclass
class Acquire(DetectorAcquireLogic):
    generator: Generator
    task: asyncio.Task[None] | None = field(default=None)

    async def start_acquiring(self) -> None:
        self.task = asyncio.create_task(self.generator.write_images_to_file())

    async def wait_for_idle(self) -> None:
        if self.task:
            await self.task

    async def ensure_stopped(self) -> None:
        if self.task:
            self.task.cancel()
            with suppress(asyncio.CancelledError):
                await self.task
            self.task = None


class FileSeriesDetector(StandardDetector):
    def __init__(self, data_logic: FrameFilesDataLogic, name: str = "") -> None:
        generator = data_logic.generator
        self.add_detector_logics(Trigger(generator), Acquire(generator), data_logic)
        super().__init__(name=name)


@dataclass
class Setup:
    stage: Any
    det: FileSeriesDetector
    log: list[Written]


#: Fly scans of the test detector, quickly.
FAST = {"livetime": 0.01, "deadtime": 0.01, "flush_period": 0.05}

def make_setup(RE: Any, tmp_path: Path, fmt: str, **logic: Any) -> Setup:
    directory = tmp_path / "detector"
    directory.mkdir(exist_ok=True)
    generator = Generator()
    log: list[Written] = []
    provider = StaticPathProvider(UUIDFilenameProvider(), PurePath(directory))
    data_logic = FrameFilesDataLogic(provider, generator, fmt, log, **logic)
    with init_devices():
        stage = sim.SimStage(generator)
        det = FileSeriesDetector(data_logic)
    RE(bps.mv(stage.x.velocity, 0, stage.y.velocity, 0))
    return Setup(stage, det, log)


def with_frames_per_point(plan: Any, det: Any, frames: int) -> Any:
    """``plan`` with ``det`` prepared, once staged, to take ``frames`` frames
    at each point (ophyd-async's ``collections_per_event``)."""

    def after_stage(msg: Any) -> tuple[Any, None]:
        if msg.command == "stage" and msg.obj is det:

            def staged_then_prepared() -> Any:
                result = yield msg
                yield from bps.prepare(det, TriggerInfo(collections_per_event=frames), wait=True)
                return result

            return staged_then_prepared(), None
        return None, None  # type: ignore[return-value]

    return bpp.plan_mutator(plan, after_stage)


def decoded(fmt: str, written: Written) -> np.ndarray:
    """The frame as a reader of the file gets it back (JPEG is lossy)."""
    if fmt == "jpeg":
        with Image.open(written.where) as image:
            return np.asarray(image)
    return written.frame


def frames_at(log: list[Written], fmt: str, x: float, y: float) -> np.ndarray:
    here = [w for w in log if w.x == pytest.approx(x) and w.y == pytest.approx(y)]
    return np.stack([decoded(fmt, w) for w in here])


def check_grid(ds: Any, setup: Setup, fmt: str, frames: int) -> int:
    """Each point of the stage grid holds the frames taken there."""
    checked = 0
    for point in iter_points(ds, ["stage-x", "stage-y"]):
        x = float(ds["stage-x"][point["stage-x"]])
        y = float(ds["stage-y"][point["stage-y"]])
        expected = frames_at(setup.log, fmt, x, y)
        assert len(expected) == frames
        actual = ds["det"].isel(point).values
        np.testing.assert_array_equal(
            actual, expected[0] if frames == 1 else expected, err_msg=f"point {point}"
        )
        checked += 1
    return checked


# ---------------------------------------------------------------- the tests
@pytest.fixture(autouse=True)
def time_limit() -> Any:
    """No test here may hang: each is stopped after two minutes."""

    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError("the test took more than 120 s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("fmt", ["tiff", "jpeg", "npy", "zarr"])
@pytest.mark.parametrize("snake", [False, True])
def test_grid_scan_puts_each_frame_at_its_point(RE, tmp_path, fmt, snake):
    setup = make_setup(RE, tmp_path, fmt)
    docs = record(RE)
    writer = ZarrWriter(tmp_path / "data")
    RE.subscribe(writer)
    RE(grid_scan([setup.det], setup.stage.x, -1, 1, 3, setup.stage.y, 0, 3, 4, snake_axes=snake))

    (sres,) = by_kind(docs, "stream_resource")
    assert sres["mimetype"] == MIMETYPES[fmt]
    assert sres["parameters"]["chunk_shape"] == (1, HEIGHT, WIDTH)
    if fmt != "zarr":
        assert sres["uri"].endswith("/")
        assert sres["parameters"]["template"].endswith("_{:06d}" + EXTENSIONS[fmt])
    ds = open_stream(writer.stores[0])
    assert ds["det"].dims == ("stage-x", "stage-y", "y", "x")
    assert ds["det"].dtype == np.dtype(DTYPES[fmt])
    assert bool(ds["_written"].all())
    assert len(setup.log) == 12
    assert len({w.frame.tobytes() for w in setup.log}) == 12, "frames should all differ"
    assert check_grid(ds, setup, fmt, 1) == 12
    if snake:
        # The second row was taken backwards; the store undoes it.
        assert ds["seq_num"].values[1].tolist() == [8, 7, 6, 5]
    if fmt == "jpeg":
        # What Pillow decodes is close to what the detector encoded.
        error = [np.abs(decoded(fmt, w).astype(int) - w.frame).mean() for w in setup.log]
        assert max(error) < 4
    assert ds.attrs["external"]["stream_resource"][0]["mimetype"] == MIMETYPES[fmt]


@pytest.mark.parametrize(
    ("fmt", "chunk_shape"),
    [
        ("tiff", (1, HEIGHT, WIDTH)),
        ("npy", (1, HEIGHT, WIDTH)),
        ("zarr", (1, HEIGHT, WIDTH)),
        ("tiff", (0, HEIGHT, WIDTH)),
    ],
)
def test_several_frames_per_point_of_a_snaked_grid(RE, tmp_path, fmt, chunk_shape):
    setup = make_setup(RE, tmp_path, fmt, chunk_shape=chunk_shape)
    docs = record(RE)
    writer = ZarrWriter(tmp_path / "data")
    RE.subscribe(writer)
    stage = setup.stage
    RE(
        with_frames_per_point(
            grid_scan([setup.det], stage.x, -1, 1, 2, stage.y, 0, 2, 3, snake_axes=True),
            setup.det,
            3,
        )
    )
    (descriptor,) = by_kind(docs, "descriptor")
    assert descriptor["data_keys"]["det"]["shape"] == [3, HEIGHT, WIDTH]
    ds = open_stream(writer.stores[0])
    assert ds["det"].dims == ("stage-x", "stage-y", "frame", "y", "x")
    assert bool(ds["_written"].all())
    assert len(setup.log) == 18
    assert check_grid(ds, setup, fmt, 3) == 6
    if fmt != "zarr":
        # One file per frame: event i is files 3i, 3i+1, 3i+2.
        (datum,) = [d for d in by_kind(docs, "stream_datum") if d["seq_nums"]["start"] == 5]
        assert datum["indices"] == {"start": 4, "stop": 5}
        first = setup.log[12].where
        assert first.endswith(f"_{12:06d}.tiff" if fmt == "tiff" else f"_{12:06d}.npy")
        point = dict(zip(["stage-x", "stage-y"], np.argwhere(ds["seq_num"].values == 5)[0]))
        np.testing.assert_array_equal(ds["det"].isel(point).values[0], setup.log[12].frame)


@pytest.mark.parametrize("fmt", ["tiff", "zarr"])
def test_fly_scan_reads_many_events_in_batches(RE, tmp_path, monkeypatch, fmt):
    # Two events a read: a stream_datum of many events takes several.
    batch = 2 * 2 * HEIGHT * WIDTH * 2
    monkeypatch.setattr(bluesky_zarr.external._data, "READ_BATCH_BYTES", batch)
    positions = itertools.count(0.0, 0.37)
    setup = make_setup(RE, tmp_path, fmt)
    generator = setup.det._data_logics[0].generator  # type: ignore[attr-defined]

    async def moving(seconds: float) -> None:
        generator.set_x(next(positions))
        await asyncio.sleep(0.002)

    generator.sleep = moving
    docs = record(RE)
    writer = ZarrWriter(tmp_path / "data")
    RE.subscribe(writer)
    RE(fly(setup.det, 12, 2, **FAST))
    spans = [d["indices"]["stop"] - d["indices"]["start"] for d in by_kind(docs, "stream_datum")]
    assert sum(spans) == 12
    ds = open_stream(writer.stores[0])
    assert ds["det"].dims == ("time", "frame", "y", "x")
    expected = np.stack([w.frame for w in setup.log]).reshape(12, 2, HEIGHT, WIDTH)
    np.testing.assert_array_equal(ds["det"].values, expected)
    np.testing.assert_array_equal(ds["seq_num"], np.arange(1, 13))
    assert bool(ds["_written"].all())


def step_docs(
    RE: Any, tmp_path: Path, fmt: str, points: int = 4, **logic: Any
) -> tuple[Docs, Setup]:
    setup = make_setup(RE, tmp_path, fmt, **logic)
    docs = record(RE)
    stage = setup.stage
    RE(grid_scan([setup.det], stage.x, 0, 3, points))
    return docs, setup


def replay(writer: ZarrWriter, docs: Docs) -> None:
    for name, doc in docs:
        writer(name, doc)
        if name == "stream_datum":
            writer.flush()  # the frames are read (or failed) by now


@pytest.mark.parametrize("fmt", ["hdf5", "tiff"])
def test_a_first_stream_resource_with_a_zero_chunk_size_is_read(RE, tmp_path, fmt):
    if fmt == "hdf5":
        with init_devices():
            stage = sim.SimStage(sim.PatternGenerator(sleep=quick_sleep))
        directory = tmp_path / "detector"
        directory.mkdir()
        provider = StaticPathProvider(UUIDFilenameProvider(), PurePath(directory))
        with init_devices():
            det = sim.SimBlobDetector(provider, sim.PatternGenerator(sleep=quick_sleep))
        RE(bps.mv(stage.x.velocity, 0))
        docs = record(RE)
        RE(grid_scan([det], stage.x, 0, 2, 3))
        key = "det"
    else:
        docs, setup = step_docs(RE, tmp_path, "tiff", points=3)
        key = "det"
    # The detector did not know its frame size when it described its first file.
    first = next(doc for name, doc in docs if name == "stream_resource" and doc["data_key"] == key)
    first["parameters"]["chunk_shape"] = [0, 0, 0]
    writer = ZarrWriter(tmp_path / "data")
    replay(writer, docs)
    ds = open_stream(writer.stores[0])
    assert bool(ds["_written"].all())
    if fmt == "hdf5":
        import h5py

        with h5py.File(urlparse(first["uri"]).path, "r") as file:
            rows = file[first["parameters"]["dataset"]][()]
        np.testing.assert_array_equal(ds["det"].values, rows)
    else:
        np.testing.assert_array_equal(ds["det"].values, np.stack([w.frame for w in setup.log]))


def test_multipage_tiffs_joined_by_concat(RE, tmp_path):
    """Files of two frames each (``chunk_shape[0]``), events of four frames
    joined along the declared leading dimension."""
    setup = make_setup(RE, tmp_path, "tiff")
    docs = record(RE)
    RE(fly(setup.det, 3, 4, **FAST))
    (sres,) = by_kind(docs, "stream_resource")
    directory = Path(urlparse(sres["uri"]).path)
    frames = np.stack([w.frame for w in setup.log])
    assert frames.shape == (12, HEIGHT, WIDTH)
    for n in range(6):
        tifffile.imwrite(directory / f"pairs-{n:03d}.tif", frames[2 * n : 2 * n + 2])
    sres["parameters"].update(template="pairs-{:03d}.tif", chunk_shape=[2], join_method="concat")
    writer = ZarrWriter(tmp_path / "data")
    replay(writer, docs)
    ds = open_stream(writer.stores[0])
    assert ds["det"].dims == ("time", "frame", "y", "x")
    np.testing.assert_array_equal(ds["det"].values, frames.reshape(3, 4, HEIGHT, WIDTH))
    assert bool(ds["_written"].all())


def test_zarr_rows_joined_by_concat(RE, tmp_path):
    setup = make_setup(RE, tmp_path, "zarr")
    docs = record(RE)
    RE(fly(setup.det, 4, 3, **FAST))
    for doc in by_kind(docs, "stream_resource"):
        doc["parameters"]["join_method"] = "concat"
    writer = ZarrWriter(tmp_path / "data")
    replay(writer, docs)
    ds = open_stream(writer.stores[0])
    frames = np.stack([w.frame for w in setup.log]).reshape(4, 3, HEIGHT, WIDTH)
    np.testing.assert_array_equal(ds["det"].values, frames)


def test_unknown_join_method_is_refused(RE, tmp_path):
    docs, _ = step_docs(RE, tmp_path, "tiff", points=2)
    for doc in by_kind(docs, "stream_resource"):
        doc["parameters"]["join_method"] = "interleave"
    writer = ZarrWriter(tmp_path / "data")
    with pytest.raises(DocumentError, match="join_method"):
        replay(writer, docs)


@pytest.mark.parametrize("fmt", ["tiff", "jpeg", "npy"])
def test_a_missing_file_raises_naming_it_and_earlier_points_stay(RE, tmp_path, fmt):
    docs, setup = step_docs(RE, tmp_path, fmt)
    gone = setup.log[2].where
    Path(gone).unlink()
    writer = ZarrWriter(tmp_path / "data")
    with pytest.raises(ExternalFileError, match=Path(gone).name) as info:
        replay(writer, docs)
    assert isinstance(info.value, OSError)
    writer("stop", by_kind(docs, "stop")[0])
    ds = open_stream(writer.stores[0])
    assert ds["_written"].values.tolist() == [True, True, False, False]
    for i in range(2):
        np.testing.assert_array_equal(ds["det"].values[i], decoded(fmt, setup.log[i]))


def test_a_missing_file_inside_an_event_is_raised_from_the_reader_thread(RE, tmp_path):
    setup = make_setup(RE, tmp_path, "tiff")
    docs = record(RE)
    RE(fly(setup.det, 4, 3, **FAST))
    gone = setup.log[7].where  # the middle frame of event 2
    Path(gone).unlink()
    writer = ZarrWriter(tmp_path / "data")
    with pytest.raises(ExternalFileError, match=Path(gone).name):
        replay(writer, docs)
        writer("stop", by_kind(docs, "stop")[0])


def test_a_missing_zarr_store_raises_naming_it(RE, tmp_path):
    docs, _ = step_docs(RE, tmp_path, "zarr", points=2)
    (sres,) = by_kind(docs, "stream_resource")
    sres["uri"] = sres["uri"].replace(".zarr", "-moved.zarr")
    writer = ZarrWriter(tmp_path / "data")
    with pytest.raises(ExternalFileError, match="-moved.zarr"):
        replay(writer, docs)


def test_unknown_mimetype_raises_unknown_spec_error_or_is_referenced(RE, tmp_path):
    docs, _ = step_docs(RE, tmp_path, "tiff", points=2)
    for doc in by_kind(docs, "stream_resource"):
        doc["mimetype"] = "multipart/related;type=image/x-exotic"
    writer = ZarrWriter(tmp_path / "data")
    with pytest.raises(UnknownSpecError, match="image/x-exotic") as info:
        replay(writer, docs)
    assert "multipart/related;type=image/tiff" in str(info.value)
    writer = ZarrWriter(tmp_path / "data2", external="reference")
    replay(writer, docs)
    ds = open_stream(writer.stores[0])
    assert not bool(ds["_written"].any())
    assert ds.attrs["external"]["stream_resource"][0]["mimetype"].endswith("x-exotic")


@pytest.mark.parametrize(
    ("fmt", "module", "extra"), [("tiff", "tifffile", "formats"), ("jpeg", "PIL", "formats")]
)
def test_a_missing_reader_library_names_the_extra(RE, tmp_path, monkeypatch, fmt, module, extra):
    docs, _ = step_docs(RE, tmp_path, fmt, points=2)
    monkeypatch.setitem(sys.modules, module, None)  # import fails
    writer = ZarrWriter(tmp_path / "data")
    with pytest.raises(MissingDependencyError, match=rf"bluesky-zarr\[{extra}\]"):
        replay(writer, docs)


def test_a_template_without_a_file_number_is_refused(RE, tmp_path):
    docs, _ = step_docs(RE, tmp_path, "tiff", points=2)
    for doc in by_kind(docs, "stream_resource"):
        doc["parameters"]["template"] = "%s%s_%6.6d.tiff"
    with pytest.raises(DocumentError, match="template"):
        replay(ZarrWriter(tmp_path / "data"), docs)


def test_a_file_of_another_frame_size_raises_naming_it(RE, tmp_path):
    docs, setup = step_docs(RE, tmp_path, "tiff", points=3)
    wrong = setup.log[1].where
    tifffile.imwrite(wrong, np.zeros((HEIGHT, WIDTH + 1), "uint16"))
    writer = ZarrWriter(tmp_path / "data")
    with pytest.raises(DataShapeError, match=Path(wrong).name):
        replay(writer, docs)
    writer("stop", by_kind(docs, "stop")[0])
    assert open_stream(writer.stores[0])["_written"].values.tolist() == [True, False, False]


def test_colour_jpegs_fill_a_key_that_declares_colour_first(RE, tmp_path):
    """Pillow gives (height, width, bands); a data key may declare (bands,
    height, width), as ophyd-async does for an RGB camera."""
    docs, setup = step_docs(RE, tmp_path, "jpeg", points=2)
    colour = []
    for written in setup.log:
        rgb = np.stack([written.frame, written.frame // 2, 255 - written.frame], axis=-1)
        Image.fromarray(rgb).save(written.where, quality=95)
        with Image.open(written.where) as image:
            colour.append(np.moveaxis(np.asarray(image), -1, 0))
    (descriptor,) = by_kind(docs, "descriptor")
    descriptor["data_keys"]["det"]["shape"] = [1, 3, HEIGHT, WIDTH]
    for doc in by_kind(docs, "stream_resource"):
        doc["parameters"]["chunk_shape"] = [1, 3, HEIGHT, WIDTH]
    writer = ZarrWriter(tmp_path / "data")
    replay(writer, docs)
    ds = open_stream(writer.stores[0])
    assert ds["det"].shape == (2, 3, HEIGHT, WIDTH)
    np.testing.assert_array_equal(ds["det"].values, np.stack(colour))


@pytest.mark.parametrize("fmt", ["tiff", "jpeg", "npy"])
def test_a_corrupt_file_raises_naming_it(RE, tmp_path, fmt):
    docs, setup = step_docs(RE, tmp_path, fmt, points=3)
    corrupt = setup.log[1].where
    Path(corrupt).write_bytes(b"not an image at all" * 10)
    writer = ZarrWriter(tmp_path / "data")
    with pytest.raises(ExternalFileError, match=Path(corrupt).name):
        replay(writer, docs)


def test_a_zarr_uri_that_is_the_array_itself_needs_no_path(RE, tmp_path):
    docs, setup = step_docs(RE, tmp_path, "zarr", points=3)
    for doc in by_kind(docs, "stream_resource"):
        doc["uri"] = f"{doc['uri']}/{doc['parameters'].pop('path')}"
    writer = ZarrWriter(tmp_path / "data")
    replay(writer, docs)
    ds = open_stream(writer.stores[0])
    np.testing.assert_array_equal(ds["det"].values, np.stack([w.frame for w in setup.log]))
