"""Runs registered with a Tiled server by reference, as Bluesky runs of xarray datasets.

The layout is the one Tiled's clients (``tiled.client``, databroker 2,
``bluesky-tiled-plugins``) expect of a run::

    <start uid>/           container, spec BlueskyRun 3.0, metadata {start, stop}
      primary/             container, spec xarray_dataset, metadata {attrs}
        cam_image          array, spec xarray_data_var, its dims, metadata {attrs}
        wavelength         array, spec xarray_coord
        _written           ...

Every array is registered as an external asset (``management="external"``,
mimetype ``application/x-zarr``, the array's directory or object URL): the
server reads the store where it is, nothing is copied. Registering is
idempotent: what Tiled already holds and still matches the store is left
alone; what changed (the stop document, arrays that grew or appeared) is
updated; what the store no longer holds (it was replaced) is removed.

A store replaced by another run (``overwrite=True``, same name) leaves the
old run's entry a record without data: its streams are removed (they would
read the new run's arrays), its start and stop documents stay, and its
``bluesky_zarr`` metadata says ``replaced: {"store": ..., "by": <new uid>}``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from .._errors import MissingDependencyError, OptionError, TiledError
from ..plan import json_safe
from ..storage import is_array, is_url, open_group, open_store

logger = logging.getLogger(__name__)

#: The run spec that ``bluesky-tiled-plugins``' TiledWriter gives a run (a
#: SQL-backed run: ``BlueskyRunV3`` on the client side).
RUN_SPEC = ("BlueskyRun", "3.0")
DATASET_SPEC = "xarray_dataset"
DATA_VAR_SPEC = "xarray_data_var"
COORD_SPEC = "xarray_coord"
ZARR_MIMETYPE = "application/x-zarr"

#: Seconds the end of a run waits for its final registration by default.
DEFAULT_TILED_TIMEOUT = 30.0


def _tiled() -> Any:
    try:
        import tiled.client  # noqa: F401
    except ImportError as err:
        raise MissingDependencyError(
            "registering runs with Tiled needs the Tiled client: "
            "pip install 'bluesky-zarr[tiled]'"
        ) from err
    import tiled

    return tiled


def connect(uri: str, api_key: str | None = None) -> Any:
    """A Tiled client node for ``uri``; the API key defaults to ``TILED_API_KEY``."""
    _tiled()
    from tiled.client import from_uri

    try:
        return from_uri(uri, api_key=api_key)
    except Exception as err:  # noqa: BLE001 - httpx, auth and server errors alike
        raise TiledError(f"cannot connect to the Tiled server {uri}: {err!r}") from err


def check_tiled_option(tiled: Any, api_key: Any) -> None:
    """Refuse a ``tiled=`` / ``tiled_api_key=`` pair that cannot work."""
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise OptionError(f"tiled_api_key= must be a non-empty string, got {api_key!r}")
    if tiled is None:
        if api_key is not None:
            raise OptionError("tiled_api_key= is given without tiled=")
        return
    if isinstance(tiled, str):
        parsed = urlparse(tiled)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise OptionError(
                f"tiled= must be a Tiled server URI (http://host:port/...) or a Tiled "
                f"client node, got {tiled!r}"
            )
        try:
            _tiled()
        except MissingDependencyError as err:
            raise OptionError(str(err)) from None
        return
    if not all(callable(getattr(tiled, name, None)) for name in ("new", "create_container")):
        raise OptionError(
            f"tiled= must be a Tiled server URI or a Tiled client container node "
            f"(from tiled.client.from_uri), got {tiled!r}"
        )
    if api_key is not None:
        raise OptionError(
            "tiled_api_key= applies to a tiled= URI; a Tiled client node carries its own "
            "credentials"
        )


# --------------------------------------------------------------------- layout
@dataclass
class Registration:
    """What registering one store did in Tiled."""

    #: The run's start uid: its key in the Tiled container.
    uid: str
    #: Nodes created and nodes updated, as ``uid/stream/array`` paths.
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    #: Arrays not registered, by path, and why (a data type Tiled cannot serve).
    skipped: dict[str, str] = field(default_factory=dict)
    #: Nodes removed because the store no longer holds them (it was replaced).
    removed: list[str] = field(default_factory=list)
    #: Uids of other runs registered from this store before it was replaced:
    #: their streams are removed, their entries kept as records.
    retired: list[str] = field(default_factory=list)
    #: The store the run was registered from before (``relocate=True``), if another.
    relocated_from: str | None = None

    @property
    def changed(self) -> bool:
        return bool(
            self.created or self.updated or self.removed or self.retired or self.relocated_from
        )


def store_uri(
    store: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> str:
    """The URI Tiled reads a store from.

    A local store is ``file:///...``. Tiled reads object storage over HTTP,
    as ``<endpoint>/<bucket>/<key>`` under a storage its configuration names
    (``s3://`` asset URIs are not among the schemes it serves): the endpoint is
    ``storage_options["endpoint_url"]`` or ``AWS_ENDPOINT_URL(_S3)``.
    """
    if is_url(store):
        url = str(store).rstrip("/")
        options = dict(storage_options or {})
        endpoint = (
            options.get("endpoint_url")
            or dict(options.get("client_kwargs") or {}).get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        if not endpoint:
            raise TiledError(
                f"{url}: Tiled reads object storage over http(s); give the endpoint "
                f"(storage_options endpoint_url, or AWS_ENDPOINT_URL) so that the "
                f"asset URIs name it"
            )
        return f"{str(endpoint).rstrip('/')}/{url.partition('://')[2]}"
    path = Path(store).absolute()
    # Tiled turns a file URI into a path without unquoting it: the path goes in as is.
    if any(c in str(path) for c in "?#"):
        raise TiledError(f"{path}: a path with '?' or '#' cannot be a Tiled asset URI")
    return "file://" + path.as_posix()


def _spec(name: str, version: str | None = None) -> Any:
    from tiled.structures.core import Spec

    return Spec(name, version=version)


def _has_spec(node: Any, name: str) -> bool:
    return any(spec.name == name for spec in node.specs)


def _chunks(array: Any) -> tuple[tuple[int, ...], ...]:
    """Tiled's blocks: the store's write units (shards, else chunks), so one
    request reads what one file holds."""
    unit = array.shards or array.chunks
    chunks: list[tuple[int, ...]] = []
    for size, step in zip(array.shape, unit):
        if size == 0:
            chunks.append((0,))
            continue
        step = max(1, min(int(step), size))
        blocks = [step] * (size // step)
        if size % step:
            blocks.append(size % step)
        chunks.append(tuple(blocks))
    return tuple(chunks)


def _data_source(array: Any, dims: tuple[str, ...], uri: str) -> Any:
    from tiled.structures.array import ArrayStructure, BuiltinDtype
    from tiled.structures.core import StructureFamily
    from tiled.structures.data_source import Asset, DataSource, Management

    dtype = np.dtype(array.dtype)
    structure = ArrayStructure(
        data_type=BuiltinDtype.from_numpy_dtype(dtype),
        chunks=_chunks(array),
        shape=tuple(int(s) for s in array.shape),
        dims=dims,
    )
    return DataSource(
        structure_family=StructureFamily.array,
        structure=structure,
        mimetype=ZARR_MIMETYPE,
        # Tiled's Zarr adapter reads the first asset's URI whatever its
        # number; its streaming messages (a subscriber's updates) require one.
        assets=[Asset(data_uri=uri, is_directory=True, parameter="data_uri", num=0)],
        management=Management.external,
    )


def _servable(array: Any) -> str | None:
    """Why Tiled cannot serve ``array`` as it is stored, or None if it can."""
    try:
        dtype = np.dtype(array.dtype)
    except TypeError:
        return f"its data type {array.dtype} has no numpy equivalent"
    if dtype.fields is not None or dtype.kind not in "biufcmMSU":
        return f"Tiled serves no arrays of data type {dtype}"
    return None


def _plain(node: Any) -> Any:
    """The plain container client of a node (a BlueskyRun client adds fallbacks)."""
    return getattr(node, "base", node)


def _child(parent: Any, key: str) -> Any | None:
    try:
        return _plain(parent)[key]
    except KeyError:
        return None


def _search(parent: Any, key: str, value: Any) -> Any:
    """The children of ``parent`` whose metadata ``key`` equals ``value``.

    A catalog of Bluesky runs (bluesky-tiled-plugins) rewrites a query's key to
    one of the start document; the plain container search does not.
    """
    from tiled.client.container import Container
    from tiled.queries import Eq

    query = Eq(key, value)
    if isinstance(parent, Container):
        return Container.search(parent, query)
    return parent.search(query)


def _points_into(node: Any, base_uri: str) -> bool:
    """Whether every data source of an array node (from a listing with data
    sources) references the store at ``base_uri``: a node this registered."""
    sources = node.data_sources() or []
    return bool(sources) and all(
        asset.data_uri.startswith(base_uri + "/")
        for source in sources
        for asset in source.assets
    )


def _ours(container: Any, base_uri: str) -> bool:
    """Whether every array below a stream container references the store."""
    listing = _plain(container).new_variation(include_data_sources=True)
    return all(_points_into(node, base_uri) for node in listing.values())


def _still_holds(uri: str, uid: str) -> bool | None:
    """Whether the store at a registered ``file://`` URI still holds run ``uid``
    (None: not a local store, or not readable from here)."""
    if not uri.startswith("file://"):
        return None
    root = Path(uri[len("file://"):]) / "zarr.json"
    try:
        attrs = json.loads(root.read_bytes()).get("attributes") or {}
    except FileNotFoundError:
        return False
    except (OSError, ValueError, AttributeError):
        return None
    start = attrs.get("start") if isinstance(attrs, Mapping) else None
    return isinstance(start, Mapping) and start.get("uid") == uid


def _elsewhere(uid: str, run: Any, store: str | os.PathLike[str]) -> TiledError:
    """Why a run Tiled holds from another store is not registered from ``store``."""
    info = run.metadata.get("bluesky_zarr") or {}
    registered_from = info.get("store")
    head = f"Tiled already holds a run with uid {uid!r}"
    relocate = "pass relocate=True (bluesky-zarr register --relocate)"
    if not _has_spec(run, RUN_SPEC[0]) or not isinstance(info, Mapping) or not info:
        return TiledError(
            f"{head} that is not a bluesky-zarr store (written by another tool, such as "
            f"TiledWriter); not registering {store}"
        )
    if registered_from is None:
        replaced = info.get("replaced") or {}
        return TiledError(
            f"{head}, kept as a record since its store {replaced.get('store')} was replaced "
            f"by run {replaced.get('by')}; to register it from {store}, {relocate}"
        )
    holds = _still_holds(str(registered_from), uid)
    if holds:
        return TiledError(
            f"{head}, registered from {registered_from}, which still holds it: {store} is "
            f"a copy; a run is registered from one store, not registering {store}"
        )
    where = (
        "which no longer holds it (the store moved or was deleted)"
        if holds is False
        else "which this machine cannot check"
    )
    return TiledError(
        f"{head}, registered from {registered_from}, {where}; to point the entry at "
        f"{store} instead, {relocate}"
    )


def _retire_replaced(parent: Any, uid: str, base_uri: str, report: Registration) -> None:
    """Other runs registered from this store no longer have their data there:
    remove their streams, keep their entries (start, stop) as records."""
    for key, old in list(_search(parent, "bluesky_zarr.store", base_uri).items()):
        if key == uid or not _has_spec(old, RUN_SPEC[0]):
            continue
        old = _plain(old)
        for name, stream in list(old.items()):
            if _has_spec(stream, DATASET_SPEC) and _ours(stream, base_uri):
                # Only the records go: external data is never deleted by Tiled.
                old.delete_contents([name], recursive=True, external_only=True)
        metadata = dict(old.metadata)
        info = dict(metadata.get("bluesky_zarr") or {})
        info.pop("store", None)
        info["replaced"] = {"store": base_uri, "by": uid}
        metadata["bluesky_zarr"] = info
        old.replace_metadata(metadata=metadata, drop_revision=True)
        report.retired.append(str(key))
        logger.info(
            "bluesky-zarr: run %s was registered from %s, which now holds run %s: "
            "its streams are removed from Tiled, its entry kept as a record",
            key, base_uri, uid,
        )


def _as_json(value: Any) -> Any:
    """``value`` as the server gives it back (dataclasses and tuples as JSON)."""
    import orjson
    from tiled.utils import safe_json_dump

    return orjson.loads(safe_json_dump(value))


def _same_metadata(node: Any, metadata: Mapping[str, Any]) -> bool:
    return bool(node.metadata == _as_json(dict(metadata)))


def _put_data_source(
    node: Any,
    data_source: Any,
    patch: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
) -> None:
    """Replace a node's (only) data source, as TiledWriter does when a stream
    grows; with ``patch`` (offset, shape), tell the node's subscribers that
    this region of the array was written (Tiled publishes it to them)."""
    from tiled.client.utils import handle_error, retry_context
    from tiled.utils import safe_json_dump

    data_source.id = node.data_sources()[0].id
    params = None
    if patch is not None:
        offset, shape = patch
        params = {
            "patch_offset": ",".join(str(int(n)) for n in offset),
            "patch_shape": ",".join(str(int(n)) for n in shape),
        }
    for attempt in retry_context():
        with attempt:
            handle_error(
                node.context.http_client.put(
                    node.uri.replace("/metadata/", "/data_source/", 1),
                    content=safe_json_dump({"data_source": data_source}),
                    params=params,
                )
            )


def register_store(
    parent: Any,
    store: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    relocate: bool = False,
) -> Registration:
    """Register (or bring up to date) one store as a BlueskyRun below ``parent``.

    Parameters
    ----------
    parent
        A Tiled client container node (``tiled.client.from_uri(...)``).
    store
        A bluesky-zarr store: a directory, or an ``s3://`` URL (with
        ``storage_options`` to read it here; the Tiled server reads it with its
        own configured credentials).
    relocate
        The run is registered from another store that no longer holds it (the
        store moved): point its entry at ``store``. Without it, such a run is
        refused.

    Other runs registered from this store's URI before it was replaced
    (``overwrite=True``) keep their entries as records without streams.

    Raises
    ------
    TiledError
        The store does not exist or is not a bluesky-zarr store, a run with its
        uid is registered from another store, or the server refused or could
        not be reached.
    """
    _tiled()
    try:
        return _register(parent, store, storage_options, relocate)
    except TiledError:
        raise
    except Exception as err:  # noqa: BLE001 - httpx, server and store errors alike
        raise TiledError(f"registering {store} with Tiled failed: {err!r}") from err


def _register(
    parent: Any,
    store: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None,
    relocate: bool = False,
) -> Registration:
    from ..storage import is_repository

    if is_repository(store, storage_options):
        raise TiledError(
            f"{store} is a run written with external='virtual' (an Icechunk repository): "
            f"Tiled reads Zarr arrays from their directories or objects, which such a "
            f"store does not have; read it with bluesky_zarr.open_virtual"
        )
    zstore = open_store(store, storage_options, read_only=True)
    try:
        root = open_group(zstore)
    except FileNotFoundError as err:
        if is_url(store) or not Path(store).exists():
            raise TiledError(f"{store}: no store there (moved or deleted?)") from err
        raise TiledError(f"{store} is not a Zarr V3 store: it has no zarr.json") from err
    except (ValueError, TypeError) as err:
        raise TiledError(f"{store} is not a Zarr V3 store: {err!r}") from err
    attrs: dict[str, Any] = dict(root.attrs.asdict())
    start = attrs.get("start")
    if not isinstance(start, Mapping) or not isinstance(start.get("uid"), str):
        raise TiledError(f"{store} is not a bluesky-zarr store: its root has no start document")
    uid = str(start["uid"])
    base_uri = store_uri(store, storage_options)
    info = dict(attrs.get("bluesky_zarr") or {})
    info["store"] = base_uri
    metadata: dict[str, Any] = {"start": start}
    if attrs.get("stop") is not None:
        metadata["stop"] = attrs["stop"]
    metadata["bluesky_zarr"] = info
    report = Registration(uid)

    run = _child(parent, uid)
    if run is None:
        # A new run in a store that held another one (overwrite=True): that
        # run's entry must stop reading this store's arrays first.
        _retire_replaced(parent, uid, base_uri, report)
        run = parent.create_container(
            key=uid, metadata=metadata, specs=[_spec(*RUN_SPEC)]
        )
        report.created.append(uid)
    else:
        info = run.metadata.get("bluesky_zarr") or {}
        registered_from = info.get("store") if isinstance(info, Mapping) else None
        if registered_from != base_uri:
            if not (relocate and _has_spec(run, RUN_SPEC[0]) and info):
                raise _elsewhere(uid, run, store)
            _retire_replaced(parent, uid, base_uri, report)
            # A run kept as a record names the store it was replaced in.
            replaced = info.get("replaced") if isinstance(info, Mapping) else None
            report.relocated_from = str(
                registered_from
                or (replaced.get("store") if isinstance(replaced, Mapping) else None)
                or "an unknown store"
            )
        if not _same_metadata(run, metadata):
            run.replace_metadata(metadata=metadata, drop_revision=True)
            report.updated.append(uid)
    run = _plain(run)

    streams = dict(sorted(root.groups()))
    for stream_name, group in streams.items():
        _register_stream(run, stream_name, group, zstore, base_uri, report)
    # Streams of the run the store no longer holds (a replaced store, or one
    # moved here from a store that had more). Looked for only when the run's
    # metadata changed: a run written again passes through a state (no stop
    # document, or a new one) that its old entry did not hold; a registration
    # of an open run every few seconds needs no listing more.
    if uid not in report.updated and not report.relocated_from:
        return report
    for name, node in list(run.items()):
        if name not in streams and _has_spec(node, DATASET_SPEC):
            if report.relocated_from or _ours(node, base_uri):
                run.delete_contents([name], recursive=True, external_only=True)
                report.removed.append(f"{uid}/{name}")
    return report


def _register_stream(
    run: Any, name: str, group: Any, zstore: Any, base_uri: str, report: Registration
) -> None:
    import xarray as xr

    path = f"{report.uid}/{name}"
    # What xr.open_zarr makes of the group: which arrays are coordinates, their
    # dims and attributes (nothing is read but metadata). Times are not
    # decoded: Tiled serves the float seconds stored, so their CF ``units``
    # and ``calendar`` stay in the attributes (xr.decode_cf on what Tiled's
    # client reads gives dates).
    with xr.open_zarr(zstore, group=name, chunks=None, decode_times=False) as ds:
        variables = {
            key: (
                tuple(str(d) for d in ds[key].dims),
                key in ds.coords,
                json_safe(ds[key].attrs),
            )
            for key in ds.variables
        }
        attrs = json_safe(ds.attrs)
    metadata = {"attrs": attrs}
    node = _child(run, name)
    if node is None:
        node = run.create_container(key=name, metadata=metadata, specs=[_spec(DATASET_SPEC)])
        report.created.append(path)
    elif not _same_metadata(node, metadata):
        node.replace_metadata(metadata=metadata, drop_revision=True)
        report.updated.append(path)
    from tiled.structures.core import StructureFamily

    # Every array already registered, with its data source, in one listing.
    registered = dict(_plain(node).new_variation(include_data_sources=True).items())
    # Arrays registered before that the group no longer holds (the store was
    # replaced): removed, so that the dataset reads what the store holds.
    for key in sorted(set(registered) - set(variables)):
        if _points_into(registered[key], base_uri) or report.relocated_from:
            node.delete_contents([key], external_only=True)
            report.removed.append(f"{path}/{key}")
    for key, (dims, is_coord, var_attrs) in sorted(variables.items()):
        array = group[key]
        if not is_array(array):  # xarray's variables are arrays
            continue
        why_not = _servable(array)
        if why_not is not None:
            report.skipped[f"{path}/{key}"] = why_not
            if key in registered:  # registered from the store this one replaced
                node.delete_contents([key], external_only=True)
                report.removed.append(f"{path}/{key}")
            continue
        data_source = _data_source(array, dims, f"{base_uri}/{name}/{key}")
        specs = [_spec(COORD_SPEC if is_coord else DATA_VAR_SPEC)]
        var_metadata = {"attrs": var_attrs}
        existing = registered.get(key)
        if existing is not None and [a.data_uri for a in existing.data_sources()[0].assets] != [
            a.data_uri for a in data_source.assets
        ]:
            # Another store's array (the run moved): a data source's assets are
            # added to, never replaced, by Tiled; the node is made again.
            node.delete_contents([key], external_only=True)
            existing = None
        if existing is None:
            node.new(
                StructureFamily.array,
                [data_source],
                key=key,
                metadata=var_metadata,
                specs=specs,
            )
            report.created.append(f"{path}/{key}")
            continue
        changed = False
        current = existing.data_sources()[0]
        if _as_json(current.structure) != _as_json(data_source.structure):
            _put_data_source(existing, data_source)
            changed = True
        if not _same_metadata(existing, var_metadata) or [s.name for s in existing.specs] != [
            s.name for s in specs
        ]:
            existing.replace_metadata(metadata=var_metadata, specs=specs, drop_revision=True)
            changed = True
        if changed:
            report.updated.append(f"{path}/{key}")


# ------------------------------------------------------------ the live writer


#: Seconds a look at whether Tiled's port takes connections waits at most.
PROBE_TIMEOUT = 1.0

#: Seconds ``close()`` waits, once it has cancelled what is left, for the
#: registration thread to end: a retry's pause of Tiled's client (at most
#: about 6 s) and the end of a request already bounded by its deadline.
CANCEL_GRACE = 10.0


class _GaveUp(TiledError):
    """A registration stopped at its deadline, or at ``close()``."""


class _Bound:
    """An httpx request hook bounding the requests of the registrar's thread:
    none starts after the deadline of the registration it serves (nor after
    ``close()``), and each waits at most until that deadline (its timeouts
    are cut to what is left). Requests of other threads pass untouched (a
    client node given by the caller may serve it elsewhere too)."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.deadline: float | None = None
        self.cancelled = False

    def left(self) -> float | None:
        """Seconds left to the current registration (None: no bound); raises
        :class:`_GaveUp` when none are."""
        if self.cancelled:
            raise _GaveUp("the writer was closed before the registration finished")
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _GaveUp("the registration did not finish in time")
        return left

    def __call__(self, request: Any) -> None:
        if threading.current_thread() is not self.thread:
            return
        left = self.left()
        if left is None:
            return
        timeout = dict(request.extensions.get("timeout") or {})
        request.extensions["timeout"] = {
            phase: left if value is None else min(float(value), left)
            for phase, value in (
                timeout or dict.fromkeys(("connect", "read", "write", "pool"))
            ).items()
        }


