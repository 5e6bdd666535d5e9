"""Runs registered with a real Tiled server, by reference, and read back through it."""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
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
    of its configuration); with ``cache`` (a Redis URI), a streaming cache
    that publishes updates to websocket subscribers."""

    def __init__(
        self,
        base: Path,
        object_storage: dict[str, Any] | None = None,
        cache: str | None = None,
    ) -> None:
        self.stores = base / "stores"  # readable by the server: the stores live here
        self.stores.mkdir()
        self.writable = base / "tiled-data"  # its own storage: must stay empty
        self.writable.mkdir()
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        catalog = str(base / "catalog.db")
        if object_storage is None and cache is None:
            serve = ["catalog", catalog, "--init", "-w", str(self.writable),
                     "-r", str(self.stores), "--api-key", API_KEY]
        else:
            config: dict[str, Any] = {
                "authentication": {"single_user_api_key": API_KEY},
                "trees": [{"path": "/", "tree": "catalog", "args": {
                    "uri": f"sqlite:///{catalog}",
                    "init_if_not_exists": True,
                    "writable_storage": [str(self.writable)],
                    "readable_storage": [object_storage or str(self.stores)],
                }}],
            }
            if cache is not None:
                # A streaming cache publishes updates to websocket subscribers.
                # (Through the configuration: tiled 0.2.20's `serve catalog
                # --cache` fails with an UnboundLocalError.)
                config["streaming_cache"] = {"uri": cache}
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
    """The stream read through Tiled is the stream xarray opens from the store
    (Tiled serves the stored values: CF decoding, of ``time``, is the reader's)."""
    through_tiled = run[stream].read()
    assert through_tiled["time"].dtype == np.float64
    assert through_tiled["time"].attrs["units"] == "seconds since 1970-01-01T00:00:00Z"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded = xr.decode_cf(through_tiled)
    xr.testing.assert_identical(decoded, open_stream(store, stream))
    return decoded


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
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ds = xr.decode_cf(run["primary"].read())  # CF time, decoded by the reader
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


# ------------------------------------------------- replay and serve with --tiled
MOTORS_AT = {"wavelength": "wavelength", "position": "position"}


def test_replay_with_tiled_registers_each_run(
    tiled_server: TiledServer,
    root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import suitcase.jsonl

    wavelength, position, cam = _grid_setup()
    documents: list[tuple[str, dict[str, Any]]] = []
    RunEngine({})(
        grid_scan([cam], wavelength, 400, 700, 3, position, 0, 5, 4, snake_axes=True),
        lambda name, doc: documents.append((name, doc)),
        scan_id=31,
    )
    (recorded,) = suitcase.jsonl.export(documents, tmp_path, file_prefix="grid")["all"]
    # The API key from the environment, as a facility's service sets it.
    monkeypatch.setenv("TILED_API_KEY", API_KEY)
    code = main(["replay", str(recorded), "--out", str(root), "--no-progress",
                 "--tiled", tiled_server.catalog_uri])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "12 of 12 points written, success" in captured.out
    (store,) = root.glob("*.zarr")

    run = tiled_server.catalog()[documents[0][1]["uid"]]
    assert run.metadata["stop"]["exit_status"] == "success"
    ds = _assert_same_as_zarr(run, store)
    assert ds["cam_image"].dims == ("wavelength", "position", "y", "x")
    assert assert_frames_match(ds, "cam_image", MOTORS_AT, SHAPE) == 12
    assert list(tiled_server.catalog().search(Key("scan_id") == 31)) == [run.item["id"]]

    # Tiled unreachable: the run is written all the same; exit status 1 and
    # the command that registers it later.
    import tiled.client.utils

    monkeypatch.setattr(tiled.client.utils, "TILED_RETRY_ATTEMPTS", 1)  # fail fast
    nobody = f"http://127.0.0.1:{_free_port()}"
    code = main(["replay", str(recorded), "--out", str(tmp_path / "down"), "--no-progress",
                 "--tiled", nobody])
    captured = capsys.readouterr()
    assert code == 1
    assert "12 of 12 points written, success" in captured.out
    (down,) = (tmp_path / "down").glob("*.zarr")
    assert f"register them with: bluesky-zarr register --tiled {nobody} {down}" in captured.err
    assert assert_frames_match(open_stream(down), "cam_image", MOTORS_AT, SHAPE) == 12

    # A key without a server is refused before anything is written.
    with pytest.raises(SystemExit):
        main(["replay", str(recorded), "--out", str(tmp_path / "none"),
              "--tiled-api-key", API_KEY])
    assert "--tiled-api-key is given without --tiled" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


PROXY = """
from bluesky.callbacks.zmq import Proxy
proxy = Proxy(in_address="tcp://127.0.0.1", out_address="tcp://127.0.0.1")
print(proxy.in_port, proxy.out_port, flush=True)
proxy.start()
"""


def _lines(pipe: Any) -> Any:
    """The lines of a subprocess's pipe, read on a thread, as a queue."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        with pipe:
            for line in pipe:
                lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def _wait_for(lines: Any, seen: list[str], pattern: str, timeout: float) -> re.Match[str] | None:
    regex = re.compile(pattern)
    for line in seen:
        if match := regex.search(line):
            return match
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            return None
        if line is None:
            return None
        seen.append(line)
        if match := regex.search(line):
            return match
    return None


def _kill(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


def test_serve_with_tiled_registers_runs_published_through_the_0mq_proxy(
    tiled_server: TiledServer, root: Path
) -> None:
    from bluesky.callbacks.zmq import Publisher
    from ophyd.sim import det

    proxy = subprocess.Popen([sys.executable, "-c", PROXY], stdout=subprocess.PIPE, text=True)
    service = None
    try:
        match = _wait_for(_lines(proxy.stdout), [], r"tcp://(\S+) tcp://(\S+)", 60)
        assert match, "the 0MQ proxy did not start"
        inbound, outbound = match.group(1), match.group(2)
        src = str(Path(__file__).resolve().parents[1] / "src")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [src, *filter(None, [os.environ.get("PYTHONPATH")])]
        )}
        service = subprocess.Popen(
            [sys.executable, "-m", "bluesky_zarr._cli", "serve", "--zmq", outbound,
             "--out", str(root), "--tiled", tiled_server.catalog_uri,
             "--tiled-api-key", API_KEY],
            stderr=subprocess.PIPE, text=True, env=env,
        )
        lines, seen = _lines(service.stderr), []
        assert _wait_for(lines, seen, "registering them with Tiled at", 60), "\n".join(seen)

        RE = RunEngine({}, call_returns_result=False)
        publisher = Publisher(inbound)
        try:
            # 0MQ drops messages until both subscriptions are up: short runs until one arrives.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                (first,) = RE(count([det]), publisher)
                if _wait_for(lines, seen, f"run {first} stopped", 10.0):
                    break
            else:
                pytest.fail("the service never received a run:\n" + "\n".join(seen))
            wavelength, position, cam = _grid_setup()
            (uid,) = RE(
                grid_scan([cam], wavelength, 400, 700, 3, position, 0, 5, 4, snake_axes=True),
                publisher,
            )
            started = _wait_for(lines, seen, rf"run {uid} started \(scan_id \d+\): writing (\S+)",
                                60)
            # The service logs the stop once the run is registered.
            assert started and _wait_for(lines, seen, rf"run {uid} stopped \(success\)", 60), (
                "\n".join(seen)
            )
        finally:
            publisher.close()
        store = Path(started.group(1))
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=60) == 0
        _wait_for(lines, seen, "stopped on SIGTERM", 10)
        text = "\n".join(seen)
        assert "Traceback" not in text and "not registered" not in text, text
    finally:
        if service is not None:
            _kill(service)
        _kill(proxy)

    catalog = tiled_server.catalog()
    run = catalog[uid]
    assert run.metadata["stop"]["exit_status"] == "success"
    ds = _assert_same_as_zarr(run, store)
    assert assert_frames_match(ds, "cam_image", MOTORS_AT, SHAPE) == 12
    assert first in catalog  # the first short run too: every run written is registered


# ------------------------------------------------------ replaced and moved stores
def test_a_store_replaced_by_a_new_run_leaves_the_old_entry_without_data(
    tiled_server: TiledServer, root: Path, RE: RunEngine, capsys: pytest.CaptureFixture[str]
) -> None:
    wavelength, position, cam = _grid_setup()
    (sample,) = motors("sample_z")
    RE.preprocessors.append(SupplementalData(baseline=[sample]))
    options: dict[str, Any] = {"name_template": "scan-{scan_id}", "overwrite": True}
    tiled = {"tiled": tiled_server.catalog_uri, "tiled_api_key": API_KEY}
    catalog = tiled_server.catalog()

    # The first run, registered from scan-7.zarr.
    writer = ZarrWriter(root, **options, **tiled)
    token = RE.subscribe(writer)
    RE(grid_scan([cam], wavelength, 400, 700, 3, position, 0, 5, 4), scan_id=70707)
    (store,) = writer.stores
    first = _uid(store)
    assert sorted(catalog[first]) == ["baseline", "primary"]
    backup = root / "backup" / store.name
    shutil.copytree(store, backup)

    # A second run of the same name replaces the store, and its entry.
    RE(grid_scan([cam], wavelength, 400, 700, 2, position, 0, 5, 5), scan_id=70707)
    writer.close()
    RE.unsubscribe(token)
    assert writer.tiled_failures == []
    second = _uid(store)
    assert second != first
    old = catalog[first]
    assert list(old) == []  # nothing reads the new run's arrays as the old run's
    assert old.metadata["start"]["uid"] == first  # kept as a record
    assert old.metadata["stop"]["exit_status"] == "success"
    info = old.metadata["bluesky_zarr"]
    assert "store" not in info
    assert info["replaced"] == {"store": f"file://{store}", "by": second}
    new = catalog[second]
    ds = _assert_same_as_zarr(new, store)
    assert ds.sizes["wavelength"] == 2 and ds.sizes["position"] == 5
    assert assert_frames_match(ds, "cam_image", MOTORS_AT, SHAPE) == 10
    assert sorted(catalog.search(Key("scan_id") == 70707)) == sorted([first, second])
    assert _files_in(tiled_server.writable) == []

    # The old run kept elsewhere (a backup): registered from there on request only.
    command = ["register", "--tiled", tiled_server.catalog_uri, "--api-key", API_KEY]
    assert main([*command, str(backup)]) == 1
    err = capsys.readouterr().err
    assert f"kept as a record since its store file://{store} was replaced by run {second}" in err
    assert "--relocate" in err
    assert main([*command, "--relocate", str(backup)]) == 0
    assert f"moved here from file://{store}" in capsys.readouterr().out
    restored = catalog[first]
    assert restored.metadata["bluesky_zarr"]["store"] == f"file://{backup}"
    assert "replaced" not in restored.metadata["bluesky_zarr"]
    ds = _assert_same_as_zarr(restored, backup)
    assert assert_frames_match(ds, "cam_image", MOTORS_AT, SHAPE) == 12
    _assert_same_as_zarr(restored, backup, "baseline")

    # Replaced by a writer without Tiled: `register` retires the old entry, says so.
    RE.preprocessors.clear()  # this run has no baseline stream
    plain = ZarrWriter(root, **options)
    RE.subscribe(plain)
    RE(grid_scan([cam], wavelength, 400, 700, 4, position, 0, 5, 2), scan_id=70707)
    third = _uid(store)
    assert main(["register", "--tiled", tiled_server.catalog_uri, "--api-key", API_KEY,
                 str(store)]) == 0
    out = capsys.readouterr().out
    assert f"run {second}, registered from this store before it was replaced" in out
    assert list(catalog[second]) == []
    assert catalog[second].metadata["bluesky_zarr"]["replaced"]["by"] == third
    new = catalog[third]
    assert list(new) == ["primary"]
    ds = _assert_same_as_zarr(new, store)
    assert assert_frames_match(ds, "cam_image", MOTORS_AT, SHAPE) == 8


def test_the_same_run_written_again_drops_what_the_new_store_lacks(
    tiled_server: TiledServer, root: Path, RE: RunEngine
) -> None:
    wavelength, position, cam = _grid_setup()
    (sample,) = motors("sample_z")
    RE.preprocessors.append(SupplementalData(baseline=[sample]))
    documents: list[tuple[str, dict[str, Any]]] = []
    RE.subscribe(lambda name, doc: documents.append((name, doc)))
    RE(grid_scan([cam], wavelength, 400, 700, 3, position, 0, 5, 4))
    uid = documents[0][1]["uid"]
    tiled = {"tiled": tiled_server.catalog_uri, "tiled_api_key": API_KEY}

    writer = ZarrWriter(root, **tiled)
    for name, doc in documents:
        writer(name, doc)
    writer.close()
    assert sorted(tiled_server.catalog()[uid]) == ["baseline", "primary"]

    # Written again over its store, without the baseline stream.
    baseline = {doc["uid"] for name, doc in documents
                if name == "descriptor" and doc["name"] == "baseline"}
    again = ZarrWriter(root, overwrite=True, **tiled)
    for name, doc in documents:
        if doc.get("uid") in baseline or doc.get("descriptor") in baseline:
            continue
        again(name, doc)
    again.close()
    assert again.tiled_failures == []
    (store,) = again.stores
    run = tiled_server.catalog()[uid]
    assert list(run) == ["primary"]
    ds = _assert_same_as_zarr(run, Path(store))
    assert assert_frames_match(ds, "cam_image", MOTORS_AT, SHAPE) == 12


def test_register_a_moved_store_says_so_and_relocates_on_request(
    tiled_server: TiledServer, root: Path, RE: RunEngine, capsys: pytest.CaptureFixture[str]
) -> None:
    wavelength, position, cam = _grid_setup()
    writer = ZarrWriter(root, tiled=tiled_server.catalog_uri, tiled_api_key=API_KEY)
    RE.subscribe(writer)
    RE(grid_scan([cam], wavelength, 400, 700, 3, position, 0, 5, 4))
    writer.close()
    (store,) = writer.stores
    uid = _uid(store)
    command = ["register", "--tiled", tiled_server.catalog_uri, "--api-key", API_KEY]

    # A copy beside it: the run stays registered from the original.
    copy = root / "copy.zarr"
    shutil.copytree(store, copy)
    assert main([*command, str(copy)]) == 1
    assert f"which still holds it: {copy} is a copy" in capsys.readouterr().err
    shutil.rmtree(copy)

    moved = root / "moved" / Path(store).name
    moved.parent.mkdir()
    shutil.move(store, moved)
    assert main([*command, str(store)]) == 1
    assert "no store there (moved or deleted?)" in capsys.readouterr().err
    assert main([*command, str(moved)]) == 1
    err = capsys.readouterr().err
    assert f"registered from file://{store}, which no longer holds it" in err
    assert "--relocate" in err

    assert main([*command, "--relocate", str(moved)]) == 0
    assert f"moved here from file://{store}" in capsys.readouterr().out
    run = tiled_server.catalog()[uid]
    assert run.metadata["bluesky_zarr"]["store"] == f"file://{moved}"
    (source,) = run["primary"]["cam_image"].data_sources()
    assert [a.data_uri for a in source.assets] == [f"file://{moved}/primary/cam_image"]
    ds = _assert_same_as_zarr(run, moved)
    assert assert_frames_match(ds, "cam_image", MOTORS_AT, SHAPE) == 12
    # Registered where it is now, it is up to date.
    assert main([*command, str(moved)]) == 0
    assert "unchanged" in capsys.readouterr().out
