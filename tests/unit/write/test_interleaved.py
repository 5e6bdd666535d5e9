"""Documents of several runs, mixed as one proxy delivers them, into one writer."""

from __future__ import annotations

import copy
import random
from typing import Any

import numpy as np
import pytest
import zarr
from bluesky import RunEngine
from bluesky.plans import grid_scan, scan
from event_model import pack_event_page

from bluesky_zarr import ZarrWriter
from bluesky_zarr.sim import PointCamera, motors

from conftest import assert_frames_match, open_stream

Docs = list[tuple[str, dict[str, Any]]]

#: What each recorded run is: its frame shape and dtype, the variables holding
#: each watched motor's setpoints, and its number of points.
RUNS: dict[str, dict[str, Any]] = {
    "spectrum": {
        "shape": (6, 5),
        "dtype": "uint16",
        "motors": {"wavelength": "wavelength", "position": "position"},
        "points": 12,
        "scan_shape": (3, 4),
    },
    "volume": {
        "shape": (4, 3),
        "dtype": "float32",
        "motors": {"x": "x", "y": "y", "z": "z"},
        "points": 12,
        "scan_shape": (2, 2, 3),
    },
    "line": {
        "shape": (3, 3),
        "dtype": "int32",
        "motors": {"theta": "theta"},
        "points": 5,
        "scan_shape": (5,),
    },
}


def record(plan_of, label: str) -> Docs:
    """The documents of one run, from a RunEngine of its own."""
    RE = RunEngine({}, call_returns_result=False)
    docs: Docs = []
    RE.subscribe(lambda name, doc: docs.append((name, copy.deepcopy(doc))))
    spec = RUNS[label]
    axes = motors(*spec["motors"])
    cam = PointCamera(axes, shape=spec["shape"], dtype=spec["dtype"], name="cam")
    RE(plan_of(cam, axes))
    return docs


@pytest.fixture(scope="module")
def recorded() -> dict[str, Docs]:
    return {
        "spectrum": record(
            lambda cam, m: grid_scan([cam], m[0], 400, 700, 3, m[1], 0, 5, 4, snake_axes=True),
            "spectrum",
        ),
        "volume": record(
            lambda cam, m: grid_scan(
                [cam], m[0], -1, 1, 2, m[1], 0, 3, 2, m[2], 2, 4, 3, snake_axes=True
            ),
            "volume",
        ),
        "line": record(lambda cam, m: scan([cam], m[0], -2, 2, 5), "line"),
    }


def as_pages(docs: Docs, size: int) -> Docs:
    """The run with consecutive events packed into event pages of ``size``."""
    out: Docs = []
    pending: list[dict[str, Any]] = []
    for name, doc in docs + [("end", {})]:
        if name == "event" and (not pending or pending[0]["descriptor"] == doc["descriptor"]):
            pending.append(doc)
            if len(pending) == size:
                out.append(("event_page", dict(pack_event_page(*pending))))
                pending = []
            continue
        if pending:
            out.append(("event_page", dict(pack_event_page(*pending))))
            pending = []
        if name == "event":
            pending.append(doc)
        elif name != "end":
            out.append((name, doc))
    return out


def interleave(streams: list[Docs], seed: int) -> Docs:
    """A random merge of the runs' documents that keeps each run's own order."""
    rng = random.Random(seed)
    queues = [list(s) for s in streams]
    merged: Docs = []
    while any(queues):
        queue = rng.choice([q for q in queues if q])
        merged.append(queue.pop(0))
    return merged


def check_run(store, label: str, start_uid: str) -> None:
    spec = RUNS[label]
    root = zarr.open_group(store, mode="r")
    start = root.attrs["start"]
    assert isinstance(start, dict) and start["uid"] == start_uid
    assert root.attrs["exit_status"] == "success"
    ds = open_stream(store)
    assert ds["cam_image"].shape == spec["scan_shape"] + spec["shape"]
    checked = assert_frames_match(ds, "cam_image", spec["motors"], spec["shape"], spec["dtype"])
    assert checked == spec["points"]
    assert bool(ds["_written"].all())
    assert sorted(ds["seq_num"].values.ravel().tolist()) == list(range(1, spec["points"] + 1))


TWO = ("spectrum", "volume")
THREE = ("spectrum", "volume", "line")
SMALL = {"max_buffer_bytes": 200, "flush_interval": None}
ONE_BYTE = {"max_buffer_bytes": 1, "flush_interval": None, "workers": 1}


@pytest.mark.parametrize(
    "labels, page_size, options, seed",
    [
        (TWO, None, {}, 0),
        (TWO, 3, {}, 1),
        (THREE, None, {}, 2),
        (THREE, 3, SMALL, 3),
        (THREE, None, SMALL, 4),
        (THREE, 2, ONE_BYTE, 5),
    ],
    ids=["two", "two-pages", "three", "three-pages-small-buffer", "three-small-buffer",
         "three-pages-one-byte-buffer"],
)
def test_interleaved_runs_give_separate_correct_stores(
    recorded, tmp_path, seed, labels, page_size, options
):
    runs = [recorded[label] for label in labels]
    if page_size is not None:
        runs = [as_pages(docs, page_size) for docs in runs]
    merged = interleave(runs, seed)
    # The merge really mixes the runs: some run starts before another stops.
    first_stop = next(i for i, (name, _) in enumerate(merged) if name == "stop")
    assert sum(name == "start" for name, _ in merged[:first_stop]) >= 2

    writer = ZarrWriter(tmp_path, **options)
    for name, doc in merged:
        writer(name, doc)

    assert list(writer.open_runs) == []
    assert len(writer.stores) == len(labels) == len(set(writer.stores))
    by_uid = {zarr.open_group(s, mode="r").attrs["start"]["uid"]: s for s in writer.stores}
    for label, docs in zip(labels, runs):
        uid = docs[0][1]["uid"]
        check_run(by_uid[uid], label, uid)


def test_interleaved_equals_sequential(recorded, tmp_path):
    """Mixing the runs changes nothing in what each store holds."""
    labels = ["spectrum", "volume", "line"]
    runs = [recorded[label] for label in labels]
    stores = {}
    feeds = {"sequential": [d for r in runs for d in r], "mixed": interleave(runs, 7)}
    for mode, feed in feeds.items():
        writer = ZarrWriter(tmp_path / mode)
        for name, doc in feed:
            writer(name, doc)
        stores[mode] = {
            zarr.open_group(s, mode="r").attrs["start"]["uid"]: s for s in writer.stores
        }
    assert stores["sequential"].keys() == stores["mixed"].keys()
    for uid, path in stores["sequential"].items():
        a = zarr.open_group(path, mode="r")["primary"]
        b = zarr.open_group(stores["mixed"][uid], mode="r")["primary"]
        assert isinstance(a, zarr.Group) and isinstance(b, zarr.Group)
        assert sorted(a.array_keys()) == sorted(b.array_keys())
        for name in a.array_keys():
            x, y = a[name][...], b[name][...]
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y, err_msg=name)
