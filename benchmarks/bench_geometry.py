"""What the geometry check costs per event.

Every event of a gridded stream is checked against the coordinate at the
index its grid gives it (``_geometry.StreamGeometry.observe``), then placed
(``StreamGeometry.index``). This times both, per event, on the events of real
plans recorded with a RunEngine over ``ophyd.sim`` motors, and prints them
beside two baselines measured in the same run:

- ``seq_num -> index``: what placing an event cost before the check (the
  start document's grid, ``ScanPlan.index``), the baseline of the ratios;
- ``writer``: the writer's whole callback per event (``ZarrWriter`` taking
  the event, a scalar detector and the motors), whose share the check is.

    python benchmarks/bench_geometry.py [--points N] [--repeat R] [--json]

Each figure is the fastest of ``--repeat`` passes over the events (the
geometry made anew for each pass of the check); ``place`` times
``StreamGeometry.index``, which replaces ``seq_num -> index``. The ratios,
not the microseconds, are what carries from one machine to another.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from typing import Any

import numpy as np
from bluesky import RunEngine
from bluesky.plans import grid_scan, spiral_square
from dodal.plans import spec_scan
from event_model import pack_event_page
from ophyd.sim import SynAxis, det
from scanspec.specs import Line

from bluesky_zarr import ZarrWriter
from bluesky_zarr.plan._geometry import StreamGeometry
from bluesky_zarr.plan._scan import plan_scan


def record(plan: Any) -> list[tuple[str, dict[str, Any]]]:
    docs: list[tuple[str, dict[str, Any]]] = []
    RE = RunEngine({}, call_returns_result=False)
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    RE(plan)
    return docs


def plans(points: int) -> dict[str, Any]:
    outer = max(2, int(math.sqrt(points)))
    inner = max(2, points // outer)
    a, b = SynAxis(name="a"), SynAxis(name="b")
    side = max(3, int(math.sqrt(min(points, 2500))))
    return {
        f"grid_scan {outer}x{inner} (described)": grid_scan(
            [det], a, 0, 1, outer, b, 0, 1, inner, snake_axes=True
        ),
        f"spec_scan {outer}x{inner} (learned)": spec_scan(
            {det}, Line(a, 0, 1, outer) * ~Line(b, 0, 1, inner)
        ),
        f"spiral_square {side}x{side} (out of order)": spiral_square(
            [det], a, b, 0, 0, 1, 1, side, side
        ),
    }


def per_event(run: Any, events: int, repeat: int) -> float:
    """Seconds per event of ``run()`` (one pass over the events): the
    fastest of ``repeat`` passes, the one least disturbed by other work on
    the machine."""
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        run()
        times.append((time.perf_counter() - began) / events)
    return min(times)


def measure(docs: list[tuple[str, dict[str, Any]]], repeat: int) -> dict[str, float]:
    start = next(d for n, d in docs if n == "start")
    descriptor = next(d for n, d in docs if n == "descriptor")
    events = [d for n, d in docs if n == "event"]
    # As the writer sees them: pages of one event.
    pages = [(np.asarray([e["seq_num"]]), pack_event_page(e)["data"]) for e in events]
    plan = plan_scan(start)

    def check() -> None:
        geometry = StreamGeometry(plan, "primary", descriptor["data_keys"])
        for seq_nums, data in pages:
            geometry.observe(seq_nums, data)

    decided = StreamGeometry(plan, "primary", descriptor["data_keys"])
    for seq_nums, data in pages:
        decided.observe(seq_nums, data)

    def place() -> None:
        for seq_nums, _ in pages:
            decided.index(seq_nums)

    def seq_num_to_index() -> None:
        for seq_nums, _ in pages:
            plan.index(seq_nums)

    def writer() -> None:
        with tempfile.TemporaryDirectory() as directory:
            callback = ZarrWriter(directory)
            for name, doc in docs:
                callback(name, doc)

    checked = per_event(check, len(events), repeat)
    placed = per_event(place, len(events), repeat)
    baseline = per_event(seq_num_to_index, len(events), repeat)
    whole = per_event(writer, len(events), max(1, repeat // 3))
    return {
        "events": len(events),
        "check_us": checked * 1e6,
        "place_us": placed * 1e6,
        "seq_num_to_index_us": baseline * 1e6,
        "writer_us": whole * 1e6,
        "check_over_seq_num_to_index": checked / baseline,
        "check_over_writer": checked / whole,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=2000, help="points per plan")
    parser.add_argument("--repeat", type=int, default=9, help="passes per figure")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    results = {
        name: measure(record(plan), args.repeat) for name, plan in plans(args.points).items()
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(
        f"{'plan':<40} {'events':>6} {'check':>9} {'place':>9} {'seq->index':>11} "
        f"{'writer':>9} {'check/seq->index':>17} {'check/writer':>13}"
    )
    for name, r in results.items():
        print(
            f"{name:<40} {r['events']:>6} {r['check_us']:>7.2f}us {r['place_us']:>7.2f}us "
            f"{r['seq_num_to_index_us']:>9.2f}us {r['writer_us']:>7.1f}us "
            f"{r['check_over_seq_num_to_index']:>17.2f} {r['check_over_writer']:>13.3f}"
        )


if __name__ == "__main__":
    main()