def diagnose(uri: str, waited: float) -> str:
    """Why a Tiled server did not answer, as its port tells now (at most
    :data:`PROBE_TIMEOUT` seconds)."""
    parsed = urlparse(uri)
    host = parsed.hostname or "localhost"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT):
            pass
    except ConnectionRefusedError:
        return f"connection refused at {host}:{port}: the Tiled server is down"
    except OSError as err:
        return f"{host}:{port} takes no connection ({err}): the Tiled server is unreachable"
    return (
        f"the Tiled server at {host}:{port} takes connections but did not answer within "
        f"{waited:.0f} s: hung or overloaded"
    )


def _split_uri(uri: str) -> tuple[str, list[str]]:
    """A Tiled URI's API root (``.../api/v1``) and the path of its node below,
    as Tiled's client finds them."""
    parsed = urlparse(uri)
    path, parts = parsed.path, []
    if "/metadata" in path:
        path, _, node = path.partition("/metadata")
        parts = [segment for segment in node.split("/") if segment]
    elif "/api" not in path:
        path = path.rstrip("/") + "/api/v1"
    elif "/v1" not in path:
        path = path.rstrip("/") + "/v1"
    return parsed._replace(path=path, query="", fragment="").geturl(), parts


def _connect_bounded(uri: str, api_key: str | None, timeout: float, bound: _Bound) -> Any:
    """A client node for ``uri`` whose every request, from the first, ``bound``
    bounds (``timeout``: the longest any request waits).

    Tiled's client retries a request that fails for up to 45 s, also the
    ones it makes while it connects: its HTTP client gets the hook as soon
    as it is made, before those requests. (The probe ``from_uri`` makes for a
    redirect from http to https is left out: the URI is used as given.)
    """
    import httpx

    _tiled()
    from tiled.client import from_context
    from tiled.client.context import Context

    class BoundedContext(Context):
        """Tiled's context, its HTTP client hooked from the start."""

        @property
        def http_client(self) -> Any:
            return self.__dict__["http_client"]

        @http_client.setter
        def http_client(self, client: Any) -> None:
            if bound not in client.event_hooks["request"]:
                client.event_hooks["request"].append(bound)
            self.__dict__["http_client"] = client

    api_uri, parts = _split_uri(uri)
    context = None
    try:
        context = BoundedContext(api_uri, api_key=api_key, timeout=httpx.Timeout(timeout))
        return from_context(context, node_path_parts=parts)
    except Exception as err:  # noqa: BLE001 - httpx, auth and server errors alike
        if context is not None:
            context.close()
        raise TiledError(f"cannot connect to the Tiled server {uri}: {err!r}") from err


