"""Zero-copy (``external="virtual"``) against copying (``external="fill"``).

ophyd-async's simulated detector (``SimBlobDetector``, its frames enlarged to
2048×2048 uint8) writes a snaked 16×16 grid scan to HDF5: 256 frames, 1.07 GB.
Its documents are recorded once, then fed to a :class:`~bluesky_zarr.ZarrWriter`
per case, rounds interleaved: the writer's time per frame (the callbacks of one
point's stream_datum and event: median and p99; and the whole run, stop
included, divided by the frames), the time until the store is on disk
(``os.sync()``), and the bytes the writer put on disk against the frames' bytes.

    python benchmarks/bench_virtual.py [--quick] [--rounds N] [--json]

``--quick``: 512×512 frames on an 8×8 grid (17 MB).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path, PurePath
from typing import Any

import bluesky.plan_stubs as bps
import numpy as np
from bluesky import RunEngine
from bluesky.plans import grid_scan
from ophyd_async import sim
from ophyd_async.core import StaticPathProvider, UUIDFilenameProvider, init_devices
from ophyd_async.sim import _blob_data_logic

from bluesky_zarr import ZarrWriter

CASES: dict[str, dict[str, Any]] = {
    "virtual": {"external": "virtual"},
    "fill, default (LZ4)": {"external": "fill"},
    "fill, uncompressed": {"external": "fill", "compressors": None},
}


def record_scan(directory: Path, size: int, points: int) -> tuple[list[Any], int, int]:
    """Run the scan; return its documents, the frames and their bytes."""
    _blob_data_logic.WIDTH = _blob_data_logic.HEIGHT = size

    async def quick(seconds: float) -> None:
        await asyncio.sleep(0)

    pattern = sim.PatternGenerator(sleep=quick)
    RE = RunEngine({}, call_returns_result=False)
    with init_devices():
        stage = sim.SimStage(pattern)
    provider = StaticPathProvider(UUIDFilenameProvider(), PurePath(directory))
    with init_devices():
        det = sim.SimBlobDetector(provider, pattern)
    RE(bps.mv(stage.x.velocity, 0, stage.y.velocity, 0))
    docs: list[Any] = []
    RE(
        grid_scan([det], stage.x, -2, 2, points, stage.y, -2, 2, points, snake_axes=True),
        lambda name, doc: docs.append((name, doc)),
    )
    frames = points * points
    return docs, frames, frames * size * size


def disk_bytes(path: Path) -> int:
    return sum(
        os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files
    )


def run_case(docs: list[Any], out: Path, options: dict[str, Any]) -> dict[str, float]:
    writer = ZarrWriter(out, **options)
    per_point: list[float] = []
    pending = 0.0
    began = time.perf_counter()
    for name, doc in docs:
        t0 = time.perf_counter()
        writer(name, doc)
        spent = time.perf_counter() - t0
        if name == "stream_datum":
            pending += spent
        elif name == "event":
            per_point.append(pending + spent)
            pending = 0.0
    returned = time.perf_counter() - began
    os.sync()
    durable = time.perf_counter() - began
    (store,) = writer.stores
    return {
        "callback_median_ms": 1e3 * statistics.median(per_point),
        "callback_p99_ms": 1e3 * float(np.percentile(per_point, 99)),
        "run_ms_per_frame": 1e3 * returned / len(per_point),
        "durable_ms_per_frame": 1e3 * durable / len(per_point),
        "bytes": float(disk_bytes(Path(store))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    size, points = (512, 8) if args.quick else (2048, 16)
    with tempfile.TemporaryDirectory(prefix="bench-virtual-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "detector").mkdir()
        docs, frames, frame_bytes = record_scan(tmp_path / "detector", size, points)
        results: dict[str, list[dict[str, float]]] = {case: [] for case in CASES}
        for round_ in range(args.rounds):
            for case, options in CASES.items():
                out = tmp_path / f"out-{round_}-{len(results[case])}"
                results[case].append(run_case(docs, out, options))
                shutil.rmtree(out)
        best = {
            case: min(runs, key=lambda r: r["durable_ms_per_frame"])
            for case, runs in results.items()
        }
    if args.json:
        print(json.dumps({"frames": frames, "frame_bytes": frame_bytes, "cases": best}))
        return
    print(
        f"{size}×{size} uint8 frames, {points}×{points} snaked grid, {frames} frames, "
        f"{frame_bytes / 1e9:.2f} GB (best of {args.rounds} rounds)\n"
    )
    print(
        "| case | callback median / p99 (ms per frame) | run (ms per frame) | "
        "durable (ms per frame) | bytes written | written / frames |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for case, r in best.items():
        print(
            f"| {case} | {r['callback_median_ms']:.3g} / {r['callback_p99_ms']:.3g} | "
            f"{r['run_ms_per_frame']:.3g} | {r['durable_ms_per_frame']:.3g} | "
            f"{r['bytes'] / 1e6:.3g} MB | {r['bytes'] / frame_bytes:.2g} |"
        )
    virtual, fill = best["virtual"], best["fill, uncompressed"]
    print(
        f"\nvirtual / fill (uncompressed): time per frame (durable) "
        f"{virtual['durable_ms_per_frame'] / fill['durable_ms_per_frame']:.2g}, "
        f"bytes written {virtual['bytes'] / fill['bytes']:.2g}"
    )


if __name__ == "__main__":
    main()
