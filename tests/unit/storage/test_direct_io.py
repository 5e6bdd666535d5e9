"""Whole write units written directly are the files zarr-python writes.

:class:`~bluesky_zarr.storage._shards.DirectWriter` encodes complete write units itself
and writes each chunk or shard file in one call, bypassing zarr-python's
write path. Its promise is that the files are byte for byte the ones
zarr-python writes for the same data. Checked here twice over:

- array by array: the same region written with ``array[region] = data`` in
  one store and with ``DirectWriter.write`` in another (random shapes, chunks,
  shards past the array's edge, dtypes of both byte orders, Blosc settings,
  index at the start or the end), every file compared, and the result read
  back with zarr-python and with tensorstore;
- scan by scan: a grid scan through a RunEngine into a ZarrWriter (counting
  that the direct path was taken), its frames compared with the camera's,
  tensorstore reading what zarr-python reads, and the same documents written
  again with the direct path disabled giving identical chunk files.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import tempfile
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import tensorstore
import zarr
from bluesky import RunEngine
from bluesky.plans import grid_scan
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from ophyd.sim import SynSignal, det
from zarr.codecs import BloscCodec, BytesCodec, GzipCodec, ZstdCodec
from zarr.storage import LocalStore

import bluesky_zarr.storage._files
from bluesky_zarr import ZarrWriter
from bluesky_zarr.sim import PointCamera, motors
from bluesky_zarr.storage._files import LocalFiles
from bluesky_zarr.storage._metadata import ArrayNode
from bluesky_zarr.storage._shards import DirectWriter
from bluesky_zarr.storage._spec import ArrayMetadata
from bluesky_zarr.storage._zarr import LocalFilesStore
from bluesky_zarr.write._buffer import BlockBuffer

from conftest import assert_frames_match, epoch_seconds, open_stream

with warnings.catch_warnings():
    # Hypothesis imports libcst to print a patch for a failing example; the
    # DeprecationWarning libcst raises on import would, under
    # filterwarnings=error, turn a failing example into a pytest INTERNALERROR.
    warnings.simplefilter("ignore", DeprecationWarning)
    with contextlib.suppress(ImportError):
        import libcst  # noqa: F401

Docs = list[tuple[str, dict[str, Any]]]

# ------------------------------------------------------------- array level

#: Compressor settings of the arrays compared (``None``: uncompressed).
COMPRESSORS: dict[str, Any] = {
    "none": None,
    "blosc-lz4-bitshuffle": BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
    "blosc-zstd-shuffle-blocksize": BloscCodec(
        cname="zstd", clevel=3, shuffle="shuffle", blocksize=64
    ),
    "blosc-clevel-0": BloscCodec(cname="lz4", clevel=0, shuffle="shuffle"),
    # Shuffle and typesize left for zarr-python to choose from the dtype.
    "blosc-defaults": BloscCodec(cname="lz4"),
}

#: Dtypes of the arrays compared; ``f8-nan`` is float64 holding NaNs (and NaN fill).
DTYPES = ["u1", "u2", "<u2", ">u2", "i4", "<f4", ">f8", "f8-nan", "c8", "bool"]


@dataclass(frozen=True)
class Case:
    """One array and one region of it, written both ways."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None
    dtype: str
    compressor: str
    index_location: str = "end"
    endian: str = "little"
    region: tuple[slice, ...] | None = None  # None: the whole array
    seed: int = 0
    fortran: bool = False  # data handed over in Fortran order
    #: Every file written around the page cache (O_DIRECT), however small.
    around_cache: bool = False
    #: The chunk key encoding's separator: ``.`` (the writer's) or ``/``.
    separator: str = "."

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype("f8" if self.dtype == "f8-nan" else self.dtype)

    @property
    def fill(self) -> Any:
        if self.dtype == "f8-nan":
            return np.nan
        return False if self.numpy_dtype.kind == "b" else 0

    @property
    def unit(self) -> tuple[int, ...]:
        return self.shards or self.chunks

    @property
    def where(self) -> tuple[slice, ...]:
        return self.region or tuple(slice(0, n) for n in self.shape)


def files_store(directory: Path) -> LocalFilesStore:
    """The writer's kind of local store over ``directory``."""
    return LocalFilesStore(LocalFiles(directory))


