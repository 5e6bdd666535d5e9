"""Recorded runs with one document mutated: refused cleanly, nothing earlier lost.

Valid document streams (a grid scan of a camera, a count) are recorded once
from a real RunEngine; each example mutates one document (a field dropped, a
type changed, a list made shorter or longer, a frame reshaped, an absurd
number, None, text where a number goes, nested garbage, an unexpected field)
and feeds the whole stream to a ZarrWriter. Whatever the writer makes of it:

- every exception that reaches the caller is a ``BlueskyZarrError``;
- every point sent before the mutated document reads back as it was sent.
"""

from __future__ import annotations

import copy
import functools
import itertools
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from bluesky import RunEngine
from bluesky.plans import count, grid_scan
from event_model import pack_event_page
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from ophyd.sim import SynGauss

from bluesky_zarr import BlueskyZarrError, ZarrWriter
from bluesky_zarr.sim import PointCamera, motors

from conftest import open_stream

Docs = list[tuple[str, dict[str, Any]]]

SETTINGS = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@functools.cache
def recorded(kind: str) -> Docs:
    """A valid document stream recorded from a real RunEngine."""
    docs: Docs = []
    RE = RunEngine({}, call_returns_result=False)
    RE.subscribe(lambda name, doc: docs.append((name, copy.deepcopy(doc))))
    wavelength, position = motors("wavelength", "position")
    if kind == "grid":
        cam = PointCamera([wavelength, position], shape=(3, 4), name="cam")
        RE(grid_scan([cam], wavelength, 400, 700, 2, position, 0, 5, 3))
    else:
        peak = SynGauss("peak", wavelength, "wavelength", center=0, Imax=1, sigma=1)
        RE(count([peak], 4))
    return docs


def as_pages(docs: Docs, size: int) -> Docs:
    """The same stream with consecutive events packed into pages of ``size``."""
    out: Docs = []
    for is_event, group in itertools.groupby(docs, key=lambda nd: nd[0] == "event"):
        items = list(group)
        if not is_event:
            out.extend(items)
            continue
        events = [doc for _, doc in items]
        for i in range(0, len(events), size):
            out.append(("event_page", pack_event_page(*events[i : i + size])))
    return out


# ---------------------------------------------------------------- mutations
def paths(value: Any, prefix: tuple[Any, ...] = (), depth: int = 4) -> Iterator[tuple[Any, ...]]:
    """Every place inside a document (keys of mappings, indices of lists)."""
    if depth == 0:
        return
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return
    for key, child in items:
        yield prefix + (key,)
        yield from paths(child, prefix + (key,), depth - 1)


GARBAGE = st.one_of(
    st.sampled_from(
        [
            None,
            True,
            "text",
            "",
            -1,
            0,
            2.5,
            2**62,
            -(2**62),
            1e308,
            float("nan"),
            float("inf"),
            [],
            {},
            [[1, 2, 3], [4, 5]],
            {"a": {"b": [None, "c"]}},
            [None],
            ["1", "2"],
            np.zeros((2, 2), dtype="float32"),
            np.zeros((3, 4), dtype="<f16"),
            np.zeros(5, dtype="V8"),
        ]
    ),
    st.integers(),
    st.floats(),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=4),
)


@st.composite
def mutated_streams(draw: st.DrawFn) -> tuple[Docs, int, str]:
    docs = copy.deepcopy(recorded(draw(st.sampled_from(["grid", "count"]))))
    page_size = draw(st.sampled_from([None, 1, 2, 5]))
    if page_size is not None:
        docs = as_pages(docs, page_size)
    target = draw(st.integers(0, len(docs) - 1))
    doc = docs[target][1]
    places = list(paths(doc))
    place = draw(st.sampled_from(places))
    *parents, last = place
    container: Any = doc
    for key in parents:
        container = container[key]
    how = draw(
        st.sampled_from(
            ["drop", "replace", "to_text", "wrap", "shorter", "longer", "reshape", "add"]
        )
    )
    old = container[last]
    if how == "drop":
        del container[last]
    elif how == "replace":
        container[last] = draw(GARBAGE)
    elif how == "to_text":
        container[last] = str(old)
    elif how == "wrap":
        container[last] = draw(st.sampled_from([[old], {"value": old}, (old, old)]))
    elif how in ("shorter", "longer") and isinstance(old, (list, np.ndarray)) and len(old):
        if isinstance(old, np.ndarray):
            container[last] = old[:-1] if how == "shorter" else np.concatenate([old, old[-1:]])
        else:
            container[last] = old[:-1] if how == "shorter" else old + old[-1:]
    elif how == "add" and isinstance(old, dict):
        old["unexpected"] = draw(GARBAGE)
    elif how == "reshape" and isinstance(old, np.ndarray) and old.size:
        container[last] = old.ravel() if old.ndim > 1 else old.reshape(1, -1)
    elif how == "reshape" and isinstance(old, (int, float)) and not isinstance(old, bool):
        container[last] = draw(st.sampled_from([-old, old * 2**40, old + 0.5, -1]))
    else:
        container[last] = draw(GARBAGE)
    label = f"{docs[target][0]}: {how} {'.'.join(map(str, place[:2]))}"
    return docs, target, label


# ------------------------------------------------------------------- checks
def sent_before(docs: Docs, target: int) -> dict[int, dict[str, Any]]:
    """Data of each point (by seq_num) sent before the mutated document."""
    points: dict[int, dict[str, Any]] = {}
    for name, doc in docs[:target]:
        if name == "event":
            points[doc["seq_num"]] = doc["data"]
        elif name == "event_page":
            for n, seq_num in enumerate(doc["seq_num"]):
                points[seq_num] = {key: column[n] for key, column in doc["data"].items()}
    return points


def seq_nums_named_by(doc: Any) -> set[int]:
    """Integers a (mutated) document gives as seq_num: points it may rewrite."""
    value = doc.get("seq_num") if isinstance(doc, dict) else None
    flat = np.ravel(np.asarray(value, dtype=object)) if value is not None else []
    return {int(v) for v in flat if isinstance(v, (int, np.integer))}


@SETTINGS
@given(mutated_streams())
def test_one_mutated_document(case: tuple[Docs, int, str]) -> None:
    docs, target, label = case
    event(label.split(":")[0])
    with tempfile.TemporaryDirectory() as directory:
        writer = ZarrWriter(Path(directory), flush_interval=None)
        for n, (name, doc) in enumerate(docs):
            try:
                writer(name, doc)
            except BlueskyZarrError:
                pass
            except Exception as err:  # noqa: BLE001 - the property under test
                raise AssertionError(
                    f"{type(err).__name__} escaped at document {n} ({name}), mutated: {label}"
                ) from err
        try:
            writer.close()
        except BlueskyZarrError:
            pass

        expected = sent_before(docs, target)
        for seq_num in seq_nums_named_by(docs[target][1]):
            expected.pop(seq_num, None)
        if not expected:
            return
        ds = open_stream(writer.stores[0])
        by_key = {
            v.attrs["data_key"]: name for name, v in ds.variables.items() if "data_key" in v.attrs
        }
        scan_shape = ds["_written"].shape
        for seq_num, data in expected.items():
            point = np.unravel_index(seq_num - 1, scan_shape)
            assert ds["_written"].values[point], (seq_num, label)
            for key, value in data.items():
                stored = ds[by_key[key]].values[point]
                message = f"{key} at seq_num {seq_num}; mutated: {label}"
                np.testing.assert_array_equal(stored, value, err_msg=message)
