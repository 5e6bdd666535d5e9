"""Peak memory of the writer against its bound (``max_buffer_bytes``).

Feeds the documents of grid scans of 512×512 uint16 frames to one
:class:`~bluesky_zarr.ZarrWriter` and prints how far the process's resident
memory grew above where it stood before the first document (Linux VmHWM,
reset first), next to the bound. Cases: row shards (the default layout), a
layout whose chunks complete late (all wavelengths of a position in one chunk:
partial chunks spill and merge), and four interleaved runs sharing one writer.

    python benchmarks/bench_memory.py [--quick] [--json]

Each case runs in a process of its own: memory a process has freed may stay
resident and hide the next case's growth.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from event_model import compose_run

from bluesky_zarr import ZarrWriter

MiB = 2**20
FRAME = (512, 512)


def _status(field: str) -> int:
    """A field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _runs(n_runs: int, shape: tuple[int, int]) -> tuple[list[Any], list[list[tuple[str, Any]]]]:
    """Composers and their first documents for ``n_runs`` grid scans."""
    bundles, streams = [], []
    for n in range(n_runs):
        bundle = compose_run(
            metadata={
                "scan_id": n + 1,
                "shape": list(shape),
                "extents": [[400, 700], [0, 5]],
                "snaking": [False, False],
                "motors": ["wavelength", "position"],
                "plan_name": "grid_scan",
                "plan_pattern": "outer_product",
            }
        )
        descriptor = bundle.compose_descriptor(
            name="primary",
            data_keys={
                "cam_image": {
                    "source": "sim", "dtype": "array", "shape": list(FRAME),
                    "dtype_numpy": "<u2",
                },
                "wavelength": {"source": "sim", "dtype": "number", "shape": []},
                "position": {"source": "sim", "dtype": "number", "shape": []},
            },
        )
        bundles.append((bundle, descriptor))
        streams.append([("start", bundle.start_doc), ("descriptor", descriptor.descriptor_doc)])
    return bundles, streams


def measure(case: str, *, bound: int, shape: tuple[int, int], n_runs: int = 1) -> dict[str, Any]:
    """Feed ``n_runs`` interleaved scans to one writer; the peak growth of RSS."""
    chunks = {"cam_image": (shape[0], 1, *FRAME)} if case == "late" else None
    rng = np.random.default_rng(0)
    # Frames are made as they are sent (a camera's frames are not all held).
    base = rng.integers(0, 4000, size=FRAME, dtype=np.uint16)
    with tempfile.TemporaryDirectory() as directory:
        writer = ZarrWriter(
            directory, max_buffer_bytes=bound, chunks=chunks, flush_interval=None
        )
        bundles, streams = _runs(n_runs, shape)
        before = _status("VmRSS")
        _reset_peak()
        started = time.perf_counter()
        for documents in streams:
            for name, doc in documents:
                writer(name, doc)
        points = shape[0] * shape[1]
        for seq_num in range(1, points + 1):
            for _, descriptor in bundles:
                frame = base + np.uint16(seq_num)
                # The motors where the claimed grid puts the point (the
                # writer checks every point against its grid).
                outer, inner = divmod(seq_num - 1, shape[1])
                event = descriptor.compose_event(
                    data={
                        "cam_image": frame,
                        "wavelength": 400.0 + 300.0 * outer / max(1, shape[0] - 1),
                        "position": 5.0 * inner / max(1, shape[1] - 1),
                    },
                    timestamps={"cam_image": 0.0, "wavelength": 0.0, "position": 0.0},
                    seq_num=seq_num,
                )
                writer("event", event)
        for bundle, _ in bundles:
            writer("stop", bundle.compose_stop())
        elapsed = time.perf_counter() - started
        peak = _status("VmHWM")
        accounted = max(
            zarr.open_group(store, mode="r").attrs["bluesky_zarr"]["buffer_peak_bytes"]
            for store in writer.stores
        )
    frames_bytes = n_runs * points * base.nbytes
    return {
        "case": case,
        "runs": n_runs,
        "bound_MiB": bound / MiB,
        "data_MiB": frames_bytes / MiB,
        "rss_growth_MiB": (peak - before) / MiB,
        "ratio_to_bound": (peak - before) / bound,
        "accounted_peak_MiB": accounted / MiB,
        "seconds": elapsed,
    }


CASES = {
    "row-shards": {"n_runs": 1},
    "late": {"n_runs": 1},
    "interleaved": {"n_runs": 4},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller scans")
    parser.add_argument("--json", action="store_true", help="one JSON object per case")
    parser.add_argument("--case", choices=sorted(CASES), action="append")
    parser.add_argument("--bound-mib", type=int, default=64)
    args = parser.parse_args(argv)
    shape = (10, 20) if args.quick else (10, 50)
    cases = args.case or list(CASES)
    if len(cases) > 1:
        for case in cases:
            command = [sys.executable, __file__, "--case", case]
            command += ["--bound-mib", str(args.bound_mib)]
            command += ["--quick"] * args.quick + ["--json"] * args.json
            subprocess.run(command, check=True)
        return 0
    (case,) = cases
    kind = "late" if case == "late" else "rows"
    result = measure(kind, bound=args.bound_mib * MiB, shape=shape, **CASES[case])
    result["case"] = case
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print(
            f"{case:12s} runs {result['runs']}  data {result['data_MiB']:6.0f} MiB  "
            f"bound {result['bound_MiB']:4.0f} MiB  RSS growth "
            f"{result['rss_growth_MiB']:6.1f} MiB  ratio {result['ratio_to_bound']:.2f}  "
            f"accounted peak {result['accounted_peak_MiB']:5.1f} MiB  "
            f"({result['seconds']:.1f} s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
