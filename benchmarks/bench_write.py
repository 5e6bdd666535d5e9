"""Write throughput to return and to disk, callback latency, memory, bytes on disk.

One command, one process, one disk. Every case writes the same scan of
detector-like ``uint16`` frames (Poisson noise over a smooth pattern, visited
on a snaked grid) and is timed twice from its first document (or first byte):

- **return**: until the writer returns (after the stop document);
- **durable**: until its bytes are on disk, i.e. including an ``os.sync()``
  made right after it returns.

Document-fed cases get their documents made before the clock starts.
Each case starts with no dirty pages (``os.sync()`` before it). Cases are
interleaved, A B C A B C, over several rounds, because the disk and the page
cache of a shared machine change speed from minute to minute; the table shows
the best round, the spread over the rounds, and the ratio of each case's
durable rate to the raw write + fsync of the *same* round (median over the
rounds). Cases:

- raw sequential write of the same bytes to one file, without and with fsync
  (the baseline of every ratio);
- ZarrWriter fed documents directly: default codec (Blosc LZ4 bit-shuffle),
  uncompressed, and ``durable=True`` when the writer has that option;
- ZarrWriter subscribed to a real RunEngine scanning a simulated camera;
- tensorstore (``zarr3`` driver) in the layout ZarrWriter chose for the same
  frames (read from the ``zarr.json`` of a store ZarrWriter wrote in this
  process), one write per completed row, LZ4 and uncompressed;
- acquire-zarr, frames appended in visit order, shard = one row of the
  innermost dimension, chunk = one frame, LZ4 and uncompressed; it cannot
  undo snaking, so it is given the same grid unsnaked;
- suitcase-tiff (``tiff_series``), one TIFF file per frame;
- the naive way, ``arr[i, j] = frame`` per point (sharded and unsharded), and
  the after-the-fact way, the whole scan in xarray then ``to_zarr``: slow, so
  measured in the first round only.

Once per case and frame size, outside the timing, the output is read back
(zarr-python for every Zarr store, tifffile for TIFF) and compared with the
frames, so a fast but wrong case is caught; then the output is deleted.
A case whose package is not installed is skipped, saying so.

Usage::

    python benchmarks/bench_write.py          # 512x512 10x20, 2048x2048 6x20 (1 GB), 5 rounds
    python benchmarks/bench_write.py --quick  # small scans, one round
    python benchmarks/bench_write.py --sizes 2048 --gb 2 --rounds 5 --cases tensorstore raw
    python benchmarks/bench_write.py --json results.jsonl

Numbers from a shared machine are noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import importlib.util
import inspect
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr
from event_model import compose_run

from bluesky_zarr import ZarrWriter

MB = 1e6

#: Points along the innermost scan dimension (one row, one default shard).
INNER = 20
#: Rows of the outer scan dimension by frame size, when ``--gb`` is not given.
DEFAULT_ROWS = {512: 10, 2048: 6}
QUICK_ROWS = {512: 4, 2048: 1}
#: Distinct frames cycled through. 8 divides neither a row (20 points) nor the
#: distance between a point and its snaked mirror (always odd), so a frame put
#: at the wrong point, an unsnaking error or a swapped row fails verification.
POOL = 8


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- measurement helpers -----------------------------------------------------


def wchar() -> int:
    """Bytes this process (all its threads) has passed to write() so far (Linux)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    return 0


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_freed_memory() -> None:
    """Hand the memory freed by earlier cases back to the system (glibc), so that
    a case's growth in resident memory is not hidden by pages left mapped."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Samples the resident set size in a thread; ``peak`` is above the start."""

    def __init__(self) -> None:
        self.base = rss()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss() - self.base)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss() - self.base)


def bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- the scan ------------------------------------------------------------------


