"""Runs registered with a real Tiled server, by reference, and read back through it."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr
from bluesky import RunEngine
from bluesky import plan_stubs as bps
from bluesky.plans import count, grid_scan
from bluesky.preprocessors import SupplementalData

from bluesky_zarr import OptionError, ZarrWriter
from bluesky_zarr._cli import main
from bluesky_zarr.sim import PointCamera, frame_at, motors

from conftest import assert_frames_match, open_stream

pytest.importorskip("tiled.client")
pytest.importorskip("tiled.server")

from tiled.client import from_uri  # noqa: E402
from tiled.queries import Key  # noqa: E402
from tiled.structures.core import Spec  # noqa: E402

API_KEY = "blueskyzarrtestkey"
SHAPE = (12, 10)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TiledServer:
    """``tiled serve`` with a SQLite catalog, on 127.0.0.1, allowed to read
    ``stores`` (or, given ``object_storage``, a bucket: a readable_storage entry
    of its configuration)."""

    def __init__(self, base: Path, object_storage: dict[str, Any] | None = None) -> None:
        self.stores = base / "stores"  # readable by the server: the stores live here
        self.stores.mkdir()
        self.writable = base / "tiled-data"  # its own storage: must stay empty
        self.writable.mkdir()
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        catalog = str(base / "catalog.db")
        if object_storage is None:
            serve = ["catalog", catalog, "--init", "-w", str(self.writable),
                     "-r", str(self.stores), "--api-key", API_KEY]
        else:
            config = {
                "authentication": {"single_user_api_key": API_KEY},
                "trees": [{"path": "/", "tree": "catalog", "args": {
                    "uri": f"sqlite:///{catalog}",
                    "init_if_not_exists": True,
                    "writable_storage": [str(self.writable)],
                    "readable_storage": [object_storage],
                }}],
            }
            (base / "config.yml").write_text(json.dumps(config))  # JSON is YAML
            serve = ["config", str(base / "config.yml")]
        self.log = open(base / "tiled.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tiled", "serve", *serve,
             "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_ready(base / "tiled.log")
        except BaseException:
            self.stop()
            raise
        root = from_uri(self.uri, api_key=API_KEY)
        # A catalog as facilities set it up: bluesky-tiled-plugins' client then
        # turns Key("scan_id") into a query on the start document.
        root.create_container("raw", specs=[Spec("CatalogOfBlueskyRuns", version="3.0")])
        root.context.close()
        self.catalog_uri = f"{self.uri}/api/v1/metadata/raw"
        self._catalog: Any = None

    def _wait_ready(self, log: Path) -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tiled serve exited: {log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"tiled serve did not start in time: {log.read_text()}")

    def catalog(self) -> Any:
        """A client of the catalog (one, reused, so that it is closed at the end)."""
        if self._catalog is None:
            self._catalog = from_uri(self.catalog_uri, api_key=API_KEY)
        return self._catalog

    def stop(self) -> None:
        if getattr(self, "_catalog", None) is not None:
            self._catalog.context.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=20)
        self.log.close()


@pytest.fixture(scope="module")
def tiled_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TiledServer]:
    server = TiledServer(tmp_path_factory.mktemp("tiled"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def root(tiled_server: TiledServer, request: pytest.FixtureRequest) -> Path:
    """A directory of stores, inside what the server may read."""
    path = tiled_server.stores / request.node.name
    path.mkdir()
    return path


def _grid_setup() -> tuple[Any, Any, PointCamera]:
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=SHAPE, name="cam")
    return wavelength, position, cam


def _assert_same_as_zarr(run: Any, store: Path, stream: str = "primary") -> xr.Dataset:
    """The stream read through Tiled is the stream xarray opens from the store."""
    through_tiled = run[stream].read()
    xr.testing.assert_identical(through_tiled, open_stream(store, stream))
    return through_tiled


def _uid(store: Path | str) -> str:
    return str(zarr.open_group(store, mode="r").attrs["start"]["uid"])


def _files_in(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


def test_grid_scan_is_a_bluesky_run_of_xarray_datasets(
    tiled_server: TiledServer, root: Path, RE: RunEngine
) -> None:
    wavelength, position, cam = _grid_setup()
    (sample,) = motors("sample_z")
    baseline = SupplementalData(baseline=[sample])
    RE.preprocessors.append(baseline)
    writer = ZarrWriter(root, tiled=tiled_server.catalog_uri, tiled_api_key=API_KEY)
    RE.subscribe(writer)
    RE(
        grid_scan([cam], wavelength, 400, 700, 4, position, 0, 5, 5, snake_axes=True),
        sample="quartz", scan_id=4242,
    )
    (store,) = writer.stores
    assert writer.tiled_failures == []
    writer.close()

    catalog = tiled_server.catalog()
    uid = _uid(store)
    run = catalog[uid]
    assert {s.name: s.version for s in run.specs}["BlueskyRun"] == "3.0"
    assert run.metadata["start"]["sample"] == "quartz"
    assert run.metadata["stop"]["exit_status"] == "success"
    assert sorted(run) == ["baseline", "primary"]

    ds = _assert_same_as_zarr(run, store)
    assert ds["cam_image"].dims == ("wavelength", "position", "y", "x")
    assert set(ds.coords) == {"wavelength", "position"}
    assert bool(ds["_written"].all())
    checked = assert_frames_match(
        ds, "cam_image", {"wavelength": "wavelength", "position": "position"}, SHAPE
    )
    assert checked == 20
    # The stream that grows along time (two baseline readings).
    assert _assert_same_as_zarr(run, store, "baseline").sizes["time"] == 2

    # Specs and references as Tiled's xarray client and a facility expect.
    stream = run["primary"]
    assert [s.name for s in stream.specs] == ["xarray_dataset"]
    assert [s.name for s in stream["cam_image"].specs] == ["xarray_data_var"]
    assert [s.name for s in stream["wavelength"].specs] == ["xarray_coord"]
    (source,) = stream["cam_image"].data_sources()
    assert source.management == "external"
    assert source.mimetype == "application/x-zarr"
    assert [a.data_uri for a in source.assets] == [f"file://{store}/primary/cam_image"]
    assert _files_in(tiled_server.writable) == []  # registered, never copied

    # The usual databroker queries find it.
    assert list(catalog.search(Key("scan_id") == 4242)) == [uid]
    assert uid in list(catalog.search(Key("plan_name") == "grid_scan"))
    assert list(catalog.search(Key("scan_id") == 4243)) == []


def test_a_run_is_readable_through_tiled_while_it_is_written(
    tiled_server: TiledServer, root: Path, RE: RunEngine
) -> None:
    wavelength, position, cam = _grid_setup()
    catalog = tiled_server.catalog()
    writer = ZarrWriter(root, tiled=catalog)  # a client node instead of a URI
    RE.subscribe(writer)
    seen: dict[str, Any] = {}
    steps = []

    def per_step(detectors: Any, step: Any, pos_cache: Any) -> Any:
        steps.append(step)
        if len(steps) == 7:
            # Halfway: what the store holds now is what Tiled serves now.
            writer.flush()
            (store,) = writer.open_runs
            uid = _uid(store)
            run = tiled_server.catalog()[uid]
            seen["stop"] = "stop" in run.metadata
            seen["ds"] = _assert_same_as_zarr(run, Path(store))
        yield from bps.one_nd_step(detectors, step, pos_cache)

    RE(grid_scan([cam], wavelength, 400, 700, 3, position, 0, 5, 4, per_step=per_step))
    assert seen["stop"] is False
    written = seen["ds"]["_written"].values
    assert written.sum() == 6  # the six points measured before the seventh step
    for index in zip(*np.nonzero(written)):
        positions = {
            "wavelength": float(seen["ds"]["wavelength"][index[0]]),
            "position": float(seen["ds"]["position"][index[1]]),
        }
        np.testing.assert_array_equal(
            seen["ds"]["cam_image"].values[index], frame_at(positions, SHAPE)
        )
    (store,) = writer.stores
    run = catalog[_uid(store)]
    assert run.metadata["stop"]["exit_status"] == "success"
    assert bool(_assert_same_as_zarr(run, Path(store))["_written"].all())


def test_a_growing_stream_shows_its_new_points_during_the_run(
    tiled_server: TiledServer, root: Path, RE: RunEngine
) -> None:
    from ophyd.sim import det1

    writer = ZarrWriter(root, tiled=tiled_server.catalog_uri, tiled_api_key=API_KEY)
    RE.subscribe(writer)
    sizes = []

    def per_shot(detectors: Any) -> Any:
        if len(sizes) < 5:
            yield from bps.trigger_and_read(detectors)
        if len(sizes) in (2, 4):
            writer.flush()  # on disk, and registered with the new shape
            (store,) = writer.open_runs
            run = tiled_server.catalog()[_uid(store)]
            sizes.append(_assert_same_as_zarr(run, Path(store)).sizes["time"])
        else:
            sizes.append(None)

    RE(count([det1], 5, per_shot=per_shot))
    assert sizes[2] == 3 and sizes[4] == 5
    (store,) = writer.stores
    writer.close()
    run = tiled_server.catalog()[_uid(store)]
    np.testing.assert_array_equal(_assert_same_as_zarr(run, store)["det1"], np.full(5, 5.0))


def test_register_command_is_idempotent_and_brings_a_run_up_to_date(
    tiled_server: TiledServer, root: Path, RE: RunEngine, capsys: pytest.CaptureFixture[str]
) -> None:
    wavelength, position, cam = _grid_setup()
    documents: list[tuple[str, dict[str, Any]]] = []
    RE.subscribe(lambda name, doc: documents.append((name, doc)))
    RE(grid_scan([cam], wavelength, 400, 700, 3, position, 0, 5, 4))

    # A run registered while it is written (no stop yet), then finished.
    writer = ZarrWriter(root)
    for name, doc in documents[:-1]:
        writer(name, doc)
    writer.flush()
    (store,) = writer.open_runs
    command = ["register", "--tiled", tiled_server.catalog_uri, "--api-key", API_KEY]
    assert main([*command, str(store)]) == 0
    assert "created" in capsys.readouterr().out
    uid = documents[0][1]["uid"]
    assert "stop" not in tiled_server.catalog()[uid].metadata

    writer(*documents[-1])
    assert main([*command, str(store)]) == 0
    assert "updated" in capsys.readouterr().out
    run = tiled_server.catalog()[uid]
    assert run.metadata["stop"]["exit_status"] == "success"
    before = {key: (run["primary"][key].metadata, run["primary"][key].data_sources())
              for key in run["primary"]}

    # Registering again changes nothing.
    assert main([*command, str(store)]) == 0
    assert "unchanged" in capsys.readouterr().out
    run = tiled_server.catalog()[uid]
    after = {key: (run["primary"][key].metadata, run["primary"][key].data_sources())
             for key in run["primary"]}
    assert after == before
    _assert_same_as_zarr(run, Path(store))

    # The same run from another store (a copy) is refused, not mixed in.
    copy = root / "copy.zarr"
    shutil.copytree(store, copy)
    assert main([*command, str(copy)]) == 1
    assert "already holds a run" in capsys.readouterr().err

    # Something that is not a store is refused, plainly.
    assert main([*command, str(root)]) == 1
    assert "not a Zarr V3 store" in capsys.readouterr().err


def test_tiled_unreachable_loses_nothing(
    tiled_server: TiledServer,
    root: Path,
    RE: RunEngine,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import tiled.client.utils

    # Fail fast instead of retrying for 45 s.
    monkeypatch.setattr(tiled.client.utils, "TILED_RETRY_ATTEMPTS", 1)
    wavelength, position, cam = _grid_setup()
    nobody = f"http://127.0.0.1:{_free_port()}"
    writer = ZarrWriter(root, tiled=nobody, tiled_api_key=API_KEY, tiled_timeout=20)
    RE.subscribe(writer)
    with caplog.at_level(logging.WARNING, logger="bluesky_zarr"):
        RE(grid_scan([cam], wavelength, 400, 700, 3, position, 0, 5, 4))
    (store,) = writer.stores
    ds = open_stream(store)
    assert bool(ds["_written"].all())
    assert zarr.open_group(store, mode="r").attrs["bluesky_zarr"]["complete"] is True
    writer.close()  # waits for the last attempt
    assert [s for s, _ in writer.tiled_failures] == [str(store)]
    assert "bluesky-zarr register" in caplog.text

    # Registered later, it is the same run.
    assert main(["register", "--tiled", tiled_server.catalog_uri, "--api-key", API_KEY,
                 str(store)]) == 0
    run = tiled_server.catalog()[_uid(store)]
    _assert_same_as_zarr(run, Path(store))


def test_a_store_on_object_storage_is_registered_by_reference(
    tmp_path: Path, RE: RunEngine
) -> None:
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    s3 = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    host, port = s3.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="testing",
        aws_secret_access_key="testing", region_name="us-east-1",
    ).create_bucket(Bucket="runs")
    options = {"key": "testing", "secret": "testing", "endpoint_url": endpoint,
               "client_kwargs": {"region_name": "us-east-1"}}
    server = None
    try:
        # The bucket as the server's readable storage, with its credentials.
        server = TiledServer(tmp_path, object_storage={
            "uri": f"http://testing:testing@{host}:{port}/runs",
            "provider": "s3",
            "config": {"region": "us-east-1", "client_options": {"allow_http": True}},
        })
        wavelength, position, cam = _grid_setup()
        writer = ZarrWriter(
            "s3://runs/data", storage_options=options,
            tiled=server.catalog_uri, tiled_api_key=API_KEY,
        )
        RE.subscribe(writer)
        RE(grid_scan([cam], wavelength, 400, 700, 3, position, 0, 5, 4))
        (store,) = writer.stores
        writer.close()
        assert writer.tiled_failures == []
        uid = str(zarr.open_group(store, mode="r", storage_options=options).attrs["start"]["uid"])
        run = server.catalog()[uid]
        (source,) = run["primary"]["cam_image"].data_sources()
        key = str(store).partition("://")[2]
        assert [a.data_uri for a in source.assets] == [f"{endpoint}/{key}/primary/cam_image"]
        ds = run["primary"].read()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            expected = xr.open_zarr(store, group="primary", storage_options=options).load()
        xr.testing.assert_identical(ds, expected)
        assert_frames_match(
            ds, "cam_image", {"wavelength": "wavelength", "position": "position"}, SHAPE
        )
        assert _files_in(server.writable) == []
    finally:
        if server is not None:
            server.stop()
        s3.stop()


@pytest.mark.parametrize(
    "options",
    [
        {"tiled": 42},
        {"tiled": "ftp://example.org/"},
        {"tiled": "localhost:8000"},
        {"tiled_api_key": "secret"},
        {"tiled": "http://127.0.0.1:1", "tiled_api_key": ""},
        {"tiled": "http://127.0.0.1:1", "tiled_timeout": 0},
    ],
)
def test_bad_tiled_options_are_refused(tmp_path: Path, options: dict[str, Any]) -> None:
    with pytest.raises(OptionError, match="tiled"):
        ZarrWriter(tmp_path, **options)
