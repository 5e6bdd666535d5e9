"""Write throughput, callback latency, memory and write amplification.

Runs every case in one process, on the same disk, one after the other, and
prints a table with ratios to the raw sequential write of the same bytes:

- memcpy of the frames, and a raw sequential write of their bytes to one file
  (the physical limit), with and without a final fsync;
- ZarrWriter fed documents directly, uncompressed and with the default codec,
  and through a real RunEngine with a simulated camera;
- the naive way: ``arr[i, j] = frame`` per event (sharded and unsharded);
- the after-the-fact way: the whole scan as an xarray Dataset, then ``to_zarr``;
- a peer writer from the field: suitcase-tiff (``tiff_series``), when installed.

Usage::

    python benchmarks/bench_write.py                 # 512x512 and 2048x2048, 1 GB each
    python benchmarks/bench_write.py --gb 0.2 --sizes 512

Numbers from a shared machine are noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import tempfile
import threading
import time
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


def wchar() -> int:
    """Bytes this process has passed to write() so far (Linux)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    return 0


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


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


@dataclass
class Result:
    case: str
    seconds: float
    nbytes: int
    callback: list[float] = field(default_factory=list)
    peak: int | None = None
    bound: int | None = None
    written: int | None = None
    buffer_peak: int | None = None

    @property
    def mbps(self) -> float:
        return self.nbytes / self.seconds / MB


@dataclass
class Scan:
    shape: tuple[int, int]
    frame: tuple[int, int]
    pool: list[np.ndarray]

    @property
    def n(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        return self.n * self.pool[0].nbytes

    def frame_at(self, k: int) -> np.ndarray:
        return self.pool[k % len(self.pool)]


def make_scan(size: int, gigabytes: float) -> Scan:
    frame_bytes = size * size * 2
    n = max(2, math.ceil(gigabytes * 1e9 / frame_bytes))
    inner = min(n, max(2, 20 if size >= 1024 else 100))
    outer = math.ceil(n / inner)
    rng = np.random.default_rng(0)
    yy, xx = np.indices((size, size))
    pattern = 200 + 800 * np.exp(-((yy - size / 2) ** 2 + (xx - size / 3) ** 2) / (size**2 / 20))
    # Detector-like frames: Poisson noise over a smooth pattern.
    pool = [rng.poisson(pattern).astype("uint16") for _ in range(8)]
    return Scan((outer, inner), (size, size), pool)


def scan_documents(scan: Scan) -> tuple[Any, Any]:
    run = compose_run(
        metadata={
            "shape": list(scan.shape),
            "extents": [[400, 700], [0, 5]],
            "snaking": [False, False],
            "motors": ["wavelength", "position"],
            "hints": {"dimensions": [[["wavelength"], "primary"], [["position"], "primary"]]},
            "scan_id": 1,
        }
    )
    data_keys = {
        "cam_image": {
            "dtype": "array",
            "shape": list(scan.frame),
            "dtype_numpy": "<u2",
            "source": "bench",
        },
        "wavelength": {"dtype": "number", "shape": [], "source": "bench"},
        "position": {"dtype": "number", "shape": [], "source": "bench"},
    }
    descriptor = run.compose_descriptor(name="primary", data_keys=data_keys)
    return run, descriptor


def feed(scan: Scan, callback: Callable[[str, dict[str, Any]], Any]) -> list[float]:
    """Send the scan's documents to ``callback``; return each event's call time."""
    run, descriptor = scan_documents(scan)
    seconds = []
    callback("start", run.start_doc)
    callback("descriptor", descriptor.descriptor_doc)
    for k in range(scan.n):
        i, j = divmod(k, scan.shape[1])
        event = descriptor.compose_event(
            data={"cam_image": scan.frame_at(k), "wavelength": float(i), "position": float(j)},
            timestamps={"cam_image": 0.0, "wavelength": 0.0, "position": 0.0},
            seq_num=k + 1,
        )
        c0 = time.perf_counter()
        callback("event", event)
        seconds.append(time.perf_counter() - c0)
    callback("stop", run.compose_stop())
    return seconds


def run_direct(scan: Scan, root: Path, sync: bool = False, **options: Any) -> Result:
    """ZarrWriter fed documents directly (no RunEngine); ``sync``: until on disk."""
    writer = ZarrWriter(root, flush_interval=None, **options)
    written0 = wchar()
    with PeakRSS() as memory:
        t0 = time.perf_counter()
        callback = feed(scan, writer)
        if sync:
            os.sync()
        seconds = time.perf_counter() - t0
    info = zarr.open_group(writer.stores[0], mode="r").attrs["bluesky_zarr"]
    return Result(
        "",
        seconds,
        scan.nbytes,
        callback,
        memory.peak,
        writer.options.max_buffer_bytes,
        wchar() - written0,
        info["buffer_peak_bytes"],
    )


def run_zarrs(scan: Scan, root: Path) -> Result | None:
    """ZarrWriter with the zarrs (Rust) codec pipeline, when it is installed."""
    try:
        import zarrs  # noqa: F401
    except ImportError:
        return None
    with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}):
        return run_direct(scan, root, compressors=None)