@dataclass
class Scan:
    """A grid of ``shape`` points visited row by row (odd rows reversed when
    ``snaking``), each measuring one frame of ``frame`` pixels."""

    shape: tuple[int, int]
    frame: tuple[int, int]
    pool: list[np.ndarray]
    snaking: bool = True

    @property
    def n(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def frame_bytes(self) -> int:
        return self.pool[0].nbytes

    @property
    def nbytes(self) -> int:
        return self.n * self.frame_bytes

    def frame_at(self, k: int) -> np.ndarray:
        """The frame measured at the ``k``-th visited point."""
        return self.pool[k % len(self.pool)]

    def point(self, k: int) -> tuple[int, int]:
        """Grid index of the ``k``-th visited point."""
        i, j = divmod(k, self.shape[1])
        if self.snaking and i % 2:
            j = self.shape[1] - 1 - j
        return i, j

    def visit(self, i: int, j: int) -> int:
        """Visit number of grid point ``(i, j)``: the inverse of :meth:`point`."""
        if self.snaking and i % 2:
            j = self.shape[1] - 1 - j
        return i * self.shape[1] + j

    def unsnaked(self) -> Scan:
        return dataclasses.replace(self, snaking=False)


def make_scan(size: int, rows: int) -> Scan:
    rng = np.random.default_rng(0)
    yy, xx = np.indices((size, size))
    pattern = 200 + 800 * np.exp(-((yy - size / 2) ** 2 + (xx - size / 3) ** 2) / (size**2 / 20))
    pool = [rng.poisson(pattern).astype("uint16") for _ in range(POOL)]
    return Scan((rows, INNER), (size, size), pool)


def scan_documents(scan: Scan, frame: tuple[int, ...] | None = None) -> tuple[Any, Any]:
    """Composers of the run and of its primary stream, as a grid_scan makes them."""
    run = compose_run(
        metadata={
            "plan_name": "grid_scan",
            "shape": list(scan.shape),
            "extents": [[0, scan.shape[0] - 1], [0, scan.shape[1] - 1]],
            "snaking": [False, scan.snaking],
            "motors": ["wavelength", "position"],
            "num_points": scan.n,
            "hints": {"dimensions": [[["wavelength"], "primary"], [["position"], "primary"]]},
            "scan_id": 1,
        }
    )
    data_keys = {
        "cam_image": {
            "dtype": "array",
            "shape": list(frame or scan.frame),
            "dtype_numpy": "<u2",
            "source": "bench",
        },
        "wavelength": {"dtype": "number", "shape": [], "source": "bench"},
        "position": {"dtype": "number", "shape": [], "source": "bench"},
    }
    descriptor = run.compose_descriptor(name="primary", data_keys=data_keys)
    return run, descriptor


Documents = list[tuple[str, dict[str, Any]]]


def compose(scan: Scan) -> Documents:
    """The scan's documents, made before a case's clock starts (every
    document-fed case is timed on what it does with them, not on event-model
    composing and validating them; the frames are shared, not copied)."""
    run, descriptor = scan_documents(scan)
    documents: Documents = [("start", run.start_doc), ("descriptor", descriptor.descriptor_doc)]
    for k in range(scan.n):
        i, j = scan.point(k)
        event = descriptor.compose_event(
            data={"cam_image": scan.frame_at(k), "wavelength": float(i), "position": float(j)},
            timestamps={"cam_image": 0.0, "wavelength": 0.0, "position": 0.0},
            seq_num=k + 1,
        )
        documents.append(("event", event))
    documents.append(("stop", run.compose_stop()))
    return documents


def feed(documents: Documents, callback: Callable[[str, dict[str, Any]], Any]) -> list[float]:
    """Send the documents to ``callback``; return each event's call time."""
    seconds = []
    for name, doc in documents:
        if name == "event":
            c0 = time.perf_counter()
            callback(name, doc)
            seconds.append(time.perf_counter() - c0)
        else:
            callback(name, doc)
    return seconds


# --- what a case returns, and how its output is checked ----------------------


@dataclass
class Written:
    """What one run of a case produced, for the figures and the read-back."""

    callback: list[float] = field(default_factory=list)
    bound: int | None = None
    #: How to read the output back: ("zarr", array path) / ("tiff", directory)
    #: / ("raw", file); and the scan (its snaking) the output follows.
    output: tuple[str, Path] | None = None
    scan: Scan | None = None
    #: Frames written, when a case writes only the first ones.
    frames: int | None = None
    #: Extra checks after the read-back, raising AssertionError when wrong.
    check: Callable[[], None] | None = None


def verify(written: Written) -> None:
    """Read the output back and compare it with the frames; AssertionError if not equal."""
    assert written.output is not None and written.scan is not None
    kind, path = written.output
    scan = written.scan
    n = written.frames or scan.n
    if kind == "raw":
        data = np.fromfile(path, dtype="uint16")
        assert data.size == n * scan.frame_bytes // 2, f"{data.size} values in {path.name}"
        frames = data.reshape((n,) + scan.frame)
        for k in range(n):
            assert np.array_equal(frames[k], scan.frame_at(k)), f"frame {k} differs"
    elif kind == "zarr":
        array = zarr.open_array(path, mode="r")
        expected_shape = scan.shape + scan.frame
        assert array.shape == expected_shape, f"shape {array.shape} != {expected_shape}"
        rows = math.ceil(n / scan.shape[1])
        for i in range(rows):
            row = array[i]
            for j in range(scan.shape[1]):
                k = scan.visit(i, j)
                if k < n:
                    assert np.array_equal(row[j], scan.frame_at(k)), f"point {(i, j)} differs"
    elif kind == "tiff":
        import tifffile

        files = sorted(path.rglob("*.tif*"))
        assert len(files) == n, f"{len(files)} TIFF files for {n} frames"
        for k, file in enumerate(files):  # named by frame number, zero-padded
            assert np.array_equal(tifffile.imread(file), scan.frame_at(k)), f"{file.name} differs"
    else:
        raise ValueError(kind)
    if written.check is not None:
        written.check()


# --- cases -----------------------------------------------------------------------
#
# A case is ``prepare(scan, directory) -> go``: ``prepare`` does what a session
# does once (make the writer, the RunEngine), ``go()`` is timed.

Go = Callable[[], Written]


def raw_case(fsync: bool) -> Callable[[Scan, Path], Go]:
    def prepare(scan: Scan, directory: Path) -> Go:
        path = directory / "raw.bin"

        def go() -> Written:
            with open(path, "wb") as f:
                for k in range(scan.n):
                    f.write(memoryview(scan.frame_at(k)).cast("B"))
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
            return Written(output=("raw", path), scan=scan)

        return go

    return prepare


def zarr_writer_store_check(store: Path, scan: Scan) -> Callable[[], None]:
    def check() -> None:
        written = zarr.open_array(store / "primary" / "_written", mode="r")[...]
        assert written.shape == scan.shape and written.all(), "_written is not all True"

    return check


def zarr_writer_written(writer: ZarrWriter, scan: Scan, callback: list[float]) -> Written:
    """What a ZarrWriter case wrote: its store's frames, checked afterwards."""
    store = Path(writer.stores[0])
    return Written(
        callback,
        writer.options.max_buffer_bytes,
        ("zarr", store / "primary" / "cam_image"),
        scan,
        check=zarr_writer_store_check(store, scan),
    )


def zarr_writer_case(**options: Any) -> Callable[[Scan, Path], Go]:
    def prepare(scan: Scan, directory: Path) -> Go:
        writer = ZarrWriter(directory, **options)
        documents = compose(scan)

        def go() -> Written:
            callback = feed(documents, writer)
            return zarr_writer_written(writer, scan, callback)

        return go

    return prepare


def run_engine_case(subscribed: bool = True, **options: Any) -> Callable[[Scan, Path], Go]:
    """ZarrWriter subscribed to a real RunEngine: a snaked grid_scan of a simulated camera
    (``subscribed=False``: the same scan with no writer, the time the writer adds to)."""

    def prepare(scan: Scan, directory: Path) -> Go:
        from bluesky import RunEngine
        from bluesky.plans import grid_scan
        from ophyd.sim import SynAxis, SynSignal

        wavelength, position = SynAxis(name="wavelength"), SynAxis(name="position")

        def frame() -> np.ndarray:
            # The frame of the point the motors stand at.
            i = round(wavelength.readback.get())
            j = round(position.readback.get())
            return scan.frame_at(scan.visit(i, j))

        class Camera(SynSignal):
            def describe(self) -> dict[str, Any]:
                description = super().describe()
                description[self.name].update(dtype_numpy="<u2", shape=list(scan.frame))
                return description

            def __repr__(self) -> str:
                # The default repr shows the current frame, and the RunEngine
                # copies it into the start document's plan_args.
                return f"Camera(name={self.name!r})"

        cam = Camera(func=frame, name="cam_image")
        writer = ZarrWriter(directory, **options) if subscribed else None
        callback: list[float] = []

        def timed(name: str, doc: dict[str, Any]) -> None:
            c0 = time.perf_counter()
            writer(name, doc)
            if name == "event":
                callback.append(time.perf_counter() - c0)

        RE = RunEngine({})
        if writer is not None:
            RE.subscribe(timed)
        rows, inner = scan.shape

        def go() -> Written:
            RE(
                grid_scan(
                    [cam],
                    wavelength,
                    0,
                    rows - 1,
                    rows,
                    position,
                    0,
                    inner - 1,
                    inner,
                    snake_axes=True,
                )
            )
            if writer is None:
                return Written(frames=scan.n, scan=scan)
            return zarr_writer_written(writer, scan, callback)

        return go

    return prepare


def writer_layout(scan: Scan, directory: Path, **options: Any) -> dict[str, Any]:
    """The metadata of the array ZarrWriter makes for this scan's frames.

    A run with no events: the arrays are created, sized and laid out at the
    descriptor, so its ``zarr.json`` is the layout of a full run.
    """
    writer = ZarrWriter(directory, flush_interval=None, **options)
    run, descriptor = scan_documents(scan)
    writer("start", run.start_doc)
    writer("descriptor", descriptor.descriptor_doc)
    writer("stop", run.compose_stop())
    meta_path = Path(writer.stores[0]) / "primary" / "cam_image" / "zarr.json"
    return json.loads(meta_path.read_text())


class TensorStoreCallback:
    """Documents to a tensorstore zarr3 array: one asynchronous write per completed row.

    Frames are copied into a row buffer at their unsnaked place; when the row
    is complete, ``array[i, 0:n] = row`` is issued without waiting, and the
    buffer is reused only once tensorstore has copied it (two buffers
    alternate). The stop document waits until every write is committed.
    """

    def __init__(self, path: Path, metadata: dict[str, Any], scan: Scan) -> None:
        self.path = path
        self.metadata = {
            k: metadata[k]
            for k in (
                "shape",
                "data_type",
                "chunk_grid",
                "chunk_key_encoding",
                "fill_value",
                "codecs",
                "dimension_names",
            )
            if k in metadata
        }
        self.scan = scan
        self.array: Any = None
        self.buffers = [np.empty((scan.shape[1],) + scan.frame, "uint16") for _ in range(2)]
        self.copied: list[Any] = [None, None]
        self.commits: list[Any] = []
        self.filled = 0
        self.row = 0

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        import tensorstore as ts

        if name == "descriptor":
            self.array = ts.open(
                {
                    "driver": "zarr3",
                    "kvstore": {"driver": "file", "path": str(self.path)},
                    "metadata": self.metadata,
                },
                create=True,
            ).result()
        elif name == "event":
            i, j = self.scan.point(doc["seq_num"] - 1)
            buffer = self.buffers[i % 2]
            if self.filled == 0 and self.copied[i % 2] is not None:
                self.copied[i % 2].result()  # tensorstore has its own copy
            buffer[j] = doc["data"]["cam_image"]
            self.filled += 1
            if self.filled == self.scan.shape[1]:
                future = self.array[i, 0 : self.scan.shape[1]].write(buffer)
                self.copied[i % 2] = future.copy
                self.commits.append(future.commit)
                self.filled = 0
        elif name == "stop":
            for commit in self.commits:
                commit.result()


def tensorstore_case(compressed: bool) -> Callable[[Scan, Path], Go]:
    def prepare(scan: Scan, directory: Path) -> Go:
        metadata = LAYOUTS[(scan.frame, compressed)]
        path = directory / "tensorstore.zarr"
        documents = compose(scan)

        def go() -> Written:
            callback = feed(documents, TensorStoreCallback(path, metadata, scan))
            return Written(callback, None, ("zarr", path), scan)

        return go

    return prepare


class AcquireZarrCallback:
    """Documents to acquire-zarr: each frame appended as it arrives, in visit order."""

    def __init__(self, path: Path, scan: Scan, compressed: bool) -> None:
        import acquire_zarr as az

        rows, inner = scan.shape
        y, x = scan.frame
        dimensions = [
            az.Dimension(
                name="wavelength",
                kind=az.DimensionType.OTHER,
                array_size_px=rows,
                chunk_size_px=1,
                shard_size_chunks=1,
            ),
            az.Dimension(
                name="position",
                kind=az.DimensionType.OTHER,
                array_size_px=inner,
                chunk_size_px=1,
                shard_size_chunks=inner,
            ),
            az.Dimension(
                name="y",
                kind=az.DimensionType.SPACE,
                array_size_px=y,
                chunk_size_px=y,
                shard_size_chunks=1,
            ),
            az.Dimension(
                name="x",
                kind=az.DimensionType.SPACE,
                array_size_px=x,
                chunk_size_px=x,
                shard_size_chunks=1,
            ),
        ]
        compression = None
        if compressed:
            compression = az.CompressionSettings(
                compressor=az.Compressor.BLOSC1,
                codec=az.CompressionCodec.BLOSC_LZ4,
                level=5,
                shuffle=2,  # 2: bit-shuffle
            )
        self.settings = az.StreamSettings(
            store_path=str(path),
            arrays=[
                az.ArraySettings(
                    dimensions=dimensions, data_type=az.DataType.UINT16, compression=compression
                )
            ],
        )
        self.stream: Any = None

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        import acquire_zarr as az

        if name == "descriptor":
            self.stream = az.ZarrStream(self.settings)
        elif name == "event":
            self.stream.append(doc["data"]["cam_image"])
        elif name == "stop":
            self.stream.close()


def acquire_zarr_case(compressed: bool) -> Callable[[Scan, Path], Go]:
    def prepare(scan: Scan, directory: Path) -> Go:
        path = directory / "acquire.zarr"
        unsnaked = scan.unsnaked()
        documents = compose(unsnaked)

        def go() -> Written:
            writer = AcquireZarrCallback(path, unsnaked, compressed)
            callback = feed(documents, writer)
            return Written(
                callback, writer.settings.get_maximum_memory_usage(), ("zarr", path), unsnaked
            )

        return go

    return prepare


def suitcase_tiff_case(scan: Scan, directory: Path) -> Go:
    from suitcase.tiff_series import Serializer

    documents = compose(scan)

    def go() -> Written:
        with Serializer(str(directory / "tiff"), file_prefix="scan-") as serializer:
            callback = feed(documents, serializer)
        return Written(callback, None, ("tiff", directory / "tiff"), scan)

    return go


def naive_case(sharded: bool) -> Callable[[Scan, Path], Go]:
    """``arr[i, j] = frame`` per point, uncompressed, chunk = one frame.

    Into row shards, every frame rewrites its whole shard: this case writes
    only the first rows (at least one, at most 100 frames or about 1 GB of
    shard rewrites) and reports the rate over them.
    """

    def prepare(scan: Scan, directory: Path) -> Go:
        path = directory / "naive.zarr"
        n = scan.n
        if sharded:
            rewrite = scan.frame_bytes * scan.shape[1] / 2  # mean shard rewritten per frame
            n = max(scan.shape[1], min(n, 100, int(1e9 / rewrite)))
            n = math.ceil(n / scan.shape[1]) * scan.shape[1]

        def go() -> Written:
            array = zarr.create_array(
                path,
                shape=scan.shape + scan.frame,
                dtype="uint16",
                chunks=(1, 1) + scan.frame,
                shards=(1, scan.shape[1]) + scan.frame if sharded else None,
                compressors=None,
                fill_value=0,
                config={"write_empty_chunks": True},
            )
            callback = []
            for k in range(n):
                c0 = time.perf_counter()
                array[scan.point(k)] = scan.frame_at(k)
                callback.append(time.perf_counter() - c0)
            return Written(callback, None, ("zarr", path), scan, frames=n)

        return go

    return prepare


def xarray_case(scan: Scan, directory: Path) -> Go:
    """The whole scan in memory as an xarray Dataset, then ``to_zarr``."""
    path = directory / "after.zarr"

    def go() -> Written:
        cube = np.empty(scan.shape + scan.frame, "uint16")
        for k in range(scan.n):
            cube[scan.point(k)] = scan.frame_at(k)
        ds = xr.Dataset(
            {"cam_image": (("wavelength", "position", "y", "x"), cube)},
            coords={"wavelength": np.arange(scan.shape[0]), "position": np.arange(scan.shape[1])},
        )
        with warnings.catch_warnings():
            # "Consolidated metadata is not part of the Zarr format 3 specification"
            warnings.simplefilter("ignore", UserWarning)
            ds.to_zarr(
                path,
                zarr_format=3,
                consolidated=True,
                encoding={"cam_image": {"chunks": (1, 1) + scan.frame, "compressors": None}},
            )
        return Written(output=("zarr", path / "cam_image"), scan=scan)

    return go


#: ZarrWriter's array metadata by (frame shape, compressed), read per size.
LAYOUTS: dict[tuple[tuple[int, int], bool], dict[str, Any]] = {}

DURABLE = "durable" in inspect.signature(ZarrWriter).parameters


@dataclass
class Case:
    name: str
    prepare: Callable[[Scan, Path], Go]
    #: Run in every round (False: the first only, for slow cases).
    every_round: bool = True
    #: Packages it needs (a missing one skips the case).
    needs: tuple[str, ...] = ()
    #: Why it cannot run here, if it cannot.
    unsupported: str | None = None
    #: Goes through a document callback (so its callback times mean something).
    callback: bool = True

    def skip_reason(self) -> str | None:
        if self.unsupported:
            return self.unsupported
        for package in self.needs:
            if not installed(package):
                return f"{package} is not installed"
        return None


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package
        return False


RAW_FSYNC = "raw write + fsync"

#: The RunEngine's scan without and with the writer: the time the writer adds.
RE_ALONE = "RunEngine alone (no writer subscribed)"
RE_WRITER = "ZarrWriter + RunEngine, default (LZ4)"

CASES = [
    Case("raw write", raw_case(fsync=False), callback=False),
    Case(RAW_FSYNC, raw_case(fsync=True), callback=False),
    Case("ZarrWriter, default (LZ4)", zarr_writer_case()),
    Case("ZarrWriter, uncompressed", zarr_writer_case(compressors=None)),
    Case(
        "ZarrWriter, durable=True (LZ4)",
        zarr_writer_case(durable=True) if DURABLE else zarr_writer_case(),
        unsupported=None if DURABLE else "ZarrWriter has no durable= keyword",
    ),
    Case(RE_ALONE, run_engine_case(subscribed=False), callback=False),
    Case(RE_WRITER, run_engine_case()),
    Case(
        "tensorstore, LZ4 (fsync per file, its default)",
        tensorstore_case(True),
        needs=("tensorstore",),
    ),
    Case(
        "tensorstore, uncompressed (fsync per file)",
        tensorstore_case(False),
        needs=("tensorstore",),
    ),
    Case("acquire-zarr, LZ4 (grid unsnaked)", acquire_zarr_case(True), needs=("acquire_zarr",)),
    Case(
        "acquire-zarr, uncompressed (grid unsnaked)",
        acquire_zarr_case(False),
        needs=("acquire_zarr",),
    ),
    Case("suitcase-tiff series", suitcase_tiff_case, needs=("suitcase.tiff_series", "tifffile")),
    Case(
        "naive arr[i, j] = frame, sharded (first rows)",
        naive_case(sharded=True),
        every_round=False,
    ),
    Case("naive arr[i, j] = frame, unsharded", naive_case(sharded=False), every_round=False),
    Case("whole scan in xarray, then to_zarr", xarray_case, every_round=False, callback=False),
]


# --- running ---------------------------------------------------------------------


@dataclass
class Measure:
    round: int
    nbytes: int
    return_s: float
    durable_s: float
    callback: list[float]
    peak: int
    bound: int | None
    on_disk: int
    written: int

    @property
    def return_mbps(self) -> float:
        return self.nbytes / self.return_s / MB

    @property
    def durable_mbps(self) -> float:
        return self.nbytes / self.durable_s / MB


@dataclass
class CaseResult:
    case: Case
    measures: list[Measure] = field(default_factory=list)
    error: str | None = None
    verified: bool | None = None


def run_once(case: Case, scan: Scan, workdir: Path, round_: int, check: bool) -> Measure:
    directory = Path(tempfile.mkdtemp(dir=workdir))
    try:
        go = case.prepare(scan, directory)
        gc.collect()
        release_freed_memory()
        os.sync()  # no dirty pages of earlier cases left to flush
        written0 = wchar()
        with PeakRSS() as memory:
            t0 = time.perf_counter()
            written = go()
            t_return = time.perf_counter()
            os.sync()
            t_durable = time.perf_counter()
        measure = Measure(
            round_,
            (written.frames or scan.n) * scan.frame_bytes,
            t_return - t0,
            t_durable - t0,
            written.callback,
            memory.peak,
            written.bound,
            bytes_under(directory),
            wchar() - written0,
        )
        if check and written.output is not None:
            verify(written)
        return measure
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def fixed_cost(workdir: Path, runs: int = 20, **options: Any) -> list[float]:
    """Seconds per run of start + descriptor + two tiny frames + stop, one
    writer (the documents are made before the clock starts)."""
    directory = Path(tempfile.mkdtemp(dir=workdir))
    try:
        tiny = Scan((1, 2), (4, 4), [np.full((4, 4), k, "uint16") for k in range(2)], False)
        writer = ZarrWriter(directory, **options)
        seconds = []
        for _ in range(runs):
            documents = compose(tiny)
            t0 = time.perf_counter()
            for name, doc in documents:
                writer(name, doc)
            seconds.append(time.perf_counter() - t0)
        return seconds
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def bench_size(
    scan: Scan, workdir: Path, cases: list[Case], rounds: int
) -> tuple[list[CaseResult], dict[str, str]]:
    skipped = {}
    runnable = []
    for case in cases:
        reason = case.skip_reason()
        if reason:
            skipped[case.name] = reason
            log(f"  skipped {case.name}: {reason}")
        else:
            runnable.append(case)
    layout_dir = Path(tempfile.mkdtemp(dir=workdir))
    try:
        for compressed in (True, False):
            options = {} if compressed else {"compressors": None}
            LAYOUTS[(scan.frame, compressed)] = writer_layout(
                scan, layout_dir / str(compressed), **options
            )
    finally:
        shutil.rmtree(layout_dir, ignore_errors=True)
    results = {case.name: CaseResult(case) for case in runnable}
    for round_ in range(rounds):
        for case in runnable:
            result = results[case.name]
            if (round_ > 0 and not case.every_round) or result.error:
                continue
            try:
                measure = run_once(case, scan, workdir, round_, check=result.verified is None)
            except AssertionError as err:
                result.verified = False
                result.error = f"read-back differs: {err}"
                log(f"  round {round_ + 1}  {case.name}: {result.error}")
                continue
            except Exception as err:  # noqa: BLE001 - one failing case must not end the run
                result.error = f"failed: {err!r}"
                log(f"  round {round_ + 1}  {case.name}: {result.error}")
                continue
            result.verified = True
            result.measures.append(measure)
            log(
                f"  round {round_ + 1}  {case.name:48s} return {measure.return_mbps:7.0f} MB/s"
                f"  durable {measure.durable_mbps:7.0f} MB/s"
            )
    return list(results.values()), skipped


def summarize(result: CaseResult, baseline: dict[int, float], scan: Scan) -> dict[str, Any]:
    """One JSON-ready summary of a case's rounds."""
    case, measures = result.case, result.measures
    summary: dict[str, Any] = {
        "frame": list(scan.frame),
        "scan": list(scan.shape),
        "case": case.name,
    }
    if result.error and not measures:
        summary["error"] = result.error
        return summary
    best = min(measures, key=lambda m: m.durable_s)
    ratios = [m.durable_mbps / baseline[m.round] for m in measures if m.round in baseline]
    callback = [s for m in measures for s in m.callback] if case.callback else []
    summary.update(
        bytes=best.nbytes,
        rounds=len(measures),
        return_mbps=max(m.return_mbps for m in measures),
        durable_mbps=best.durable_mbps,
        durable_mbps_min=min(m.durable_mbps for m in measures),
        durable_mbps_max=max(m.durable_mbps for m in measures),
        durable_ratio_to_raw_fsync=statistics.median(ratios) if ratios else None,
        callback_ms_median=statistics.median(callback) * 1e3 if callback else None,
        callback_ms_p99=percentile(callback, 0.99) * 1e3 if callback else None,
        peak_rss_bytes=max(m.peak for m in measures),
        bound_bytes=best.bound,
        on_disk_bytes=best.on_disk,
        written_bytes=best.written,
        verified=result.verified,
        per_round=[
            {"round": m.round + 1, "return_s": m.return_s, "durable_s": m.durable_s}
            for m in measures
        ],
    )
    if result.error:
        summary["error"] = result.error
    return summary


def table(summaries: list[dict[str, Any]], scan: Scan, rounds: int) -> str:
    title = (
        f"{scan.frame[0]}×{scan.frame[1]} frames, {scan.shape[0]}×{scan.shape[1]} snaked scan, "
        f"{scan.nbytes / 1e9:.2f} GB"
    )
    lines = [
        f"| {title} | MB/s to return | MB/s durable (min–max of {rounds}) | "
        "durable / raw+fsync | callback median / p99 (ms) | peak RSS / bound (MB) | "
        "on disk / raw | written / raw |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summaries:
        if "durable_mbps" not in s:
            lines.append(f"| {s['case']}: **{s['error']}** | | | | | | | |")
            continue
        name = s["case"] if "error" not in s else f"{s['case']}: **{s['error']}**"
        if s["rounds"] == 1 and rounds > 1:
            name += " (1 round)"
        spread = (
            f"{s['durable_mbps']:.0f} ({s['durable_mbps_min']:.0f}–{s['durable_mbps_max']:.0f})"
            if s["rounds"] > 1
            else f"{s['durable_mbps']:.0f}"
        )
        ratio = (
            ""
            if s["durable_ratio_to_raw_fsync"] is None
            else (f"{s['durable_ratio_to_raw_fsync']:.2f}")
        )
        callback = (
            ""
            if s["callback_ms_median"] is None
            else (f"{s['callback_ms_median']:.3g} / {s['callback_ms_p99']:.3g}")
        )
        memory = f"{s['peak_rss_bytes'] / MB:.0f}"
        if s["bound_bytes"] is not None:
            memory += f" / {s['bound_bytes'] / MB:.0f}"
        lines.append(
            f"| {name} | {s['return_mbps']:.0f} | {spread} | {ratio} | {callback} | {memory} | "
            f"{s['on_disk_bytes'] / s['bytes']:.3f} | {s['written_bytes'] / s['bytes']:.3f} |"
        )
    return "\n".join(lines)


def added_time(results: list[CaseResult]) -> str | None:
    """The RunEngine's scan with the writer against the same scan without it,
    round by round (the two ran one after the other): the time the writer adds."""
    by_name = {r.case.name: r for r in results}
    alone, writer = by_name.get(RE_ALONE), by_name.get(RE_WRITER)
    if alone is None or writer is None or not alone.measures or not writer.measures:
        return None
    without = {m.round: m.return_s for m in alone.measures}
    added = [
        m.return_s / without[m.round] - 1 for m in writer.measures if m.round in without
    ]
    if not added:
        return None
    best_alone = min(without.values())
    best_with = min(m.return_s for m in writer.measures)
    return (
        f"The RunEngine's scan: {best_alone:.2f} s alone, {best_with:.2f} s with the writer "
        f"subscribed (best rounds); the writer adds {statistics.median(added):+.0%} "
        f"(median of {len(added)} rounds, {min(added):+.0%} to {max(added):+.0%})"
    )


def describe_layout(metadata: dict[str, Any]) -> str:
    """ZarrWriter's chunk and shard shapes and codecs, in a few words."""
    grid = metadata["chunk_grid"]["configuration"]["chunk_shape"]
    codecs = metadata["codecs"]
    shard = None
    if codecs and codecs[0]["name"] == "sharding_indexed":
        shard, chunk = grid, codecs[0]["configuration"]["chunk_shape"]
        codecs = codecs[0]["configuration"]["codecs"]
    else:
        chunk = grid
    names = [c["name"] for c in codecs if c["name"] != "bytes"]
    shape = "×".join
    return (
        f"chunk {shape(map(str, chunk))}, "
        + (f"shard {shape(map(str, shard))}" if shard else "no shards")
        + f", codecs {'+'.join(names) or 'none'}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[512, 2048],
        help="frame sizes (square), default 512 2048",
    )
    parser.add_argument(
        "--gb",
        type=float,
        default=None,
        help="scan size per frame size, in rows of 20 frames rounded up "
        "(default: 512: 10 rows, 2048: 6 rows = 1.0 GB; others 1 GB)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument(
        "--cases",
        nargs="+",
        default=[],
        help="run only the cases whose names contain one of these",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small scans (512: 4 rows, 2048: 1 row), one round"
    )
    parser.add_argument("--dir", default=None, help="directory on the disk to measure")
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="FILE",
        help="also write one JSON object per case, per line (default stdout)",
    )
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="bluesky-zarr-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cases = [c for c in CASES if not args.cases or any(f in c.name for f in args.cases)]
    if any(c.name == RAW_FSYNC for c in CASES) and not any(c.name == RAW_FSYNC for c in cases):
        cases.insert(0, next(c for c in CASES if c.name == RAW_FSYNC))  # the baseline
    versions = [f"zarr {zarr.__version__}"]
    for package in ("tensorstore", "acquire-zarr", "suitcase-tiff"):
        try:
            from importlib.metadata import version

            versions.append(f"{package} {version(package)}")
        except Exception:  # noqa: BLE001 - not installed
            pass
    print(
        f"bluesky-zarr write benchmark in {workdir}: {', '.join(versions)}, "
        f"{os.cpu_count()} cores, {rounds} round(s)"
    )
    started = time.perf_counter()
    objects: list[dict[str, Any]] = []

    for label, options in [("ZarrWriter", {})] + (
        [("ZarrWriter, durable=True", {"durable": True})] if DURABLE else []
    ):
        seconds = fixed_cost(workdir, **options)
        line = {
            "case": f"fixed cost of a run, {label}",
            "runs": len(seconds),
            "ms_median": statistics.median(seconds) * 1e3,
            "ms_max": max(seconds) * 1e3,
        }
        objects.append(line)
        print(
            f"\nFixed cost of a run ({label}: start + descriptor + two 4×4 frames + stop, "
            f"{len(seconds)} runs, one writer): median {line['ms_median']:.1f} ms, "
            f"max {line['ms_max']:.1f} ms"
        )
    if not DURABLE:
        print("(ZarrWriter has no durable= keyword: its durable case is skipped)")

    failed = False
    for size in args.sizes:
        frame_bytes = size * size * 2
        if args.quick:
            rows = QUICK_ROWS.get(size, 1)
        elif args.gb is not None or size not in DEFAULT_ROWS:
            rows = max(1, math.ceil((args.gb or 1.0) * 1e9 / (frame_bytes * INNER)))
        else:
            rows = DEFAULT_ROWS[size]
        scan = make_scan(size, rows)
        log(f"\n{size}x{size}: {scan.shape[0]}x{scan.shape[1]} points, {scan.nbytes / 1e9:.2f} GB")
        t0 = time.perf_counter()
        results, skipped = bench_size(scan, workdir, cases, rounds)
        baseline = {
            m.round: m.durable_mbps
            for r in results
            if r.case.name == RAW_FSYNC
            for m in r.measures
        }
        summaries = [summarize(r, baseline, scan) for r in results]
        failed |= any(r.error for r in results)
        print()
        print(table(summaries, scan, rounds))
        added = added_time(results)
        if added is not None:
            print(f"\n{added}")
        for name, reason in skipped.items():
            print(f"\n- skipped {name}: {reason}", end="")
            summaries.append({"frame": [size, size], "case": name, "skipped": reason})
        if skipped:
            print()
        print(
            f"\nZarrWriter's layout, also given to tensorstore: "
            f"{describe_layout(LAYOUTS[(scan.frame, True)])}"
        )
        print(f"\n({size}×{size}: {time.perf_counter() - t0:.0f} s)")
        objects.extend(summaries)
    print(f"\nTotal {time.perf_counter() - started:.0f} s")
    if args.json:
        text = "\n".join(json.dumps(o) for o in objects) + "\n"
        if args.json == "-":
            print(text, end="")
        else:
            Path(args.json).write_text(text)
    if not args.dir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
