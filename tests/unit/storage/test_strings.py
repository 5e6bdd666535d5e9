"""String data keys: Python ``str`` through xarray, and what other V3 readers make of them.

Zarr V3's core specification has no string data type; zarr-python stores
strings with the ``string`` extension data type (``vlen-utf8`` codec), the
only form that reads back as ``str`` through xarray. tensorstore's ``zarr3``
driver reads only the core types: it opens every other array of the store,
and refuses the string ones (the README says so).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import numpy as np
import tensorstore
from bluesky.plans import count
from ophyd import Signal
from ophyd.sim import det

from bluesky_zarr import ZarrWriter

from conftest import open_stream

LABELS = ["Si (100)", "Ge", "α-Fe₂O₃", ""]


def _tensorstore(array: Path) -> np.ndarray:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(array)}}
    return np.asarray(tensorstore.open(spec, open=True).result().read().result())


def _labelled(label: Signal, labels: list[str]) -> Any:
    """Per shot of a count: the next label, then a reading of every detector."""
    remaining = iter(labels)

    def per_shot(detectors: Any) -> Any:
        label.put(next(remaining))
        return (yield from bps.trigger_and_read(detectors))

    return per_shot


def test_string_keys_read_back_as_str_and_numeric_arrays_open_in_tensorstore(RE, tmp_path):
    label = Signal(name="label", value="")
    writer = ZarrWriter(tmp_path)
    RE.subscribe(writer)
    docs: list[tuple[str, dict]] = []
    RE(
        count([det, label], num=len(LABELS), per_shot=_labelled(label, LABELS)),
        lambda name, doc: docs.append((name, doc)),
    )
    (store,) = writer.stores

    ds = open_stream(store)
    assert [type(v) for v in ds["label"].values.tolist()] == [str] * len(LABELS)
    assert ds["label"].values.tolist() == LABELS
    metadata = json.loads((store / "primary" / "label" / "zarr.json").read_text())
    assert metadata["data_type"] == "string"

    # Every array but the string one is a core V3 array: tensorstore reads it.
    detected = [doc["data"]["det"] for name, doc in docs if name == "event"]
    np.testing.assert_array_equal(_tensorstore(store / "primary" / "det"), detected)
    np.testing.assert_array_equal(_tensorstore(store / "primary" / "_written"), True)
    np.testing.assert_array_equal(
        _tensorstore(store / "primary" / "seq_num"), np.arange(1, len(LABELS) + 1)
    )
    # The string array: refused for its data type (or, once tensorstore reads
    # the string extension, read back whole).
    try:
        read = _tensorstore(store / "primary" / "label")
    except ValueError as err:
        assert "string data type is not one of the supported data types" in str(err)
    else:  # pragma: no cover - a tensorstore that knows the extension
        assert [v.decode() if isinstance(v, bytes) else v for v in read.tolist()] == LABELS


def test_fixed_length_unicode_keys_are_stored_as_the_same_strings(RE, tmp_path):
    """A key declared ``<U12``: zarr-python's fixed-length alternative
    (``fixed_length_utf32``) is an extension that tensorstore refuses alike,
    so it is stored as the same strings."""
    label = Signal(name="label", value="")
    original = label.describe

    def describe() -> dict:
        description = original()
        description["label"]["dtype_numpy"] = "<U12"
        return description

    label.describe = describe  # type: ignore[method-assign]
    writer = ZarrWriter(tmp_path)
    RE.subscribe(writer)
    RE(count([label], num=2, per_shot=_labelled(label, LABELS[:2])))
    (store,) = writer.stores
    assert open_stream(store)["label"].values.tolist() == LABELS[:2]
    metadata = json.loads((store / "primary" / "label" / "zarr.json").read_text())
    assert metadata["data_type"] == "string"
