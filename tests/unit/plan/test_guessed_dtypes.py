"""Values whose type only ophyd's guess declares: a motor at 0 says "integer".

ophyd describes a signal by its current Python value, so a motor sitting at
``0`` declares ``{"dtype": "integer"}`` (no ``dtype_numpy``) and then reads
``2.5``. These scans must complete, and every value must read back as sent.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zarr
from bluesky.plans import adaptive_scan, list_scan, scan, tune_centroid, tweak
from bluesky.preprocessors import SupplementalData
from event_model import compose_run
from ophyd import SoftPositioner
from ophyd.sim import SynAxis, SynGauss, SynSignal

import bluesky_zarr
from bluesky_zarr import ZarrWriter

from conftest import open_stream

Docs = list[tuple[str, dict[str, Any]]]


def record(RE, writer: ZarrWriter) -> Docs:
    """Subscribe ``writer`` and a recorder of the documents the run emits."""
    docs: Docs = []
    RE.subscribe(lambda name, doc: docs.append((name, copy.deepcopy(doc))))
    RE.subscribe(writer)
    return docs


def descriptor_of(docs: Docs, stream: str) -> dict[str, Any]:
    return next(d for n, d in docs if n == "descriptor" and d["name"] == stream)


def readings(docs: Docs, stream: str) -> dict[str, list[Any]]:
    """Each data key's values in the stream, in seq_num order."""
    uid = descriptor_of(docs, stream)["uid"]
    events = sorted(
        (d for n, d in docs if n == "event" and d["descriptor"] == uid),
        key=lambda e: e["seq_num"],
    )
    assert [e["seq_num"] for e in events] == list(range(1, len(events) + 1))
    return {key: [e["data"][key] for e in events] for key in events[0]["data"]}


def guessed_integer_keys(docs: Docs, stream: str) -> list[str]:
    """The stream's data keys that declare a bare ``integer`` dtype."""
    keys = descriptor_of(docs, stream)["data_keys"]
    return [k for k, v in keys.items() if v["dtype"] == "integer" and not v.get("dtype_numpy")]


def assert_stored_as_sent(store, docs: Docs, stream: str) -> dict[str, list[Any]]:
    """Every data key of ``stream`` reads back equal to the values sent."""
    sent = readings(docs, stream)
    ds = open_stream(store, stream)
    by_key = {
        v.attrs["data_key"]: name for name, v in ds.variables.items() if "data_key" in v.attrs
    }
    assert set(by_key) == set(sent)
    for key, values in sent.items():
        stored = ds[by_key[key]].values
        np.testing.assert_array_equal(stored, np.asarray(values, dtype="float64"), err_msg=key)
    assert bool(ds["_written"].all())
    return sent


def motor_reading_zero(name: str) -> SynAxis:
    """A simulated motor at 0 that has been read (as any plan or ``wa`` does)."""
    motor = SynAxis(name=name)
    motor.read()
    return motor


def test_adaptive_scan_from_an_integer_start(RE, tmp_path):
    motor = motor_reading_zero("m")
    peak = SynGauss("peak", motor, "m", center=2.5, Imax=1, sigma=1)
    writer = ZarrWriter(tmp_path)
    docs = record(RE, writer)
    RE(adaptive_scan([peak], "peak", motor, 0, 5, 0.1, 1, 0.05, True))

    assert docs[-1][1]["exit_status"] == "success"
    assert "m_setpoint" in guessed_integer_keys(docs, "primary")
    sent = assert_stored_as_sent(writer.stores[0], docs, "primary")
    # The guess was wrong: fractional setpoints came.
    assert any(v != int(v) for v in sent["m_setpoint"])
    ds = open_stream(writer.stores[0])
    np.testing.assert_array_equal(ds["m"].values, sent["m_setpoint"])


