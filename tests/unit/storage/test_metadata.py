"""A run's metadata, written by the writer itself, is what zarr-python writes.

:mod:`bluesky_zarr.storage._metadata` builds each node's ``zarr.json`` from the Zarr
V3 specification (:mod:`bluesky_zarr.storage._spec`), without zarr-python, and
consolidates from memory instead of reading the store back. Checked here
against zarr-python itself (whichever release is installed): every array
configuration the writer uses gives the ``zarr.json`` ``zarr.create_array``
writes, byte for byte, and the root of a real run (with growing streams
resized many times, a second descriptor, strings and coordinates) holds the
consolidated metadata ``zarr.consolidate_metadata`` computes from the files
on disk.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from bluesky import RunEngine
from bluesky.plans import count, grid_scan
from ophyd.sim import det, motor1, motor2
from zarr.buffer import default_buffer_prototype
from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

from bluesky_zarr import ZarrWriter
from bluesky_zarr.sim import PointCamera, motors
from bluesky_zarr.storage._files import LocalFiles
from bluesky_zarr.storage._metadata import StoreMetadata
from bluesky_zarr.storage._spec import DEFAULT_COMPRESSOR
from bluesky_zarr.storage._zarr import LocalFilesStore

#: The writer's default compressor as zarr-python is told it.
DEFAULT = BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")

#: Arrays made both ways: the arguments, and the compressors zarr-python is
#: given where the writer's own description (a JSON template) differs.
CASES: list[tuple[dict[str, Any], Any]] = [
    (dict(shape=(3, 4, 8, 8), dtype="uint16", chunks=(1, 1, 8, 8), shards=(1, 4, 8, 8),
          fill_value=0, compressors=[DEFAULT_COMPRESSOR]), [DEFAULT]),
    (dict(shape=(3, 4, 8, 8), dtype="uint8", chunks=(1, 2, 8, 8), shards=None,
          fill_value=0, compressors=[DEFAULT_COMPRESSOR]), [DEFAULT]),
    (dict(shape=(3, 4, 8, 8), dtype="<f4", chunks=(1, 1, 8, 8), shards=None,
          fill_value=np.nan, compressors=None), None),
    (dict(shape=(5, 7), dtype=">i8", chunks=(2, 3), shards=(4, 6), fill_value=0,
          compressors=BloscCodec(cname="zstd", clevel=3)), None),
    (dict(shape=(10,), dtype="bool", chunks=(10,), shards=None, fill_value=False,
          compressors=GzipCodec()), None),
    (dict(shape=(0,), dtype="float64", chunks=(4096,), shards=None, fill_value=np.nan,
          compressors=[ZstdCodec(level=0, checksum=False)]), None),
    (dict(shape=(4,), dtype="float32", chunks=(2,), shards=None, fill_value=-np.inf,
          compressors=[DEFAULT_COMPRESSOR]), [DEFAULT]),
    (dict(shape=(6,), dtype=str, chunks=(6,), shards=None, fill_value="",
          compressors=[DEFAULT_COMPRESSOR]), [DEFAULT]),
    (dict(shape=(6,), dtype=str, chunks=(6,), shards=None, fill_value="",
          compressors=None), None),
    (dict(shape=(2, 3), dtype="complex128", chunks=(1, 3), shards=(2, 3), fill_value=np.nan,
          compressors=None), None),
    (dict(shape=(2, 3), dtype="int8", chunks=(1, 3), shards=(2, 3), fill_value=-3,
          compressors=BloscCodec(cname="lz4")), None),
]


def files_store(path: Path) -> LocalFilesStore:
    path.mkdir(exist_ok=True)
    return LocalFilesStore(LocalFiles(path))


@pytest.mark.parametrize(
    "case, theirs_compressors", CASES, ids=lambda c: f"{c['dtype']}-{c['shape']}"
    if isinstance(c, dict) else ""
)
def test_an_array_made_here_is_the_array_zarr_python_makes(
    tmp_path: Path, case: dict[str, Any], theirs_compressors: Any
) -> None:
    names = [f"d{n}" for n in range(len(case["shape"]))]
    arguments = dict(case, dimension_names=names, attributes={"units": "mm", "n": [1, 2]})
    theirs = zarr.open_group(tmp_path / "theirs.zarr", mode="w", zarr_format=3)
    theirs_arguments = dict(arguments)
    if theirs_compressors is not None:
        theirs_arguments["compressors"] = theirs_compressors
    # The writer's chunk keys are "."-separated (each shard a file in its
    # array's folder); zarr-python given the same encoding.
    theirs.create_array(
        "a",
        **theirs_arguments,
        chunk_key_encoding={"name": "default", "separator": "."},
        config={"write_empty_chunks": True},
    )
    ours = StoreMetadata(files_store(tmp_path / "ours.zarr"), {})
    array = ours.add_array("a", **arguments)
    expected = (tmp_path / "theirs.zarr" / "a" / "zarr.json").read_bytes()
    assert (tmp_path / "ours.zarr" / "a" / "zarr.json").read_bytes() == expected
    # The node handed out describes what is on disk, and writes and reads
    # like zarr-python's own array.
    reopened = zarr.open_array(tmp_path / "ours.zarr", path="a", mode="r")
    assert json.loads(expected) == array.metadata.to_dict()
    assert reopened.shape == array.shape
    assert reopened.chunks == array.chunks and reopened.shards == array.shards
    if array.size and np.dtype(array.dtype).kind in "iuf":
        values = np.arange(array.size).reshape(array.shape).astype(array.dtype)
        array[...] = values
        np.testing.assert_array_equal(reopened[...], values)


def test_growing_an_array_rewrites_its_metadata(tmp_path: Path) -> None:
    (tmp_path / "s.zarr").mkdir()
    metadata = StoreMetadata(files_store(tmp_path / "s.zarr"), {"x": 1})
    metadata.add_group("g", {"a": 1})
    array = metadata.add_array(
        "g/v", shape=(0,), dtype="float64", chunks=(4,), shards=None, fill_value=np.nan,
        dimension_names=["time"], attributes={}, compressors=None,
    )
    for length in (3, 9, 20):
        array = metadata.resize(array, (length,))
        array[length - 1] = length
    metadata.consolidate({"y": 2})
    group = zarr.open_group(tmp_path / "s.zarr", mode="r", use_consolidated=True)
    assert dict(group.attrs) == {"x": 1, "y": 2}
    read = group["g/v"]
    assert read.shape == (20,)
    assert [read[2], read[8], read[19]] == [3, 9, 20]
    assert zarr.open_array(tmp_path / "s.zarr", path="g/v", mode="r").shape == (20,)


def _consolidated_by_zarr(store: Path) -> dict[str, Any]:
    """The consolidated metadata zarr-python computes from the files on disk."""
    copy = json.loads((store / "zarr.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(store))
    theirs = json.loads((store / "zarr.json").read_text())
    (store / "zarr.json").write_text(json.dumps(copy))
    return theirs


def test_a_runs_consolidated_metadata_is_what_zarr_python_consolidates(
    tmp_path: Path,
) -> None:
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=(6, 5), name="cam")
    RE = RunEngine({})
    writer = ZarrWriter(tmp_path)
    RE.subscribe(writer)
    RE(grid_scan([cam, det], wavelength, 400, 700, 3, position, 0, 5, 4, snake_axes=True))
    # Growing streams (resized at each write) and a baseline.
    from bluesky.preprocessors import baseline_wrapper

    RE(baseline_wrapper(count([det, motor1], num=7), [motor2]))
    stores = sorted(tmp_path.glob("*.zarr"))
    assert len(stores) == 2
    for store in stores:
        ours = json.loads((store / "zarr.json").read_text())
        theirs = _consolidated_by_zarr(store)
        assert ours["consolidated_metadata"] == theirs["consolidated_metadata"], store
        assert ours["attributes"] == theirs["attributes"]
        # What xarray sees through the consolidated metadata is what is on disk.
        for path, node in ours["consolidated_metadata"]["metadata"].items():
            on_disk = json.loads((store / path / "zarr.json").read_text())
            if node["node_type"] == "group":
                # Consolidation lists a child group with its (empty) own.
                assert node.pop("consolidated_metadata")["metadata"] == {}
            assert node == on_disk, path


def test_a_descriptor_refused_halfway_leaves_no_half_stream(tmp_path: Path) -> None:
    from event_model import compose_run

    from bluesky_zarr import BlueskyZarrError

    # The second data key's chunks do not fit its array: the first key's
    # array (and the group) are made before the descriptor is refused.
    writer = ZarrWriter(tmp_path, chunks={"b": (1, 2, 3, 4)})
    bundle = compose_run(metadata={})
    keys = {
        "a": {"dtype": "number", "shape": [], "source": "SIM:a"},
        "b": {"dtype": "number", "shape": [], "source": "SIM:b"},
    }
    refused = bundle.compose_descriptor(data_keys=keys, name="primary")
    kept = bundle.compose_descriptor(
        data_keys={"c": {"dtype": "number", "shape": [], "source": "SIM:c"}}, name="baseline"
    )
    writer("start", dict(bundle.start_doc))
    with pytest.raises(BlueskyZarrError, match="'b'"):
        writer("descriptor", dict(refused.descriptor_doc))
    writer("descriptor", dict(kept.descriptor_doc))
    event = kept.compose_event(data={"c": 2.5}, timestamps={"c": 0.0}, seq_num=1)
    writer("event", dict(event))
    writer("stop", dict(bundle.compose_stop()))

    store = Path(writer.stores[0])
    assert not (store / "primary").exists(), "the refused stream's nodes stayed on disk"
    root = json.loads((store / "zarr.json").read_text())
    assert not [p for p in root["consolidated_metadata"]["metadata"] if p.startswith("primary")]
    assert float(zarr.open_group(store, mode="r")["baseline/c"][0]) == 2.5
    assert "refused" in root["attributes"]["bluesky_zarr"]["incomplete_reason"]
    assert _consolidated_by_zarr(store)["consolidated_metadata"] == root["consolidated_metadata"]


@pytest.mark.parametrize("indent", [2, None, 0, 4])
def test_the_root_is_written_as_zarr_python_writes_it(
    tmp_path: Path, indent: int | None
) -> None:
    """The root's text, put together from each node's text, is what
    zarr-python writes for the same consolidated metadata, without its
    indentation (only programs read the root, rewritten at each change);
    each node's own ``zarr.json`` is byte for byte zarr-python's."""
    with zarr.config.set({"json_indent": indent}):
        metadata = StoreMetadata(
            files_store(tmp_path / "s.zarr"),
            {"start": {"uid": "x", "sample": "Fe₂O₃ \n\"quoted\"", "n": [1, 2.5, None]}},
        )
        for stream in ("primary", "baseline", "Ärger", "b10", "b2"):
            metadata.add_group(stream, {"descriptors": [{"data_keys": {"k": {"shape": []}}}]})
            for name, dtype in (("k", "float64"), ("seq_num", "int64"), ("_written", "bool")):
                metadata.add_array(
                    f"{stream}/{name}", shape=(3, 4), dtype=dtype, chunks=(1, 4), shards=None,
                    fill_value=np.nan if dtype == "float64" else 0,
                    dimension_names=["a", "b"], attributes={"units": "µm"},
                    compressors=[DEFAULT_COMPRESSOR],
                )
        metadata.set_attributes("primary", {"external": {"resources": [{"uid": "r"}]}})
        metadata.consolidate({"stop": {"exit_status": "success"}})
        # zarr-python consolidating a copy of the store writes the same root.
        shutil.copytree(tmp_path / "s.zarr", tmp_path / "copy.zarr")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(str(tmp_path / "copy.zarr"))
        expected = json.loads((tmp_path / "copy.zarr" / "zarr.json").read_bytes())
        text = (tmp_path / "s.zarr" / "zarr.json").read_text()
        assert json.loads(text) == expected
        # The same members in the same order, and not a space to spare.
        assert list(json.loads(text)["consolidated_metadata"]["metadata"]) == list(
            expected["consolidated_metadata"]["metadata"]
        )
        assert text == json.dumps(json.loads(text), separators=(",", ":"), allow_nan=True)
        for path in ("primary", "primary/k", "Ärger/_written"):
            node = zarr.open_group(tmp_path / "s.zarr", mode="r", use_consolidated=False)[path]
            assert node.metadata.to_buffer_dict(default_buffer_prototype())[
                "zarr.json"
            ].to_bytes() == (tmp_path / "s.zarr" / path / "zarr.json").read_bytes()

