"""How long ``bluesky-zarr ls`` takes over a directory of many stores.

Writes one small run with a real RunEngine (a 10 x 20 grid scan of a 16x16
camera and a point detector: 6 arrays), copies its store ``--stores`` times
(1,000 by default) into ``{sample}/{scan_id}`` subdirectories, each copy with
its own uid, scan_id and start time in its root ``zarr.json``, and times:

- ``list_stores`` (what ``ls`` does: read each root ``zarr.json``), warm;
- the ``bluesky-zarr ls`` command in a fresh process (imports included);
- for comparison, opening each store's root group with zarr-python
  (consolidated metadata) and reading its attributes.

    python benchmarks/bench_ls.py [--stores N] [--repeat R] [--s3] [--json]

The page cache is warm (the stores were just written): the figures are the
cost of listing, parsing and sorting, not of a cold disk. ``--s3`` also
uploads the stores' root ``zarr.json`` files (all that ``ls`` reads) to a
moto S3 server on 127.0.0.1 and times ``list_stores`` on the ``s3://`` URL:
a local server, so it measures the number of requests and their concurrency,
not a real network's latency.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zarr
from bluesky import RunEngine
from bluesky.plans import grid_scan
from ophyd.sim import det

from bluesky_zarr import ZarrWriter
from bluesky_zarr.catalog._ls import format_listing, list_stores
from bluesky_zarr.sim import PointCamera, motors

SAMPLES = ("Si", "Ge", "GaAs", "InP")


def make_stores(root: Path, count: int) -> float:
    """``count`` copies of one real run's store below ``root``; their total bytes."""
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=(16, 16), name="cam")
    writer = ZarrWriter(root / "template")
    RE = RunEngine({})
    RE.subscribe(writer)
    RE(grid_scan([cam, det], wavelength, 400, 700, 10, position, 0, 5, 20), sample="Si")
    (template,) = writer.stores
    base = json.loads((Path(template) / "zarr.json").read_text())
    start_time = base["attributes"]["start"]["time"]
    for i in range(count):
        sample = SAMPLES[i % len(SAMPLES)]
        store = root / "runs" / sample / f"{i + 1:05d}.zarr"
        shutil.copytree(template, store)
        metadata = json.loads(json.dumps(base))
        start = metadata["attributes"]["start"]
        start.update(
            uid=f"{i:08d}-0000-0000-0000-000000000000",
            scan_id=i + 1,
            time=start_time - 60.0 * (count - i),
            sample=sample,
        )
        (store / "zarr.json").write_text(json.dumps(metadata))
    shutil.rmtree(root / "template")
    return sum(f.stat().st_size for f in (root / "runs").rglob("*") if f.is_file())


def _timed(function: Any, repeat: int) -> tuple[float, Any]:
    times = []
    result = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def _open_with_zarr(runs: Path) -> int:
    found = 0
    for path in runs.glob("*/*.zarr"):
        group = zarr.open_group(path, mode="r", zarr_format=3)
        found += "bluesky_zarr" in group.attrs
    return found


def time_s3(runs: Path, repeat: int, count: int) -> float:
    """Median seconds of ``list_stores`` over the same stores on a moto server."""
    import logging

    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        options = {
            "key": "bench",
            "secret": "bench",
            "endpoint_url": endpoint,
            "client_kwargs": {"region_name": "us-east-1"},
        }
        boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1",
            aws_access_key_id="bench", aws_secret_access_key="bench",
        ).create_bucket(Bucket="bench")
        fs = s3fs.S3FileSystem(**options)
        fs.pipe(
            {
                f"bench/runs/{path.relative_to(runs).as_posix()}": path.read_bytes()
                for path in runs.glob("*/*.zarr/zarr.json")
            }
        )
        seconds, entries = _timed(lambda: list_stores("s3://bench/runs", options), repeat)
        assert len(entries) == count, len(entries)
        s3fs.S3FileSystem.clear_instance_cache()
        return seconds
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", type=int, default=1000, help="stores to list")
    parser.add_argument("--repeat", type=int, default=5, help="timings per figure (median)")
    parser.add_argument("--s3", action="store_true", help="also list them on a moto S3 server")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        t0 = time.perf_counter()
        nbytes = make_stores(root, args.stores)
        made = time.perf_counter() - t0
        runs = root / "runs"
        root_json = (next(runs.glob("*/*.zarr")) / "zarr.json").stat().st_size

        listed, entries = _timed(lambda: list_stores(runs), args.repeat)
        assert len(entries) == args.stores, len(entries)
        formatted, _ = _timed(lambda: format_listing(entries, ["sample"]), args.repeat)

        def command() -> None:
            subprocess.run(
                [sys.executable, "-m", "bluesky_zarr._cli", "ls", str(runs)],
                check=True, stdout=subprocess.DEVNULL,
            )

        command_time, _ = _timed(command, args.repeat)
        zarr_time, found = _timed(lambda: _open_with_zarr(runs), max(1, args.repeat // 2))
        assert found == args.stores
        s3_time = time_s3(runs, args.repeat, args.stores) if args.s3 else None

    figures = {
        "stores": args.stores,
        "bytes_on_disk": nbytes,
        "root_zarr_json_bytes": root_json,
        "make_seconds": round(made, 2),
        "list_stores_seconds": round(listed, 4),
        "list_stores_ms_per_store": round(1000 * listed / args.stores, 4),
        "format_seconds": round(formatted, 4),
        "ls_command_seconds": round(command_time, 3),
        "zarr_open_group_seconds": round(zarr_time, 3),
        "list_stores_s3_seconds": None if s3_time is None else round(s3_time, 3),
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"{args.stores} stores ({nbytes / 1e6:.1f} MB; root zarr.json {root_json} B each)")
    print(f"  list_stores (read each root zarr.json)  {listed:8.3f} s "
          f"({1000 * listed / args.stores:.3f} ms per store)")
    print(f"  format the table                        {formatted:8.3f} s")
    print(f"  bluesky-zarr ls, a fresh process        {command_time:8.3f} s")
    print(f"  zarr.open_group + attrs, per store      {zarr_time:8.3f} s (for comparison)")
    if s3_time is not None:
        print(f"  list_stores on s3:// (moto, 127.0.0.1)  {s3_time:8.3f} s")


if __name__ == "__main__":
    main()