def _gave_up(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is a :class:`_GaveUp`, or a timeout."""
    import httpx

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, (_GaveUp, httpx.TimeoutException)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class TiledRegistrar:
    """Registers a writer's runs with Tiled on a thread of its own.

    The RunEngine never waits for Tiled, except at the end of a run, for at
    most ``timeout`` seconds, so that a finished run is in Tiled when the scan
    returns (not while the last registration failed: runs do not stall one
    after another while Tiled is down). Open runs are registered again every
    ``interval`` seconds, so that streams that grow show their new points.

    Failures are known when the wait ends: a run whose registration did not
    finish by then is in :attr:`failures` with why (the server's error, or
    what its port tells: refused, or taking connections and not answering),
    logged once per store until it succeeds again; the store is written all
    the same, and ``bluesky-zarr register`` registers it later. Each
    registration is bounded by its deadline (``timeout`` after it was asked
    for): no request of it starts later, and each waits at most until then.
    :meth:`close` waits for the registrations asked for until their
    deadlines, cancels the rest, and ends the thread.

    Live readers: after each registration of an open run (so at most once
    per ``interval``, the writer's flush interval), every array written to
    since the last one has its data source updated with the region written
    (Tiled's ``patch_offset`` and ``patch_shape``: the bounding box of the
    blocks that reached the disk), which a Tiled server with a streaming
    cache publishes to the array's websocket subscribers (``node.subscribe()``
    in Tiled's client) in the order it was written. When the run ends, after
    its last regions, every array's stream is closed: subscribers learn that
    nothing more comes.
    """

    def __init__(
        self,
        target: Any,
        *,
        api_key: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        timeout: float = DEFAULT_TILED_TIMEOUT,
        interval: float | None = None,
    ) -> None:
        self._target = target
        self._api_key = api_key
        self._storage_options = dict(storage_options or {})
        self.timeout = timeout
        self.interval = interval
        self._node: Any = None if isinstance(target, str) else target
        self._failures: dict[str, str] = {}
        #: Whether the last registration reached Tiled, and else why not.
        self._reachable = True
        self._last_error = ""
        self._open: dict[str, None] = {}
        #: Per store written by this writer: what its run wrote since the
        #: last look (``RunWriter.take_written_regions``), and the Tiled nodes
        #: of its arrays, looked up once.
        self._regions: dict[str, Callable[[], list[Any]]] = {}
        self._array_nodes: dict[str, dict[str, Any]] = {}
        #: Stores asked for: the events their waiters wait on, and the
        #: latest deadline among them.
        self._pending: dict[str, tuple[list[threading.Event], float]] = {}
        #: The store being registered now.
        self._current: str | None = None
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        #: Bounds the requests of the thread (one hook on the client, for
        #: every thread the registrar starts).
        self._bound = _Bound()
        #: The caller's client node whose requests ``_bound`` hooks into.
        self._hooked: Any = None

    @property
    def uri(self) -> str:
        return self._target if isinstance(self._target, str) else str(self._target.uri)

    @property
    def failures(self) -> list[tuple[str, str]]:
        """``(store, error)`` of each store not registered (its last
        registration failed, or did not finish in time)."""
        with self._changed:
            return list(self._failures.items())

    def opened(
        self,
        store: Path | str | None,
        regions: Callable[[], list[Any]] | None = None,
    ) -> None:
        """A run's store exists or has a new stream: register it soon;
        ``regions`` gives what the run wrote since it was last called (its
        subscribers are told)."""
        if store is not None:
            with self._changed:
                self._open[str(store)] = None
                if regions is not None:
                    self._regions[str(store)] = regions
            self.request(store)

    def finish(self, store: Path | str | None) -> bool:
        """Register a finished run's store and wait for it (up to ``timeout``)."""
        if store is None:
            return True
        with self._changed:
            self._open.pop(str(store), None)
        return self.sync(store)

    def sync(self, store: Path | str) -> bool:
        """Register ``store`` now and wait for it, up to ``timeout`` (not at all
        while Tiled is known to be down: runs do not stall one after another).
        Returns whether it is registered; if not, :attr:`failures` says why."""
        with self._changed:
            wait = self.timeout if self._reachable else 0.0
        if self.request(store).wait(wait):
            with self._changed:
                return str(store) not in self._failures
        if wait:
            reason = f"not registered within {wait:.0f} s: {diagnose(self.uri, wait)}"
        else:
            reason = (
                f"not registered: the last attempt failed ({self._last_error}); it is "
                f"tried again in the background"
            )
        self._fail(str(store), reason)
        return False

    def request(self, store: Path | str) -> threading.Event:
        """Register ``store`` in the background; the event is set when done."""
        done = threading.Event()
        deadline = time.monotonic() + self.timeout
        refused = None
        with self._changed:
            waiting, latest = self._pending.get(str(store), ([], deadline))
            waiting.append(done)
            self._pending[str(store)] = (waiting, max(latest, deadline))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._work, name="bluesky-zarr-tiled", daemon=True
                )
                # A writer closed before takes runs again (Tiled is asked anew).
                self._bound.thread, self._bound.cancelled = self._thread, False
                try:
                    self._thread.start()
                except RuntimeError as err:
                    # Python 3.12 starts no thread in atexit handlers (where
                    # interrupted runs are finished): registered later, by hand.
                    self._thread = None
                    refused, _ = self._pending.pop(str(store))
                    reason = f"no thread can register it while Python exits ({err})"
            if refused is None:
                self._changed.notify()
        if refused is not None:
            self._fail(str(store), reason)
            for event in refused:
                event.set()
        return done

    def _work(self) -> None:
        while True:
            with self._changed:
                if not self._pending and self._open and self.interval is not None:
                    self._changed.wait(self.interval)
                todo: list[tuple[str, float | None]]
                if self._pending:
                    store = next(iter(self._pending))
                    waiting, deadline = self._pending.pop(store)
                    todo = [(store, deadline)]
                elif self._open and self.interval is not None:
                    # Nothing asked for: bring the open runs up to date.
                    waiting = []
                    todo = [(store, None) for store in self._open]
                else:
                    # Idle: the next request starts a new thread.
                    self._thread = None
                    return
            for store, until in todo:
                self._register(store, until)
            for done in waiting:
                done.set()

    def close(self) -> None:
        """Wait for the registrations asked for (each until its deadline),
        cancel what is left, end the thread, then close the connection this
        made. Every store not registered by then is in :attr:`failures`."""
        with self._changed:
            self._open.clear()
            thread = self._thread
            deadlines = [deadline for _, deadline in self._pending.values()]
            if self._current is not None and self._bound.deadline is not None:
                deadlines.append(self._bound.deadline)
            self._changed.notify_all()
        if thread is not None:
            thread.join(max(0.0, max(deadlines, default=0.0) - time.monotonic()))
        with self._changed:
            self._bound.cancelled = True
            unfinished = list(self._pending) + [s for s in [self._current] if s is not None]
        if thread is not None:
            thread.join(CANCEL_GRACE)
        if unfinished:
            why = diagnose(self.uri, self.timeout)
            for store in unfinished:
                with self._changed:
                    known = store in self._failures
                if not known:
                    self._fail(store, f"not registered before the writer closed: {why}")
        if thread is not None and thread.is_alive():
            logger.error(
                "bluesky-zarr: the Tiled registration thread is still waiting on %s after "
                "close(); its request ends at its timeout", self.uri,
            )
            return
        if self._hooked is not None:
            with contextlib.suppress(ValueError):
                self._hooked.context.http_client.event_hooks["request"].remove(self._bound)
            self._hooked = None
        if isinstance(self._target, str) and self._node is not None:
            self._node.context.close()
            self._node = None

    def _fail(self, store: str, reason: str) -> None:
        """Record why ``store`` is not registered; logged once until it is."""
        with self._changed:
            known = store in self._failures
            self._failures[store] = reason
            self._reachable = False
            self._last_error = reason
        if not known:
            logger.warning(
                "bluesky-zarr: %s could not be registered with Tiled (%s); the store "
                "is written all the same; register it later with: bluesky-zarr "
                "register --tiled %s %s",
                store, reason, self.uri, store,
            )

    def _register(self, store: str, deadline: float | None) -> None:
        bound = self._bound
        with self._changed:
            self._current = store
            bound.deadline = time.monotonic() + self.timeout if deadline is None else deadline
        try:
            if self._node is None:
                self._node = _connect_bounded(self.uri, self._api_key, self.timeout, bound)
            elif self._hooked is None and not isinstance(self._target, str):
                # The caller's node: its requests from this thread are bounded too.
                self._node.context.http_client.event_hooks["request"].append(bound)
                self._hooked = self._node
            bound.left()
            report = register_store(self._node, store, storage_options=self._storage_options)
            self._tell_subscribers(store, report.uid)
        except Exception as err:  # noqa: BLE001 - the data is safe; say so and go on
            if bound.cancelled:
                return  # close() says why, once for every store it cancelled
            if _gave_up(err):
                reason = f"not registered: {diagnose(self.uri, self.timeout)}"
            else:
                reason = str(err)
            self._fail(store, reason)
        else:
            with self._changed:
                self._failures.pop(store, None)
                self._reachable = True
        finally:
            with self._changed:
                self._current = None
                bound.deadline = None

    def _tell_subscribers(self, store: str, uid: str) -> None:
        """Update the data source of every array written to since the last
        time with the region written (Tiled tells its subscribers); when the
        run has ended, close the streams of its arrays."""
        with self._changed:
            source = self._regions.get(store)
            ended = store not in self._open
        if source is None:
            return
        nodes = self._array_nodes.setdefault(store, {})
        base_uri = store_uri(store, self._storage_options)
        try:
            for array, offset, shape in source():
                if _servable(array) is not None or 0 in shape:
                    continue  # not registered (its data type), or nothing written
                node = nodes.get(array.path)
                if node is None:
                    node = nodes[array.path] = self._array_node(uid, array.path)
                if node is None:
                    continue  # its stream is not registered yet
                dims = tuple(array.metadata.dimension_names or ())
                data_source = _data_source(array, dims, f"{base_uri}/{array.path}")
                _put_data_source(node, data_source, patch=(offset, shape))
            if ended:
                self._close_streams(uid)
        finally:
            if ended:
                with self._changed:
                    self._regions.pop(store, None)
                self._array_nodes.pop(store, None)

    def _array_node(self, uid: str, path: str) -> Any | None:
        """The Tiled node (with its data sources) of the array at ``path``
        (``stream/key``) of run ``uid``, or None if it is not registered."""
        node = _child(self._node, uid)
        for part in path.split("/"):
            if node is None:
                return None
            node = _child(node, part)
        return None if node is None else node.include_data_sources()

    def _close_streams(self, uid: str) -> None:
        """Close the stream of every array of a run that ended."""
        run = _child(self._node, uid)
        if run is None:
            return
        for stream in _plain(run).values():
            if _has_spec(stream, DATASET_SPEC):
                for array in _plain(stream).values():
                    array.close_stream()