def test_tune_centroid_with_integer_start_and_stop(RE, tmp_path):
    motor = motor_reading_zero("m")
    peak = SynGauss("peak", motor, "m", center=2.2, Imax=1, sigma=0.5)
    writer = ZarrWriter(tmp_path)
    docs = record(RE, writer)
    RE(tune_centroid([peak], "peak", motor, 0, 5, 0.1, 10))

    assert docs[-1][1]["exit_status"] == "success"
    assert "m_setpoint" in guessed_integer_keys(docs, "primary")
    sent = assert_stored_as_sent(writer.stores[0], docs, "primary")
    assert any(v != int(v) for v in sent["m_setpoint"])


def test_tweak_a_motor_at_zero(RE, tmp_path):
    motor = motor_reading_zero("m")
    peak = SynGauss("peak", motor, "m", center=2.5, Imax=1, sigma=1)
    answers: Iterator[str] = iter(["", "", "stop"])  # keep the step twice, then quit

    async def answer(msg: Any) -> str:
        return next(answers)

    RE.register_command("input", answer)
    writer = ZarrWriter(tmp_path)
    docs = record(RE, writer)
    RE(tweak(peak, "peak", motor, 2.5))

    assert docs[-1][1]["exit_status"] == "success"
    assert "m" in guessed_integer_keys(docs, "primary")
    sent = assert_stored_as_sent(writer.stores[0], docs, "primary")
    assert sent["m"] == [0, 2.5, 5.0]


def test_list_scan_whose_first_point_is_an_integer(RE, tmp_path):
    motor = SynAxis(name="m")
    peak = SynGauss("peak", motor, "m", center=2, Imax=1, sigma=1)
    writer = ZarrWriter(tmp_path)
    docs = record(RE, writer)
    RE(list_scan([peak], motor, [1, 2.5, 3]))

    assert docs[-1][1]["exit_status"] == "success"
    assert "m_setpoint" in guessed_integer_keys(docs, "primary")
    sent = assert_stored_as_sent(writer.stores[0], docs, "primary")
    assert sent["m_setpoint"] == [1, 2.5, 3]


def test_baseline_of_a_motor_that_started_at_zero(RE, tmp_path):
    stage = SoftPositioner(init_pos=0, name="stage")
    twice = SynSignal(func=lambda: 2 * stage.position, name="twice")
    RE.preprocessors.append(SupplementalData(baseline=[stage]))
    writer = ZarrWriter(tmp_path)
    docs = record(RE, writer)
    RE(scan([twice], stage, 0.5, 2.5, 3))

    assert docs[-1][1]["exit_status"] == "success"
    assert guessed_integer_keys(docs, "baseline") == ["stage"]
    # The end-of-run baseline reading (2.5) is stored, next to the first (0).
    sent = assert_stored_as_sent(writer.stores[0], docs, "baseline")
    assert sent["stage"] == [0, 2.5]
    assert_stored_as_sent(writer.stores[0], docs, "primary")
    tree = zarr.open_group(writer.stores[0], mode="r")
    assert tree["baseline/stage"].dtype == np.dtype("float64")


def test_an_explicit_dtype_numpy_stays_exact(tmp_path):
    run = compose_run(metadata={"scan_id": 1})
    descriptor = run.compose_descriptor(
        name="primary",
        data_keys={
            "counts": {"dtype": "integer", "dtype_numpy": "<i4", "shape": [], "source": "x"}
        },
    )
    writer = ZarrWriter(tmp_path)
    writer("start", run.start_doc)
    writer("descriptor", descriptor.descriptor_doc)
    for n in range(3):
        event = descriptor.compose_event(
            data={"counts": 2**31 - 1 - n}, timestamps={"counts": 0.0}, seq_num=n + 1
        )
        writer("event", event)
    refused = descriptor.compose_event(data={"counts": 2.5}, timestamps={"counts": 0.0}, seq_num=4)
    with pytest.raises(bluesky_zarr.DataTypeError, match="int32"):
        writer("event", refused)
    writer("stop", run.compose_stop())
    ds = open_stream(writer.stores[0])
    assert ds["counts"].dtype == np.dtype("int32")
    assert ds["counts"].values.tolist() == [2**31 - 1, 2**31 - 2, 2**31 - 3]
