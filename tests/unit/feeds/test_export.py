"""``export`` in the suitcase convention, checked by suitcase-utils' own test data.

The ``example_data`` fixture (suitcase-utils) runs each of its plans with each
of its detector sets and emits the events as ``event``, ``event_page`` or the
legacy ``bulk_events``; every value read back must equal what the documents
carried.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import event_model
import numpy as np
import pytest
from ophyd.sim import det
from suitcase.utils.tests.conftest import (  # noqa: F401 - pytest fixtures
    _make_image_list,
    detector_list,
    event_type,
    example_data,
    generate_data,
    plan_type,
    simple_plan,
)

from bluesky_zarr import DataShapeError, export

from conftest import open_stream, open_tree


def _events(docs: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every event of a document stream, whatever form it came in."""
    events = []
    for name, doc in docs:
        if name == "event":
            events.append(doc)
        elif name == "event_page":
            events.extend(event_model.unpack_event_page(doc))
        elif name == "bulk_events":
            for page in event_model.bulk_events_to_event_pages(doc):
                events.extend(event_model.unpack_event_page(page))
    return events


def _contradictions(docs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Data keys whose values do not have the shape their descriptor declares."""
    declared = {
        doc["uid"]: {k: tuple(v["shape"]) for k, v in doc["data_keys"].items()}
        for name, doc in docs
        if name == "descriptor"
    }
    found = set()
    for event in _events(docs):
        for key, value in event["data"].items():
            if np.shape(value) != declared[event["descriptor"]][key]:
                found.add(key)
    return sorted(found)


def _expected(docs: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, dict[int, Any]]]:
    """stream -> data key -> seq_num -> value, from the documents."""
    stream_of = {doc["uid"]: doc["name"] for name, doc in docs if name == "descriptor"}
    expected: dict[str, dict[str, dict[int, Any]]] = defaultdict(lambda: defaultdict(dict))
    for event in _events(docs):
        for key, value in event["data"].items():
            expected[stream_of[event["descriptor"]]][key][event["seq_num"]] = value
    return expected


def test_export_writes_every_suitcase_example(example_data, tmp_path):  # noqa: F811
    docs = example_data()
    starts = [doc for name, doc in docs if name == "start"]
    contradicted = _contradictions(docs)
    if contradicted:
        # The detector's descriptor declares another shape than its readings
        # have; the store cannot be pre-sized from it.
        with pytest.raises(DataShapeError, match="expected shape .* declared by the descriptor"):
            export(docs, tmp_path)
        (store,) = tmp_path.glob("*.zarr")
        tree = open_tree(store)
        assert tree.attrs["bluesky_zarr"]["complete"] is False
        assert "failed" in tree.attrs["bluesky_zarr"]["incomplete_reason"]
        return

    stores = export(iter(docs), tmp_path)

    assert len(stores) == len(starts) == 1
    tree = open_tree(stores[0])
    assert tree.attrs["start"]["uid"] == starts[0]["uid"]
    assert tree.attrs["exit_status"] == "success"
    expected = _expected(docs)
    # suitcase-utils packs all events of a run into one event_page, under the
    # first event's descriptor: a stream may then receive fewer events than
    # the stop document counts, and the store must say so.
    (stop,) = [doc for name, doc in docs if name == "stop"]
    received = {
        stream: len(next(iter(expected.get(stream, {}).values()), []))
        for stream in stop["num_events"]
    }
    missing = {
        stream: {"expected": count, "written": received[stream]}
        for stream, count in stop["num_events"].items()
        if received[stream] < count
    }
    info = tree.attrs["bluesky_zarr"]
    assert info["complete"] is (not missing)
    assert info.get("missing", {}) == missing
    if missing:
        assert "events written" in info["incomplete_reason"]
    streams = {doc["name"] for name, doc in docs if name == "descriptor"}
    assert set(tree.children) == streams
    for stream in streams - set(expected):
        assert open_stream(stores[0], stream)["seq_num"].size == 0
    for stream, keys in expected.items():
        ds = open_stream(stores[0], stream)
        (dim,) = ds["seq_num"].dims
        assert ds.sizes[dim] == len(next(iter(keys.values())))
        assert ds["_written"].all()
        for key, by_seq_num in keys.items():
            for seq_num, value in by_seq_num.items():
                actual = ds[key].isel({dim: seq_num - 1}).values
                np.testing.assert_array_equal(actual, np.asarray(value), err_msg=key)
            assert ds["seq_num"].values.tolist() == sorted(by_seq_num)


def test_export_refuses_a_descriptor_that_contradicts_its_data(RE, tmp_path):
    docs: list[tuple[str, dict[str, Any]]] = []
    RE(simple_plan(_make_image_list(False)), lambda name, doc: docs.append((name, doc)))

    with pytest.raises(DataShapeError) as info:
        export(docs, tmp_path)

    assert "'direct_img_list'" in str(info.value)
    assert "expected shape (10,)" in str(info.value) and "got (10, 10)" in str(info.value)
    (store,) = tmp_path.glob("*.zarr")
    assert open_tree(store).attrs["bluesky_zarr"]["complete"] is False


def test_export_keeps_a_run_the_stream_leaves_open(RE, tmp_path):
    docs: list[tuple[str, dict[str, Any]]] = []
    RE(simple_plan([det]), lambda name, doc: docs.append((name, doc)))
    without_stop = [(name, doc) for name, doc in docs if name != "stop"]

    (store,) = export(without_stop, tmp_path)

    tree = open_tree(store)
    info = tree.attrs["bluesky_zarr"]
    assert info["complete"] is False
    assert info["incomplete_reason"] == "the document stream ended before the run stopped"
    assert "stop" not in tree.attrs
    ds = open_stream(store)
    assert ds["_written"].values.tolist() == [True] * 5
    np.testing.assert_array_equal(ds["det"].values, [d["data"]["det"] for d in _events(docs)])