def as_node(array: zarr.Array) -> ArrayNode:
    """The writer's description of an array zarr-python made (from its metadata)."""
    document = Path(array.store_path.store.root, array.path, "zarr.json").read_text()
    metadata = ArrayMetadata.from_dict(json.loads(document))
    return ArrayNode(array.store_path.store, array.path, metadata)


def create_array(directory: Path, case: Case, store_type: Any = files_store) -> zarr.Array:
    """The case's array, alone in a new store at ``directory``."""
    directory.mkdir()
    group = zarr.open_group(store_type(directory), mode="a", zarr_format=3)
    shards: Any = None
    if case.shards is not None:
        shards = {"shape": case.shards, "index_location": case.index_location}
    compressor = COMPRESSORS[case.compressor]
    return group.create_array(
        "array",
        shape=case.shape,
        chunks=case.chunks,
        shards=shards,
        dtype=case.numpy_dtype,
        fill_value=case.fill,
        serializer=BytesCodec(endian=case.endian),
        compressors=None if compressor is None else (compressor,),
        dimension_names=[f"d{n}" for n in range(len(case.shape))],
        chunk_key_encoding={"name": "default", "separator": case.separator},
        config={"write_empty_chunks": True},
    )


def make_data(case: Case) -> np.ndarray:
    """Values for the case's region: random, with a run of fill values and
    (for ``f8-nan``) NaNs, in the case's dtype and byte order."""
    shape = tuple(s.stop - s.start for s in case.where)
    rng = np.random.default_rng(case.seed)
    dtype = case.numpy_dtype
    if dtype.kind == "b":
        data = rng.integers(0, 2, shape).astype(bool)
    elif dtype.kind == "c":
        data = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(dtype)
    elif dtype.kind == "f":
        data = (rng.normal(size=shape) * 1e3).astype(dtype)
    else:
        info = np.iinfo(dtype)
        data = rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)
    if case.dtype == "f8-nan":
        data[rng.random(shape) < 0.3] = np.nan
    if data.size:
        # Some points hold the fill value: chunks of only fill are still written.
        flat = data.reshape(-1)
        flat[: rng.integers(0, flat.size + 1)] = case.fill
    assert data.dtype == dtype
    return np.asfortranarray(data) if case.fortran else data


def files_below(directory: Path) -> dict[str, bytes]:
    """Every file below ``directory``, by relative path."""
    return {
        path.relative_to(directory).as_posix(): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def read_with_tensorstore(directory: Path) -> np.ndarray:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(directory)}}
    return np.asarray(tensorstore.open(spec, open=True).result().read().result())


