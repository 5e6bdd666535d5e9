"""What a small run costs on disk: files and bytes per run, against the documents.

Builds the documents of a small step scan as a beamline records one: a
``baseline`` stream read before and after the scan from 300 signals (scalars,
a few strings, a few short waveforms), and a ``primary`` stream of 183 points
with a handful of scalar detectors and motors and two 1-D waveforms (a
spectrum of 256 bins, a profile of 64). The documents go straight to a
ZarrWriter (default options) and the store it writes is counted:

- files and bytes on disk, and how many of each are ``zarr.json`` metadata,
  chunk or shard data, or the run's records (documents kept, ``_written``);
- the ratio of the store's bytes to the documents' bytes (as compact JSON,
  and as msgpack where ``msgpack`` is installed: what a recording of the run
  takes);
- the largest files, by kind.

Every figure is a count, not a time: the same on any machine.

    python benchmarks/bench_small_run.py [--signals 300] [--points 183] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from event_model import compose_run

from bluesky_zarr import ZarrWriter

Documents = list[tuple[str, dict[str, Any]]]


def _baseline_keys(signals: int) -> dict[str, dict[str, Any]]:
    """Data keys of ``signals`` baseline signals: mostly scalars, one in
    twenty a string, one in fifty a short waveform."""
    keys: dict[str, dict[str, Any]] = {}
    for k in range(signals):
        name = f"sig{k:03d}"
        if k % 50 == 7:
            keys[name] = {"source": f"PV:{name}", "dtype": "array", "shape": [32],
                          "dtype_numpy": "<f8"}
        elif k % 20 == 3:
            keys[name] = {"source": f"PV:{name}", "dtype": "string", "shape": []}
        else:
            keys[name] = {"source": f"PV:{name}", "dtype": "number", "shape": [],
                          "units": "mm" if k % 3 else "deg", "precision": 4}
    return keys


def _value(key: dict[str, Any], rng: np.random.Generator) -> Any:
    if key["dtype"] == "array":
        return rng.normal(size=key["shape"]).tolist()
    if key["dtype"] == "string":
        return str(rng.choice(["In", "Out", "Moving"]))
    return float(rng.normal())


def small_run(signals: int, points: int, seed: int = 0) -> Documents:
    """The documents of one small step scan with a baseline (see the module's text)."""
    rng = np.random.default_rng(seed)
    docs: Documents = []
    bundle = compose_run(
        metadata={
            "plan_name": "scan", "scan_id": 1, "motors": ["th"], "num_points": points,
            "shape": [points], "hints": {"dimensions": [(["th"], "primary")]},
            "plan_pattern": "inner_product",
        }
    )
    docs.append(("start", bundle.start_doc))
    keys = _baseline_keys(signals)
    baseline = bundle.compose_descriptor(
        name="baseline", data_keys=keys, object_keys={"baseline": list(keys)}
    )
    docs.append(("descriptor", baseline.descriptor_doc))

    def baseline_event() -> dict[str, Any]:
        data = {name: _value(key, rng) for name, key in keys.items()}
        return baseline.compose_event(data=data, timestamps={k: time.time() for k in data})

    docs.append(("event", baseline_event()))
    primary_keys = {
        "th": {"source": "PV:th", "dtype": "number", "shape": [], "units": "deg"},
        "th_setpoint": {"source": "PV:th.VAL", "dtype": "number", "shape": [], "units": "deg"},
        **{f"det{k}": {"source": f"PV:det{k}", "dtype": "number", "shape": []} for k in range(6)},
        "spectrum": {"source": "PV:mca", "dtype": "array", "shape": [256], "dtype_numpy": "<u4"},
        "profile": {"source": "PV:prof", "dtype": "array", "shape": [64], "dtype_numpy": "<f8"},
    }
    primary = bundle.compose_descriptor(name="primary", data_keys=primary_keys)
    docs.append(("descriptor", primary.descriptor_doc))
    for n, th in enumerate(np.linspace(10.0, 30.0, points)):
        data: dict[str, Any] = {"th": float(th), "th_setpoint": float(th)}
        data.update({f"det{k}": float(rng.poisson(1000)) for k in range(6)})
        data["spectrum"] = rng.poisson(50, 256).astype("<u4").tolist()
        data["profile"] = rng.normal(size=64).tolist()
        docs.append(
            ("event", primary.compose_event(data=data, timestamps={k: time.time() for k in data},
                                            seq_num=n + 1))
        )
    docs.append(("event", baseline_event()))
    docs.append(("stop", bundle.compose_stop()))
    return docs


def _kind(path: Path, store: Path) -> str:
    """What a file of the store is: metadata, data, or the run's records."""
    parts = path.relative_to(store).parts
    if path.name == "zarr.json":
        return "metadata (zarr.json)"
    if "c" in parts[:-1] or parts[-1].startswith("c"):
        return "chunk and shard data"
    return "the run's records (documents, state)"


def measure(docs: Documents, directory: Path) -> dict[str, Any]:
    writer = ZarrWriter(directory)
    t0 = time.perf_counter()
    for name, doc in docs:
        writer(name, doc)
    writer.close()
    seconds = time.perf_counter() - t0
    (store,) = writer.stores
    store = Path(store)
    files = [p for p in store.rglob("*") if p.is_file()]
    by_kind: Counter[str] = Counter()
    bytes_by_kind: Counter[str] = Counter()
    for path in files:
        kind = _kind(path, store)
        by_kind[kind] += 1
        bytes_by_kind[kind] += path.stat().st_size
    documents_json = sum(len(json.dumps(doc, separators=(",", ":"))) for _, doc in docs)
    result: dict[str, Any] = {
        "files": len(files),
        "directories": sum(1 for p in store.rglob("*") if p.is_dir()),
        "bytes": sum(bytes_by_kind.values()),
        "files_by_kind": dict(by_kind),
        "bytes_by_kind": dict(bytes_by_kind),
        "documents_json_bytes": documents_json,
        "seconds": seconds,
        "largest": [
            (str(p.relative_to(store)), p.stat().st_size)
            for p in sorted(files, key=lambda p: p.stat().st_size, reverse=True)[:5]
        ],
    }
    try:
        import msgpack
        import msgpack_numpy

        result["documents_msgpack_bytes"] = sum(
            len(msgpack.packb(doc, default=msgpack_numpy.encode)) for _, doc in docs
        )
    except ImportError:
        pass
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signals", type=int, default=300, help="baseline signals (300)")
    parser.add_argument("--points", type=int, default=183, help="points of the scan (183)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.signals < 1 or args.points < 1:
        parser.error("--signals and --points must be at least 1")
    docs = small_run(args.signals, args.points)
    directory = Path(tempfile.mkdtemp(prefix="bluesky-zarr-small-"))
    try:
        result = measure(docs, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return 0
    total = result["bytes"]
    print(
        f"A step scan of {args.points} points with {args.signals} baseline signals "
        f"({len(docs)} documents, {result['documents_json_bytes'] / 1e3:.0f} kB as JSON"
        + (
            f", {result['documents_msgpack_bytes'] / 1e3:.0f} kB as msgpack"
            if "documents_msgpack_bytes" in result
            else ""
        )
        + f"), written in {result['seconds']:.2f} s:\n"
    )
    print("| | files | kB |\n| --- | ---: | ---: |")
    for kind, count in sorted(result["files_by_kind"].items()):
        print(f"| {kind} | {count} | {result['bytes_by_kind'][kind] / 1e3:.1f} |")
    print(f"| **the store** ({result['directories']} directories) | **{result['files']}** | "
          f"**{total / 1e3:.1f}** |")
    print(f"\nstore bytes / documents as JSON: {total / result['documents_json_bytes']:.2f}")
    if "documents_msgpack_bytes" in result:
        ratio = total / result["documents_msgpack_bytes"]
        print(f"store bytes / documents as msgpack: {ratio:.2f}")
    print("\nlargest files:")
    for name, size in result["largest"]:
        print(f"  {size / 1e3:8.1f} kB  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
