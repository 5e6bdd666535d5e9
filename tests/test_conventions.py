"""The stores follow the CF conventions (1.11) where they apply, as xarray's
decoding and cf-xarray read them; readers that ignore CF see the values the
documents gave.

Limits and choices come from real EPICS records: a soft IOC (EPICS base from
``epicscorelibs``) on 127.0.0.1, read by ophyd-async (Channel Access through
aioca) and by ophyd's ``EpicsSignal`` (pyepics), as a beamline reads them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorstore
import xarray as xr
import zarr
from bluesky import RunEngine
from bluesky import plan_stubs as bps
from bluesky.plans import count, grid_scan

from bluesky_zarr import ZarrWriter
from bluesky_zarr.sim import PointCamera, motors

from conftest import EPICS_ENVIRONMENT, assert_times, open_stream, open_tree

cf_xarray = pytest.importorskip("cf_xarray")

CF_TIME_UNITS = "seconds since 1970-01-01T00:00:00Z"


def _grid_run(RE: RunEngine, tmp_path: Path, stop_after: int | None = None) -> tuple[Path, list]:
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=(4, 5), name="cam")
    writer = ZarrWriter(tmp_path)
    RE.subscribe(writer)
    documents: list[tuple[str, dict[str, Any]]] = []
    RE.subscribe(lambda name, doc: documents.append((name, doc)))
    steps: list[Any] = []

    class BeamLost(RuntimeError):
        pass

    def per_step(detectors: Any, step: Any, pos_cache: Any) -> Any:
        steps.append(step)
        if stop_after is not None and len(steps) > stop_after:
            raise BeamLost("beam lost")
        yield from bps.one_nd_step(detectors, step, pos_cache)

    plan = grid_scan(
        [cam], wavelength, 400, 700, 3, position, 0, 5, 4, snake_axes=True, per_step=per_step
    )
    if stop_after is None:
        RE(plan)
    else:
        with pytest.raises(BeamLost):
            RE(plan)
    return writer.stores[0], documents


def _event_times(documents: list, ds: xr.Dataset) -> np.ndarray:
    """The events' times at their points of the wavelength × position grid."""
    times = np.full((ds.sizes["wavelength"], ds.sizes["position"]), np.nan)
    for name, doc in documents:
        if name == "event":
            i = int(np.argmin(abs(ds["wavelength"].values - doc["data"]["wavelength"])))
            j = int(np.argmin(abs(ds["position"].values - doc["data"]["position"])))
            times[i, j] = doc["time"]
    return times