def wholly_outside_chunks(case: Case) -> bool:
    """Whether a shard the case writes holds chunks wholly past the array's edge."""
    if case.shards is None:
        return False
    for key in np.ndindex(*(-(-n // u) for n, u in zip(case.shape, case.shards))):
        start = tuple(k * u for k, u in zip(key, case.shards))
        for position in np.ndindex(*(u // c for u, c in zip(case.shards, case.chunks))):
            corner = tuple(s + p * c for s, p, c in zip(start, position, case.chunks))
            if any(x >= n for x, n in zip(corner, case.shape)):
                return True
    return False


def check_case(case: Case) -> None:
    """Write the case both ways; compare the files and what readers read."""
    region = case.where
    data = make_data(case)
    origin = tuple(s.start for s in region)
    expected = np.full(case.shape, case.fill, dtype=case.numpy_dtype)
    expected[region] = data
    with tempfile.TemporaryDirectory() as tmp:
        by_zarr = create_array(Path(tmp) / "zarr", case)
        direct_array = create_array(Path(tmp) / "direct", case)
        by_zarr[region] = data
        writer = DirectWriter.of(as_node(direct_array))
        assert writer is not None, f"no direct writer for {case}"
        threshold = 1 if case.around_cache else bluesky_zarr.storage._files.AROUND_CACHE_FROM_BYTES
        with mock.patch.object(bluesky_zarr.storage._files, "AROUND_CACHE_FROM_BYTES", threshold):
            writer.write(origin, data, direct_array.shape)

        reference = files_below(Path(tmp) / "zarr" / "array")
        written = files_below(Path(tmp) / "direct" / "array")
        assert sorted(written) == sorted(reference), case
        assert any(name.startswith(f"c{case.separator}") for name in reference), case
        for name in reference:
            assert written[name] == reference[name], f"{name} differs for {case}"

        for directory in (Path(tmp) / "zarr" / "array", Path(tmp) / "direct" / "array"):
            array = zarr.open_array(LocalStore(directory, read_only=True), mode="r")
            read = np.asarray(array[...])
            # V3 keeps the byte order in the bytes codec, not the data type:
            # readers give native values.
            assert read.dtype.newbyteorder("=") == case.numpy_dtype.newbyteorder("=")
            np.testing.assert_array_equal(read, expected, err_msg=f"zarr-python, {case}")
            np.testing.assert_array_equal(
                read_with_tensorstore(directory), expected, err_msg=f"tensorstore, {case}"
            )


@st.composite
def cases(draw: st.DrawFn) -> Case:
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.integers(1, 7 if ndim < 3 else 4)) for _ in range(ndim))
    # Chunks up to one past the array's length: a chunk may overhang it.
    chunks = tuple(draw(st.integers(1, n + 1)) for n in shape)
    shards = None
    if draw(st.booleans()):
        shards = tuple(c * draw(st.integers(1, 3)) for c in chunks)
    unit = shards or chunks
    region = []
    for n, u in zip(shape, unit):
        units = -(-n // u)
        first = draw(st.integers(0, units - 1))
        last = draw(st.integers(first + 1, units))
        region.append(slice(first * u, min(last * u, n)))
    case = Case(
        shape=shape,
        chunks=chunks,
        shards=shards,
        dtype=draw(st.sampled_from(DTYPES)),
        compressor=draw(st.sampled_from(list(COMPRESSORS))),
        index_location=draw(st.sampled_from(["start", "end"])),
        endian=draw(st.sampled_from(["little", "big"])),
        region=tuple(region),
        seed=draw(st.integers(0, 2**16)),
        fortran=draw(st.booleans()),
        around_cache=draw(st.booleans()),
        separator=draw(st.sampled_from([".", "/"])),
    )
    if wholly_outside_chunks(case):
        event("a shard holds chunks wholly past the array's edge")
    event(f"{ndim}-d, {'sharded' if shards else 'chunked'}")
    return case


@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(case=cases())
def test_direct_writes_are_zarr_pythons_files(case: Case) -> None:
    check_case(case)


EXPLICIT_CASES = {
    # Shards of 4 x 6 over 5 x 7: the last row and column of shards pass the
    # edge, and shard (1, 1) holds chunks wholly outside the array.
    "shards-past-the-edge": Case(
        (5, 7), (2, 3), (4, 6), "u2", "blosc-lz4-bitshuffle", region=(slice(4, 5), slice(0, 7))
    ),
    "index-at-start-big-endian": Case(
        (6, 5, 4), (2, 2, 4), (4, 4, 4), ">u2", "blosc-zstd-shuffle-blocksize", "start"
    ),
    "big-endian-serializer": Case((9, 4), (3, 4), None, ">f8", "none", endian="big"),
    "nan-floats-clevel-0": Case(
        (4, 4, 3), (1, 4, 3), (3, 4, 3), "f8-nan", "blosc-clevel-0", "start"
    ),
    "complex-uncompressed-shards": Case((3, 8), (1, 3), (2, 6), "c8", "none", fortran=True),
    "bool-defaults": Case((2, 3, 4, 5), (1, 2, 2, 5), None, "bool", "blosc-defaults"),
    "chunk-longer-than-array": Case((3,), (4,), (8,), "i4", "blosc-lz4-bitshuffle"),
    "slash-separated-keys": Case(
        (5, 7), (2, 3), (4, 6), "u2", "blosc-lz4-bitshuffle", separator="/"
    ),
    "scan-shaped-frames": Case(
        (3, 4, 16, 24),
        (1, 1, 16, 24),
        (1, 4, 16, 24),
        "<u2",
        "blosc-lz4-bitshuffle",
        region=(slice(2, 3), slice(0, 4), slice(0, 16), slice(0, 24)),
    ),
}


@pytest.mark.parametrize("around_cache", [False, True], ids=["page-cache", "around-cache"])
@pytest.mark.parametrize("name", list(EXPLICIT_CASES))
def test_direct_writes_are_zarr_pythons_files_explicit(name: str, around_cache: bool) -> None:
    check_case(dataclasses.replace(EXPLICIT_CASES[name], around_cache=around_cache))


def test_the_edge_case_really_has_chunks_outside_the_array() -> None:
    """The explicit edge case does exercise chunks that the index marks absent."""
    case = EXPLICIT_CASES["shards-past-the-edge"]
    assert wholly_outside_chunks(case)
    with tempfile.TemporaryDirectory() as tmp:
        array = create_array(Path(tmp) / "direct", case)
        writer = DirectWriter.of(as_node(array))
        assert writer is not None
        writer.write((4, 0), make_data(case), array.shape)
        # Shard (1, 1) covers rows 4-7 and columns 6-11 of a 5 x 7 array: of
        # its 2 x 2 chunks only the one at (4, 6) is inside.
        shard = (Path(tmp) / "direct" / "array" / "c.1.1").read_bytes()
        index = np.frombuffer(shard[-(4 * 16 + 4) : -4], dtype="<u8").reshape(2, 2, 2)
        absent = 2**64 - 1
        assert index[0, 0, 0] == 0
        assert (index[0, 1] == absent).all()
        assert (index[1] == absent).all()


@pytest.mark.parametrize("array_dtype, data_dtype", [(">u2", "<u2"), ("<u2", ">u2")])
def test_data_of_the_other_byte_order_is_written_as_its_values(
    tmp_path: Path, array_dtype: str, data_dtype: str
) -> None:
    """``array[...] = data`` stores the values of ``data`` whatever its byte
    order; a direct write must store the same values, or refuse the data."""
    case = Case((4,), (4,), None, array_dtype, "none")
    array = create_array(tmp_path / "direct", case)
    writer = DirectWriter.of(as_node(array))
    assert writer is not None
    data = np.array([1, 2, 3, 4], dtype=data_dtype)
    try:
        writer.write((0,), data, array.shape)
    except (TypeError, ValueError):
        return  # refusing is as good as converting
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "direct" / "array")[...], data)


# ------------------------------------------------- what the direct path declines

REFUSED: dict[str, tuple[dict[str, Any], Any]] = {
    "plain-local-store": ({}, LocalStore),
    "zstd": ({"compressors": (ZstdCodec(level=1),)}, files_store),
    "gzip": ({"compressors": (GzipCodec(level=1),)}, files_store),
    "zstd-in-shards": (
        {"compressors": (ZstdCodec(level=1),), "shards": (4, 4)},
        files_store,
    ),
    "blosc-then-gzip": (
        {"compressors": (BloscCodec(cname="lz4"), GzipCodec(level=1))},
        files_store,
    ),
    "variable-length-strings": ({"dtype": str, "fill_value": ""}, files_store),
}


def refused_array(directory: Path, options: dict[str, Any], store_type: Any) -> zarr.Array:
    directory.mkdir()
    group = zarr.open_group(store_type(directory), mode="a", zarr_format=3)
    arguments: dict[str, Any] = {
        "shape": (4, 6),
        "chunks": (2, 2),
        "dtype": "uint16",
        "fill_value": 0,
        # zarr-python's own default is Zstd, which the direct path declines.
        "compressors": (BloscCodec(cname="lz4"),),
        "config": {"write_empty_chunks": True},
    }
    arguments.update(options)
    return group.create_array("array", **arguments)


def test_the_direct_path_takes_an_ordinary_array(tmp_path: Path) -> None:
    """The control for the refusals below: the same array, nothing changed."""
    array = refused_array(tmp_path / "store", {}, files_store)
    assert DirectWriter.of(as_node(array)) is not None


@pytest.mark.parametrize("name", list(REFUSED))
def test_the_direct_path_declines_what_it_does_not_reproduce(tmp_path: Path, name: str) -> None:
    options, store_type = REFUSED[name]
    array = refused_array(tmp_path / "store", options, store_type)
    assert DirectWriter.of(as_node(array)) is None
    # zarr-python writes the array instead, and reads it back.
    if array.dtype.kind in "OTU":
        data: np.ndarray = np.array(
            [[f"{i}-{j}" for j in range(6)] for i in range(4)], dtype=object
        )
    else:
        data = np.arange(24, dtype="uint16").reshape(4, 6)
    array[...] = data
    np.testing.assert_array_equal(
        zarr.open_array(LocalStore(tmp_path / "store"), path="array", mode="r")[...], data
    )


# ---------------------------------------------------------------- scan level

N_OUTER, N_INNER = 3, 4


class WriteCounter:
    """Counts the writes of each array that took the direct path, and the
    blocks each array merged with what was on disk (read back and written
    through the direct path too)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.direct: dict[str, int] = {}
        #: Points whose chunks were encoded as they arrived, by array.
        self.on_arrival: dict[str, int] = {}
        self.merges: dict[str, int] = {}
        self.blocks: dict[str, int] = {}

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        direct_write = DirectWriter.write
        encode_point = DirectWriter.encode_point
        write_block = BlockBuffer.write_block
        counter = self

        def counted_encode(self: DirectWriter, *args: Any) -> Any:
            encoded = encode_point(self, *args)
            with counter.lock:
                name = self.path.rsplit("/", 1)[-1]
                counter.on_arrival[name] = counter.on_arrival.get(name, 0) + 1
            return encoded

        def counted_write(self: DirectWriter, *args: Any, **kwargs: Any) -> None:
            direct_write(self, *args, **kwargs)
            with counter.lock:
                name = self.path.rsplit("/", 1)[-1]
                counter.direct[name] = counter.direct.get(name, 0) + 1

        def counted_block(
            self: BlockBuffer, owner: Any, sink: Any, block: Any, merge: bool
        ) -> None:
            write_block(self, owner, sink, block, merge)
            with counter.lock:
                counter.blocks[sink.name] = counter.blocks.get(sink.name, 0) + 1
                if merge:
                    counter.merges[sink.name] = counter.merges.get(sink.name, 0) + 1

        monkeypatch.setattr(DirectWriter, "write", counted_write)
        monkeypatch.setattr(DirectWriter, "encode_point", counted_encode)
        monkeypatch.setattr(BlockBuffer, "write_block", counted_block)


@dataclass(frozen=True)
class Scan:
    frame: tuple[int, int]
    options: dict[str, Any]
    #: Arrays that must have taken the direct path.
    direct: tuple[str, ...]
    #: The chunks and shards cam_image must get.
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None
    #: Whether blocks of cam_image must also have merged with what was on disk.
    merges: bool = False
    dtype: str = "uint16"
    #: Whether cam_image's chunks must have been encoded as their frames came.
    on_arrival: bool = False


SMALL = (16, 24)
#: 256 KiB of uint16: row shards too, of fewer frames each.
LARGE = (256, 512)
SMALL_BYTES = SMALL[0] * SMALL[1] * 2

SCANS = {
    "default-row-shards": Scan(
        SMALL, {}, ("cam_image", "det", "seq_num", "time"), (1, 1) + SMALL, (1, N_INNER) + SMALL,
        on_arrival=True,
    ),
    "large-frames": Scan(
        LARGE, {}, ("cam_image", "det"), (1, 1) + LARGE, (1, N_INNER) + LARGE, on_arrival=True
    ),
    # Chunks of all wavelengths at a position complete only in the last row;
    # a small buffer spills them early, and later blocks merge.
    "outer-chunks-merging": Scan(
        SMALL,
        {
            "chunks": {"cam_image": (N_OUTER, 1) + SMALL},
            "max_buffer_bytes": 4 * SMALL_BYTES,
            "flush_interval": None,
        },
        ("cam_image",),
        (N_OUTER, 1) + SMALL,
        None,
        merges=True,
    ),
    # Shards of 3 x 2 frames: their chunks in Morton order, not row order.
    "user-shards-2d": Scan(
        SMALL,
        {"shards": {"cam_image": (N_OUTER, 2) + SMALL}},
        ("cam_image",),
        (1, 1) + SMALL,
        (N_OUTER, 2) + SMALL,
        on_arrival=True,
    ),
    "uncompressed": Scan(
        SMALL, {"compressors": None}, ("cam_image", "det"), (1, 1) + SMALL, (1, N_INNER) + SMALL
    ),
    # The camera declares big-endian frames (dtype_numpy '>u2').
    "big-endian-frames": Scan(
        SMALL, {}, ("cam_image",), (1, 1) + SMALL, (1, N_INNER) + SMALL, dtype=">u2",
        on_arrival=True,
    ),
}


def run_scan(
    directory: Path,
    frame: tuple[int, int],
    options: dict[str, Any],
    extra: tuple[Any, ...] = (),
    dtype: str = "uint16",
) -> tuple[Path, Docs]:
    """A snaking grid scan of a PointCamera through a RunEngine into a
    ZarrWriter; the store and the documents the run emitted."""
    RE = RunEngine({}, call_returns_result=False)
    docs: Docs = []
    RE.subscribe(lambda name, doc: docs.append((name, copy.deepcopy(doc))))
    writer = ZarrWriter(directory, **options)
    RE.subscribe(writer)
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=frame, dtype=dtype, name="cam")
    detectors = [cam, det, *(make(position) for make in extra)]
    RE(
        grid_scan(
            detectors, wavelength, 400, 700, N_OUTER, position, 0, 5, N_INNER, snake_axes=True
        )
    )
    assert len(writer.stores) == 1
    return Path(writer.stores[0]), docs


def arrays_of(store: Path, stream: str = "primary") -> Iterator[tuple[str, zarr.Array]]:
    group = zarr.open_group(LocalStore(store, read_only=True), mode="r")[stream]
    assert isinstance(group, zarr.Group)
    yield from group.arrays()


def assert_tensorstore_agrees(store: Path) -> int:
    """tensorstore reads every (numeric) array of the stream as zarr-python does."""
    compared = 0
    for name, array in arrays_of(store):
        if np.dtype(array.dtype).kind not in "biufc":
            continue  # tensorstore does not read variable-length strings
        by_zarr = np.asarray(array[...])
        by_tensorstore = read_with_tensorstore(store / "primary" / name)
        assert by_tensorstore.shape == by_zarr.shape, name
        np.testing.assert_array_equal(
            by_tensorstore, by_zarr, err_msg=f"tensorstore reads another {name}"
        )
        compared += 1
    return compared


def chunk_files(store: Path) -> dict[str, bytes]:
    """Every chunk or shard file of the store's arrays, by path in the store."""
    return {
        name: content
        for name, content in files_below(store).items()
        if ("/c." in name or "/c/" in name) and not Path(name).name.startswith(".")
    }


MOTORS_AT = {"wavelength": "wavelength", "position": "position"}


@pytest.mark.parametrize("around_cache", [False, True], ids=["page-cache", "around-cache"])
@pytest.mark.parametrize("name", list(SCANS))
def test_a_scan_written_directly_is_the_scan_written_by_zarr_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, around_cache: bool
) -> None:
    if around_cache:
        # Every file, however small, written around the page cache (O_DIRECT).
        monkeypatch.setattr(bluesky_zarr.storage._files, "AROUND_CACHE_FROM_BYTES", 1)
    scan = SCANS[name]
    counter = WriteCounter()
    counter.install(monkeypatch)
    store, docs = run_scan(tmp_path / "direct", scan.frame, scan.options, dtype=scan.dtype)

    for array in scan.direct:
        assert counter.direct.get(array, 0) > 0, f"{array} never took the direct path"
    # Frames encoded as they arrived (every point once), or not at all.
    encoded = counter.on_arrival.get("cam_image", 0)
    assert encoded == (N_OUTER * N_INNER if scan.on_arrival else 0)
    if scan.merges:
        assert counter.merges.get("cam_image", 0) > 0, "no block of cam_image merged"
        # Merged blocks are read back and written through the direct path too.
        assert counter.direct.get("cam_image", 0) == counter.blocks["cam_image"]
    image = dict(arrays_of(store))["cam_image"]
    assert image.chunks == scan.chunks
    assert image.shards == scan.shards

    ds = open_stream(store)
    # Readers give native byte order; the values are the camera's.
    native = np.dtype(scan.dtype).newbyteorder("=").name
    assert assert_frames_match(ds, "cam_image", MOTORS_AT, scan.frame, native) == (
        N_OUTER * N_INNER
    )
    assert bool(ds["_written"].all())
    assert assert_tensorstore_agrees(store) >= 6

    # The same documents, zarr-python writing every block.
    monkeypatch.setattr(DirectWriter, "of", classmethod(lambda cls, array: None))
    before = sum(counter.direct.values())
    writer = ZarrWriter(tmp_path / "zarr-python", **scan.options)
    for doc_name, doc in docs:
        writer(doc_name, doc)
    assert sum(counter.direct.values()) == before, "the direct path was not disabled"
    reference = Path(writer.stores[0])
    assert reference.name == store.name

    direct_files = chunk_files(store)
    reference_files = chunk_files(reference)
    assert any(n.startswith("primary/cam_image/c.") for n in reference_files)
    assert sorted(direct_files) == sorted(reference_files)
    differing = [n for n in reference_files if direct_files[n] != reference_files[n]]
    assert not differing, f"chunk files differ: {differing}"


# ------------------------------------- scans the direct path declines, end to end


def label_signal(position: Any) -> SynSignal:
    """A detector reading a string that names the position (variable-length)."""
    return SynSignal(func=lambda: f"at {position.position:.3f}", name="label")


DECLINED: dict[str, tuple[dict[str, Any], tuple[Any, ...]]] = {
    # A store that is not the writer's local store: zarr-python writes everything.
    "plain-local-store": ({"store_wrapper": lambda store: LocalStore(store.root)}, ()),
    "zstd": ({"compressors": (ZstdCodec(level=1),)}, ()),
    "gzip": ({"compressors": (GzipCodec(level=1),)}, ()),
}


@pytest.mark.parametrize("name", list(DECLINED))
def test_scans_the_direct_path_declines_are_written_by_zarr_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    options, extra = DECLINED[name]
    counter = WriteCounter()
    counter.install(monkeypatch)
    store, _ = run_scan(tmp_path, SMALL, options, extra)
    assert counter.direct == {}
    assert counter.blocks.get("cam_image", 0) > 0
    ds = open_stream(store)
    assert assert_frames_match(ds, "cam_image", MOTORS_AT, SMALL) == N_OUTER * N_INNER
    assert bool(ds["_written"].all())
    assert assert_tensorstore_agrees(store) >= 6


def test_strings_go_through_zarr_python_beside_direct_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = WriteCounter()
    counter.install(monkeypatch)
    store, _ = run_scan(tmp_path, SMALL, {}, (label_signal,))
    assert counter.blocks.get("label", 0) > 0
    assert "label" not in counter.direct
    assert counter.direct.get("cam_image", 0) > 0
    ds = open_stream(store)
    assert assert_frames_match(ds, "cam_image", MOTORS_AT, SMALL) == N_OUTER * N_INNER
    positions = ds["position"].values
    labels = ds["label"].values
    assert labels.shape == (N_OUTER, N_INNER)
    for i, j in np.ndindex(N_OUTER, N_INNER):
        assert labels[i, j] == f"at {positions[j]:.3f}"
    assert bool(ds["_written"].all())
    assert math.prod(labels.shape) == N_OUTER * N_INNER


def test_a_merge_keeps_points_an_earlier_write_put_past_the_new_ones(tmp_path: Path) -> None:
    """A growing stream: point 2 is written (spilled) before point 1 arrives;
    merging point 1 into the same chunk must keep point 2."""
    from event_model import compose_run

    bundle = compose_run(metadata={"scan_id": 1})
    descriptor = bundle.compose_descriptor(
        name="primary",
        data_keys={"k": {"dtype": "number", "dtype_numpy": "<f8", "shape": [], "source": "s"}},
    )
    writer = ZarrWriter(
        tmp_path, chunks={"k": (4,)}, max_buffer_bytes=1, flush_interval=None, workers=1
    )
    writer("start", bundle.start_doc)
    writer("descriptor", descriptor.descriptor_doc)
    for seq_num, value in ((2, 20.0), (1, 10.0), (4, 40.0), (3, 30.0)):
        event = descriptor.compose_event(
            data={"k": value}, timestamps={"k": 0.0}, seq_num=seq_num, time=100.0 + seq_num
        )
        writer("event", event)
    writer("stop", bundle.compose_stop())
    ds = open_stream(Path(writer.stores[0]))
    assert ds["k"].values.tolist() == [10.0, 20.0, 30.0, 40.0]
    assert epoch_seconds(ds["time"]).tolist() == [101.0, 102.0, 103.0, 104.0]
    assert ds["_written"].values.all()