def run_engine(scan: Scan, root: Path, **options: Any) -> Result:
    """ZarrWriter subscribed to a real RunEngine scanning a simulated camera."""
    from bluesky import RunEngine
    from bluesky.plans import grid_scan
    from ophyd.sim import SynAxis, SynSignal

    class Camera(SynSignal):
        def describe(self) -> dict[str, Any]:
            description = super().describe()
            description[self.name].update(dtype_numpy="<u2", shape=list(scan.frame))
            return description

        def __repr__(self) -> str:
            # The default repr shows the current frame, and the RunEngine
            # copies it into the start document's plan_args.
            return f"Camera(name={self.name!r})"

    counter = iter(range(10**12))
    cam = Camera(func=lambda: scan.frame_at(next(counter)), name="cam_image")
    wavelength, position = SynAxis(name="wavelength"), SynAxis(name="position")
    writer = ZarrWriter(root, flush_interval=None, **options)
    callback: list[float] = []

    def timed(name: str, doc: dict[str, Any]) -> None:
        c0 = time.perf_counter()
        writer(name, doc)
        if name == "event":
            callback.append(time.perf_counter() - c0)

    RE = RunEngine({})
    RE.subscribe(timed)
    written0 = wchar()
    with PeakRSS() as memory:
        t0 = time.perf_counter()
        RE(grid_scan([cam], wavelength, 0, 1, scan.shape[0], position, 0, 1, scan.shape[1]))
        seconds = time.perf_counter() - t0
    return Result("", seconds, scan.nbytes, callback, memory.peak,
                  writer.options.max_buffer_bytes, wchar() - written0)


def run_memcpy(scan: Scan, root: Path) -> Result:
    target = np.empty((scan.n,) + scan.frame, dtype="uint16")
    t0 = time.perf_counter()
    for k in range(scan.n):
        np.copyto(target[k], scan.frame_at(k))
    return Result("", time.perf_counter() - t0, scan.nbytes)


def run_raw(scan: Scan, root: Path, fsync: bool = False) -> Result:
    written0 = wchar()
    t0 = time.perf_counter()
    with open(root / "raw.bin", "wb") as f:
        for k in range(scan.n):
            f.write(memoryview(scan.frame_at(k)).cast("B"))
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return Result("", time.perf_counter() - t0, scan.nbytes, written=wchar() - written0)


def run_naive(scan: Scan, root: Path, sharded: bool) -> Result:
    """``arr[i, j] = frame`` per event, into the same layout.

    Into shards, every frame rewrites its whole shard: this case writes only
    the first rows (at most 100 frames, or 1 GB of shard rewrites) and
    reports the rate over them.
    """
    chunks = (1, 1) + scan.frame
    shards = (1, scan.shape[1]) + scan.frame if sharded else None
    written0 = wchar()
    callback = []
    t0 = time.perf_counter()
    array = zarr.create_array(
        root / "naive.zarr",
        shape=scan.shape + scan.frame,
        dtype="uint16",
        chunks=chunks,
        shards=shards,
        compressors=None,
        fill_value=0,
        config={"write_empty_chunks": True},
    )
    frame_bytes = scan.pool[0].nbytes
    n = scan.n
    if sharded:
        rewrite = frame_bytes * scan.shape[1] / 2  # average shard size rewritten per frame
        n = max(scan.shape[1], min(n, 100, int(1e9 / rewrite)))
    for k in range(n):
        i, j = divmod(k, scan.shape[1])
        c0 = time.perf_counter()
        array[i, j] = scan.frame_at(k)
        callback.append(time.perf_counter() - c0)
    return Result("", time.perf_counter() - t0, n * frame_bytes, callback,
                  written=wchar() - written0)


def run_after(scan: Scan, root: Path) -> Result:
    """The whole scan in memory as an xarray Dataset, then ``to_zarr``."""
    written0 = wchar()
    with PeakRSS() as memory:
        t0 = time.perf_counter()
        frames = [scan.frame_at(k) for k in range(scan.n)]
        cube = np.stack(frames).reshape(scan.shape + scan.frame)
        ds = xr.Dataset(
            {"cam_image": (("wavelength", "position", "y", "x"), cube)},
            coords={"wavelength": np.arange(scan.shape[0]), "position": np.arange(scan.shape[1])},
        )
        ds.to_zarr(
            root / "after.zarr",
            zarr_format=3,
            consolidated=True,
            encoding={"cam_image": {"chunks": (1, 1) + scan.frame, "compressors": None}},
        )
        seconds = time.perf_counter() - t0
    return Result("", seconds, scan.nbytes, peak=memory.peak, written=wchar() - written0)


