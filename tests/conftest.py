from __future__ import annotations

import os
import socket
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# EPICS Channel Access of the tests stays on this machine, on ports of its own
# (test_conventions serves records from a soft IOC). Set before anything
# imports ophyd, whose pyepics creates its client context at import.
EPICS_ENVIRONMENT = {
    "EPICS_CA_SERVER_PORT": str(_free_port()),
    "EPICS_CA_REPEATER_PORT": str(_free_port()),
    "EPICS_CA_ADDR_LIST": "127.0.0.1",
    "EPICS_CA_AUTO_ADDR_LIST": "NO",
    "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_PVA_SERVER_PORT": str(_free_port()),
    "EPICS_PVA_BROADCAST_PORT": str(_free_port()),
    "EPICS_PVA_ADDR_LIST": "127.0.0.1",
    "EPICS_PVA_AUTO_ADDR_LIST": "NO",
    "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
}
os.environ.update(EPICS_ENVIRONMENT)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import xarray as xr  # noqa: E402
from bluesky import RunEngine  # noqa: E402

from bluesky_zarr.sim import frame_at  # noqa: E402

#: Fixtures of a local S3 (``endpoint``, ``bucket``, ``options``) for any test.
pytest_plugins = ["helpers.s3"]


@pytest.fixture
def RE() -> RunEngine:
    return RunEngine({}, call_returns_result=False)


@pytest.fixture
def docs() -> list[tuple[str, dict[str, Any]]]:
    return []


def open_stream(store: Path, stream: str = "primary") -> xr.Dataset:
    """Open one stream of a store the way a user would, refusing any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return xr.open_zarr(store, group=stream).load()


def epoch_seconds(times: Any) -> np.ndarray:
    """Decoded CF times (datetime64, NaT where unmeasured) as float seconds
    since the UNIX epoch (NaN where unmeasured): the values the documents gave."""
    values = np.asarray(times)
    assert values.dtype.kind == "M", f"time is not decoded to dates: {values.dtype}"
    seconds = (values - np.datetime64(0, "ns")) / np.timedelta64(1, "s")
    return np.where(np.isnat(values), np.nan, seconds)


def assert_times(times: Any, expected: Any) -> None:
    """Decoded CF times are the documents' times: to the microsecond (decoding
    float seconds to nanoseconds rounds them), unmeasured points NaT."""
    np.testing.assert_allclose(
        epoch_seconds(times), np.asarray(expected, float), rtol=0, atol=1e-6
    )


def open_tree(store: Path) -> xr.DataTree:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return xr.open_datatree(store, engine="zarr")


def iter_points(ds: xr.Dataset, dims: list[str]) -> Iterator[dict[str, int]]:
    for index in np.ndindex(*(ds.sizes[d] for d in dims)):
        yield dict(zip(dims, index))


def assert_frames_match(
    ds: xr.Dataset,
    key: str,
    motor_dims: dict[str, str],
    shape: tuple[int, ...],
    dtype: str = "uint16",
) -> int:
    """Every frame of ``key`` equals what the camera takes at its coordinates.

    ``motor_dims`` maps each motor the camera watches (in order) to the
    variable holding its setpoint at each point. Returns the number of
    frames checked.
    """
    image = ds[key]
    scan_dims = [d for d in image.dims if d not in image.dims[-len(shape):]]
    checked = 0
    for point in iter_points(ds, scan_dims):
        positions = {
            m: float(ds[var].isel({d: i for d, i in point.items() if d in ds[var].dims}).values)
            for m, var in motor_dims.items()
        }
        expected = frame_at(positions, shape, dtype)
        actual = image.isel(point).values
        assert actual.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(actual, expected, err_msg=f"frame at {point}")
        checked += 1
    return checked


def assert_written_points_hold_their_frames(
    store: Path, shape: tuple[int, ...], key: str = "cam_image"
) -> np.ndarray:
    """Every point that ``_written`` marks on a wavelength × position grid holds
    exactly the camera's frame there, with its seq_num; returns the mask."""
    ds = open_stream(store)
    written = ds["_written"].values
    assert ds[key].dtype == np.uint16
    for index in zip(*np.nonzero(written)):
        positions = {
            "wavelength": float(ds["wavelength"].values[index[0]]),
            "position": float(ds["position"].values[index[1]]),
        }
        np.testing.assert_array_equal(
            ds[key].values[index], frame_at(positions, shape),
            err_msg=f"point {index} is marked written but does not hold its frame",
        )
        assert ds["seq_num"].values[index] > 0
    return written