def test_time_decodes_to_the_dates_of_the_events(RE: RunEngine, tmp_path: Path) -> None:
    store, documents = _grid_run(RE, tmp_path, stop_after=7)
    ds = open_stream(store)
    expected = _event_times(documents, ds)
    assert np.isnan(expected).sum() == 12 - 7  # the grid is only partly measured
    assert ds["time"].dtype == np.dtype("datetime64[ns]")
    assert_times(ds["time"], expected)  # NaT where nothing was measured
    np.testing.assert_array_equal(np.isnat(ds["time"].values), ~ds["_written"].values)
    assert ds["time"].encoding["units"] == CF_TIME_UNITS
    assert ds["time"].encoding["calendar"] == "proleptic_gregorian"

    # Readers that ignore CF: the float seconds the documents gave, unchanged.
    raw = zarr.open_group(store, mode="r")["primary/time"]
    np.testing.assert_array_equal(raw[...], expected)
    spec = {"driver": "zarr3",
            "kvstore": {"driver": "file", "path": str(store / "primary" / "time")}}
    read = tensorstore.open(spec, open=True).result().read().result()
    np.testing.assert_array_equal(np.asarray(read), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        undecoded = xr.open_zarr(store, group="primary", decode_times=False).load()
    np.testing.assert_array_equal(undecoded["time"].values, expected)
    assert undecoded["time"].attrs["units"] == CF_TIME_UNITS
    # Every other variable reads the same whether times are decoded or not.
    for name in ds.variables:
        if name != "time":
            xr.testing.assert_identical(ds[name].variable, undecoded[name].variable)


def test_a_growing_stream_is_indexed_by_dates(RE: RunEngine, tmp_path: Path) -> None:
    from ophyd.sim import det1

    writer = ZarrWriter(tmp_path)
    RE.subscribe(writer)
    documents: list[tuple[str, dict[str, Any]]] = []
    RE.subscribe(lambda name, doc: documents.append((name, doc)))
    RE(count([det1], 4))
    ds = open_stream(writer.stores[0])
    assert "time" in ds.indexes
    assert_times(ds["time"], [d["time"] for n, d in documents if n == "event"])
    first = ds["time"].values[0]
    assert ds.sel(time=slice(first, None)).sizes["time"] == 4


def test_conventions_ancillary_mask_and_flags_as_cf_xarray_reads_them(
    RE: RunEngine, tmp_path: Path
) -> None:
    store, _ = _grid_run(RE, tmp_path, stop_after=5)
    tree = open_tree(store)
    assert tree.attrs["Conventions"] == "CF-1.11"
    assert tree["primary"].attrs["Conventions"] == "CF-1.11"
    ds = open_stream(store)

    # Each data variable names the mask of the points written.
    for name in ("cam_image", "wavelength_readback", "position_readback"):
        assert ds[name].attrs["ancillary_variables"] == "_written"
        associated = ds.cf.get_associated_variable_names(name)
        assert associated["ancillary_variables"] == ["_written"]
    # cf-xarray hands the mask over with the variable, and reads its flags.
    image = ds.cf["cam_image"]
    assert "_written" in image.coords
    written = ds["_written"]
    assert written.cf.is_flag_variable
    np.testing.assert_array_equal((written.cf == "written").values, written.values)
    np.testing.assert_array_equal((written.cf == "not_written").values, ~written.values)
    assert int(written.sum()) == 5
    # time is found by its standard name.
    assert ds.cf["time"].name == "time"
    assert ds.cf.standard_names["time"] == ["time"]


# ------------------------------------------------------------ EPICS records
DATABASE = """
record(ao, "BZ:TEMP") {
    field(VAL, "21.5")
    field(EGU, "degC")
    field(PREC, "2")
    field(DRVL, "-20")
    field(DRVH, "80")
    field(LOPR, "-30")
    field(HOPR, "90")
    field(PINI, "YES")
}
record(mbbo, "BZ:MODE") {
    field(ZRST, "Off")
    field(ONST, "On")
    field(TWST, "Auto mode")
    field(VAL, "1")
    field(PINI, "YES")
}
record(ao, "BZ:FREE") {
    field(VAL, "3")
    field(PINI, "YES")
}
"""


@pytest.fixture(scope="module")
def soft_ioc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A soft IOC serving the records over Channel Access on 127.0.0.1 only,
    on the ports this process's clients use (conftest)."""
    pytest.importorskip("epicscorelibs.ioc")
    pytest.importorskip("aioca")
    pytest.importorskip("epics")
    base = tmp_path_factory.mktemp("ioc")
    (base / "records.db").write_text(DATABASE)
    log = open(base / "ioc.log", "wb")  # noqa: SIM115 - closed below
    # The ports and interfaces conftest gave this process's clients.
    ioc = subprocess.Popen(
        [sys.executable, "-m", "epicscorelibs.ioc", "-d", str(base / "records.db")],
        stdin=subprocess.PIPE,  # its shell runs until its input closes
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **EPICS_ENVIRONMENT},
    )
    try:
        deadline = time.monotonic() + 60
        while b"iocRun: All initialization complete" not in (base / "ioc.log").read_bytes():
            if ioc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the soft IOC did not start: {(base / 'ioc.log').read_text()}")
            time.sleep(0.1)
        yield
    finally:
        assert ioc.stdin is not None
        ioc.stdin.close()
        try:
            ioc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            ioc.kill()
            ioc.wait(timeout=20)
        log.close()