def run_suitcase_tiff(scan: Scan, root: Path) -> Result | None:
    try:
        from suitcase.tiff_series import Serializer
    except ImportError:
        return None
    written0 = wchar()
    t0 = time.perf_counter()
    with Serializer(str(root / "tiff"), file_prefix="scan-") as serializer:
        callback = feed(scan, serializer)
    return Result("", time.perf_counter() - t0, scan.nbytes, callback, written=wchar() - written0)


def fmt_ms(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return f"{statistics.median(values) * 1e3:.3f} / {p99 * 1e3:.1f}"


def bench_size(size: int, gigabytes: float, workdir: Path, cases: set[str]) -> list[Result]:
    scan = make_scan(size, gigabytes)
    print(
        f"\n## {size}x{size} uint16 frames, scan {scan.shape[0]}x{scan.shape[1]} = {scan.n} "
        f"frames, {scan.nbytes / 1e9:.2f} GB"
    )
    plan: list[tuple[str, Callable[[Path], Result | None]]] = [
        ("memcpy", lambda d: run_memcpy(scan, d)),
        ("raw write (page cache)", lambda d: run_raw(scan, d)),
        ("raw write + fsync", lambda d: run_raw(scan, d, fsync=True)),
        ("ZarrWriter, uncompressed", lambda d: run_direct(scan, d, compressors=None)),
        ("ZarrWriter, uncompressed, until on disk (sync)",
         lambda d: run_direct(scan, d, compressors=None, sync=True)),
        ("ZarrWriter, default (lz4)", lambda d: run_direct(scan, d)),
        ("ZarrWriter, uncompressed, zarrs codec pipeline", lambda d: run_zarrs(scan, d)),
        ("ZarrWriter, uncompressed, 64 MB buffer",
         lambda d: run_direct(scan, d, compressors=None, max_buffer_bytes=64 * 2**20)),
        ("ZarrWriter + RunEngine, uncompressed", lambda d: run_engine(scan, d, compressors=None)),
        ("naive arr[i,j]=frame, sharded (first rows)", lambda d: run_naive(scan, d, sharded=True)),
        ("naive arr[i,j]=frame, unsharded", lambda d: run_naive(scan, d, sharded=False)),
        ("xarray in memory, then to_zarr", lambda d: run_after(scan, d)),
        ("suitcase-tiff series", lambda d: run_suitcase_tiff(scan, d)),
        # The disk of a shared machine varies: measure the baseline twice.
        ("raw write (page cache), again", lambda d: run_raw(scan, d)),
    ]
    results = []
    for name, case in plan:
        if cases and not any(c in name for c in cases):
            continue
        directory = Path(tempfile.mkdtemp(dir=workdir))
        # Every case starts with no dirty pages of earlier cases to flush.
        os.sync()
        try:
            result = case(directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        if result is None:
            print(f"  (skipped {name}: not installed)")
            continue
        result.case = name
        results.append(result)
        print(f"  {name:42s} {result.mbps:8.0f} MB/s", flush=True)
    raws = [r for r in results if r.case.startswith("raw write (page")]
    raw = max(raws, key=lambda r: r.mbps) if raws else None
    if raw is not None:
        print(f"\n  ratios are to the faster raw write: {raw.mbps:.0f} MB/s")
    print()
    print(
        "| case | MB/s | ratio to raw write | callback median / p99 (ms) | "
        "peak memory (MB) / bound | write amplification |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        ratio = f"{r.mbps / raw.mbps:.2f}" if raw else "-"
        memory = "-"
        if r.peak is not None:
            memory = f"{r.peak / MB:.0f}"
            if r.bound is not None:
                memory += f" / {r.bound / MB:.0f}"
                if r.buffer_peak is not None:
                    memory += f" (buffers {r.buffer_peak / MB:.0f})"
        amp = f"{r.written / r.nbytes:.3f}" if r.written is not None else "-"
        print(f"| {r.case} | {r.mbps:.0f} | {ratio} | {fmt_ms(r.callback)} | {memory} | {amp} |")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--gb", type=float, default=1.0, help="scan size per frame size")
    parser.add_argument("--dir", default=None, help="directory on the disk to measure")
    parser.add_argument("--cases", nargs="*", default=[], help="run only cases containing these")
    args = parser.parse_args()
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="bluesky-zarr-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"bluesky-zarr write benchmark in {workdir} (zarr {zarr.__version__}, "
          f"{os.cpu_count()} cores)")
    for size in args.sizes:
        bench_size(size, args.gb, workdir, set(args.cases))


if __name__ == "__main__":
    main()