def fly(
    det: Any,
    events: int,
    frames_per_event: int,
    *,
    livetime: float = 0.2,
    deadtime: float = 0.05,
    flush_period: float = 0.1,
    md: dict[str, Any] | None = None,
) -> Any:
    """A fly scan of an ophyd-async detector: ``events`` points of
    ``frames_per_event`` frames each, collected as the detector goes
    (``md``: what the start document says besides)."""
    import bluesky.plan_stubs as bps
    import bluesky.preprocessors as bpp
    from ophyd_async.core import TriggerInfo

    @bpp.stage_decorator([det])
    @bpp.run_decorator(md=md)
    def inner() -> Any:
        info = TriggerInfo(
            number_of_events=events,
            collections_per_event=frames_per_event,
            livetime=livetime,
            deadtime=deadtime,
        )
        yield from bps.prepare(det, info, wait=True)
        yield from bps.declare_stream(det, name="primary")
        yield from bps.kickoff(det, wait=True)
        yield from bps.collect_while_completing(
            flyers=[det], dets=[det], flush_period=flush_period
        )

    return inner()


def quick_sleep(stepper: Any = None) -> Any:
    """A fast clock for ophyd-async's pattern generator: a frame every 5 ms
    whatever the exposure; ``stepper`` runs before each frame (a sample
    moving in the beam)."""
    import asyncio

    async def sleep(seconds: float) -> None:
        if stepper is not None:
            stepper()
        await asyncio.sleep(0.005)

    return sleep


def blob_detector(tmp_path: Path, pattern: Any) -> Any:
    """ophyd-async's simulated blob detector, writing HDF5 below ``tmp_path``."""
    from pathlib import PurePath

    from ophyd_async import sim
    from ophyd_async.core import StaticPathProvider, UUIDFilenameProvider, init_devices

    directory = tmp_path / "detector"
    directory.mkdir(exist_ok=True)
    provider = StaticPathProvider(UUIDFilenameProvider(), PurePath(directory))
    with init_devices():
        det = sim.SimBlobDetector(provider, pattern)
    return det


def record(RE: Any) -> list[tuple[str, dict[str, Any]]]:
    """The documents ``RE`` emits from now on, each copied as it was emitted."""
    import copy

    docs: list[tuple[str, dict[str, Any]]] = []
    RE.subscribe(lambda name, doc: docs.append((name, copy.deepcopy(doc))))
    return docs


def step_scan_docs(RE: Any, tmp_path: Path, points: int = 3) -> list[tuple[str, dict[str, Any]]]:
    """The documents (and HDF5 file) of a real ophyd-async step scan."""
    import bluesky.plan_stubs as bps
    from bluesky.plans import grid_scan
    from ophyd_async import sim
    from ophyd_async.core import init_devices

    pattern = sim.PatternGenerator(sleep=quick_sleep())
    with init_devices():
        stage = sim.SimStage(pattern)
    det = blob_detector(tmp_path, pattern)
    RE(bps.mv(stage.x.velocity, 0))
    docs = record(RE)
    RE(grid_scan([det], stage.x, 0, 2, points))
    return docs


def refuse_thread_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Thread.start`` from now on as Python 3.12 has it in ``atexit``
    handlers (where the writer finishes interrupted runs)."""

    def refuse(self: Any) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", refuse)


def by_kind(docs: list[tuple[str, dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    """The documents of one kind (``"stream_datum"``, ...), in order."""
    return [doc for name, doc in docs if name == kind]


#: The repository's root, its source, and the tests' helper scripts.
REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
HELPERS = Path(__file__).resolve().parent / "helpers"

#: Fixtures that start a server (moto's S3, a soft IOC): tests that use one
#: are system tests, wherever they are.
SYSTEM_FIXTURES = frozenset({"s3", "endpoint", "soft_ioc"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the system tests (``-m system``; ``-m "not system"`` for the quick
    subset): every test under ``tests/system`` (processes killed or signalled,
    brokers, servers, the command line, notebooks), and those elsewhere that
    start a server through a fixture."""
    system = Path(__file__).resolve().parent / "system"
    for item in items:
        if system in Path(str(item.path)).resolve().parents or SYSTEM_FIXTURES & set(
            getattr(item, "fixturenames", ())
        ):
            item.add_marker(pytest.mark.system)