def test_limits_and_choices_of_epics_records(soft_ioc: None, RE: RunEngine, tmp_path) -> None:
    from ophyd import EpicsSignal
    from ophyd_async.core import StandardReadable, StrictEnum, init_devices
    from ophyd_async.epics.core import epics_signal_rw

    class Mode(StrictEnum):
        OFF = "Off"
        ON = "On"
        AUTO = "Auto mode"

    class Sensor(StandardReadable):
        def __init__(self, prefix: str, name: str = "") -> None:
            with self.add_children_as_readables():
                self.temperature = epics_signal_rw(float, f"ca://{prefix}TEMP")
                self.mode = epics_signal_rw(Mode, f"ca://{prefix}MODE")
                self.free = epics_signal_rw(float, f"ca://{prefix}FREE")
            super().__init__(name=name)

    with init_devices():
        sensor = Sensor("BZ:")
    # ophyd (v1) reads the same records: limits and choices spelt its own way.
    temperature = EpicsSignal("BZ:TEMP", name="temperature")
    mode = EpicsSignal("BZ:MODE", name="mode", string=False)
    for signal in (temperature, mode):
        signal.wait_for_connection(timeout=30)
    writer = ZarrWriter(tmp_path)
    RE.subscribe(writer)
    documents: list[tuple[str, dict[str, Any]]] = []
    RE.subscribe(lambda name, doc: documents.append((name, doc)))
    RE(count([sensor, temperature, mode], 2))
    data_keys = next(d for n, d in documents if n == "descriptor")["data_keys"]
    assert data_keys["sensor-temperature"]["limits"]["control"] == {"low": -20.0, "high": 80.0}
    assert data_keys["temperature"]["lower_ctrl_limit"] == -20.0
    ds = open_stream(writer.stores[0])

    # The control limits are the valid range, in the array's type; the
    # display limits are not a claim about valid values.
    for name in ("sensor-temperature", "temperature"):
        attrs = ds[name].attrs
        assert (attrs["valid_min"], attrs["valid_max"]) == (-20.0, 80.0)
        assert attrs["units"] == "degC"
        np.testing.assert_array_equal(ds[name].values, [21.5, 21.5])
    # A record without limits (EPICS reports 0, 0) has no valid range.
    assert "valid_min" not in ds["sensor-free"].attrs
    assert "valid_max" not in ds["sensor-free"].attrs

    # An enumeration read as its index (ophyd, string=False): CF flags.
    attrs = ds["mode"].attrs
    assert attrs["flag_values"] == [0.0, 1.0, 2.0]  # the array's type (float64)
    assert attrs["flag_meanings"] == "Off On Auto_mode"
    assert attrs["choices"] == ["Off", "On", "Auto mode"]
    assert bool((ds["mode"].cf == "On").all())
    assert not bool((ds["mode"].cf == "Auto_mode").any())
    # Read as its string (ophyd-async, which describes it as "|S40"): stored
    # as strings, the choices are the flag values.
    assert data_keys["sensor-mode"]["dtype_numpy"] == "|S40"
    attrs = ds["sensor-mode"].attrs
    assert attrs["flag_values"] == ["Off", "On", "Auto mode"]
    assert attrs["flag_meanings"] == "Off On Auto_mode"
    assert ds["sensor-mode"].values.tolist() == ["On", "On"]
    assert bool((ds["sensor-mode"].cf == "On").all())
    # Readers ignoring CF: the values the events gave (nothing is masked).
    for name in ("sensor-temperature", "temperature", "mode"):
        events = [d["data"][name] for n, d in documents if n == "event"]
        np.testing.assert_array_equal(ds[name].values, np.asarray(events, dtype=float))
