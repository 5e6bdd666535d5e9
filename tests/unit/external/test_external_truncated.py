"""Detector files cut short: a point is ``_written`` only when its frame is there.

A detector that crashed, a full disk or a partial copy leaves a file shorter
than what its documents describe. ophyd-async's simulated blob detector
writes a 3 x 4 grid into an HDF5 file; the file is cut (to a tenth, and at
random lengths) and the run's recorded documents are written from it, by
copy (``external="fill"``) and by reference (``external="virtual"``). Which
rows survive a cut is known from the intact file (the byte range of each
row's chunks): a point is written only if all of its rows lie before the cut,
and then it holds exactly the frame the detector wrote.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import bluesky.plan_stubs as bps
import h5py
import numpy as np
import pytest
import xarray as xr
from bluesky import RunEngine
from bluesky.plans import grid_scan
from ophyd_async import sim
from ophyd_async.core import init_devices

from bluesky_zarr import ExternalFileError, ZarrWriter

from conftest import blob_detector, by_kind, open_stream, quick_sleep, record

pytest.importorskip("icechunk")

Docs = list[tuple[str, dict[str, Any]]]

#: The blob detector's datasets, by data key.
DATASETS = {"det": "/entry/data/data", "det-sum": "/entry/sum"}


class Recorded:
    """A grid scan's documents and its intact HDF5 file, with where each row
    of each dataset ends in the file."""

    def __init__(self, docs: Docs, directory: Path) -> None:
        self.docs = docs
        self.directory = directory
        (self.file,) = directory.glob("*.h5")
        self.intact = self.file.read_bytes()
        self.rows: dict[str, np.ndarray] = {}
        #: Per data key, per row: the end of the last byte of its chunks.
        self.ends: dict[str, list[int]] = {}
        with h5py.File(self.file, "r") as file:
            for key, name in DATASETS.items():
                dataset = file[name]
                self.rows[key] = dataset[()]
                rows_per_chunk = dataset.chunks[0]
                ends = []
                for row in range(dataset.shape[0]):
                    chunk = dataset.id.get_chunk_info_by_coord(
                        (row - row % rows_per_chunk,) + (0,) * (dataset.ndim - 1)
                    )
                    ends.append(chunk.byte_offset + chunk.size)
                self.ends[key] = ends
        self.size = len(self.intact)

    def copy_to(self, where: Path, length: int | None = None) -> dict[str, str]:
        """The detector's directory copied to ``where``, its file cut to
        ``length`` bytes; the ``root_map`` that points the documents there."""
        shutil.copytree(self.directory, where)
        copy = where / self.file.name
        if length is not None:
            os.truncate(copy, length)
        return {str(self.directory): str(where)}

    def opens_cut(self, where: Path) -> bool:
        """Whether the HDF5 library opens the file cut at ``where`` at all:
        HDF5 1.14 (h5py 3.11's) refuses a truncated file, so nothing in it is
        readable; newer releases open it in SWMR mode and read what is there."""
        try:
            with h5py.File(where / self.file.name, "r", swmr=True):
                return True
        except OSError:
            return False

    def whole_rows(self, length: int) -> set[int]:
        """The rows (of every dataset) wholly before a cut at ``length``."""
        return {
            row
            for row in range(len(self.ends["det"]))
            if all(self.ends[key][row] <= length for key in DATASETS)
        }


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    tmp_path = tmp_path_factory.mktemp("blob")
    RE = RunEngine({}, call_returns_result=False)
    pattern = sim.PatternGenerator(sleep=quick_sleep())
    with init_devices():
        stage = sim.SimStage(pattern)
    det = blob_detector(tmp_path, pattern)
    RE(bps.mv(stage.x.velocity, 0, stage.y.velocity, 0))
    docs = record(RE)
    RE(grid_scan([det], stage.x, -2, 2, 3, stage.y, 0, 3, 4))
    return Recorded(docs, tmp_path / "detector")


def write(writer: ZarrWriter, docs: Docs, until: str | None = None) -> list[BaseException]:
    """Give every document (up to, not including, the first ``until``) to the
    writer; the exceptions it raised."""
    raised: list[BaseException] = []
    for name, doc in docs:
        if name == until:
            break
        try:
            writer(name, doc)
        except Exception as err:  # noqa: BLE001 - collected and checked by the caller
            raised.append(err)
    return raised


def write_flushed(writer: ZarrWriter, docs: Docs) -> list[ExternalFileError]:
    """Give every document to the writer, flushing after each stream_datum
    (its frames are read, or failed, by then); the ExternalFileErrors raised."""
    raised: list[ExternalFileError] = []
    for name, doc in docs:
        try:
            writer(name, doc)
            if name == "stream_datum":
                writer.flush()
        except ExternalFileError as err:
            raised.append(err)
    return raised


def open_primary(writer: ZarrWriter, mode: str) -> tuple[xr.Dataset, dict[str, Any]]:
    """The primary stream read back whole (every chunk, every reference), and
    the root attributes."""
    store = writer.stores[0]
    if mode == "virtual":
        from bluesky_zarr import open_virtual

        tree = open_virtual(store)
        return tree["primary"].to_dataset().load(), dict(tree.attrs)
    tree = xr.open_datatree(store, engine="zarr")
    return open_stream(Path(store)), dict(tree.attrs)


def written_rows(ds: xr.Dataset) -> set[int]:
    """The rows (seq_num - 1) of the points ``_written`` claims."""
    return {int(s) - 1 for s in ds["seq_num"].values[ds["_written"].values]}


def check_claims(recorded: Recorded, ds: xr.Dataset) -> set[int]:
    """Every point ``_written`` claims holds exactly its frame and sum."""
    claimed = written_rows(ds)
    for point in zip(*np.nonzero(ds["_written"].values)):
        row = int(ds["seq_num"].values[point]) - 1
        np.testing.assert_array_equal(
            ds["det"].values[point], recorded.rows["det"][row], err_msg=f"row {row}"
        )
        assert int(ds["det-sum"].values[point]) == recorded.rows["det-sum"][row]
    return claimed


def refused_lines(writer: ZarrWriter) -> list[dict[str, Any]]:
    path = Path(writer.stores[0]) / "refused_documents.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("mode", ["fill", "virtual"])
def test_a_file_cut_to_a_tenth_leaves_the_points_past_the_cut_unwritten(
    recorded: Recorded, tmp_path: Path, mode: str
) -> None:
    length = recorded.size // 10
    root_map = recorded.copy_to(tmp_path / "detector", length)
    writer = ZarrWriter(tmp_path / "data", external=mode, root_map=root_map)
    raised = write(writer, recorded.docs)

    ds, attrs = open_primary(writer, mode)
    whole = recorded.whole_rows(length)
    assert 0 < len(whole) < 12, "the cut should leave some rows whole and cut others"
    opens = recorded.opens_cut(tmp_path / "detector")
    if not opens:
        whole = set()  # the library reads nothing of it: nothing is claimed
    assert check_claims(recorded, ds) == whole
    assert int(ds["_written"].sum()) == len(whole)
    # Each stream_datum of a row past the cut was refused with ExternalFileError,
    # raised to the caller and kept verbatim in the store.
    assert raised and all(isinstance(e, ExternalFileError) for e in raised)
    # Said as such: the file is cut short (or, where the library refuses
    # it whole, cannot be read, with HDF5's reason).
    said = "cut short" if opens else "truncated file"
    assert all(said in str(e) for e in raised), raised[0]
    kept = refused_lines(writer)
    refused_rows = {
        line["doc"]["indices"]["start"] for line in kept if line["name"] == "stream_datum"
    }
    assert refused_rows == set(range(12)) - whole
    assert all(line["error"].startswith("ExternalFileError") for line in kept)
    assert attrs["bluesky_zarr"]["complete"] is False


TRIALS = 12


@pytest.mark.parametrize("mode", ["fill", "virtual"])
def test_a_file_cut_at_random_lengths_never_gives_a_frame_that_is_not_there(
    recorded: Recorded, tmp_path: Path, mode: str
) -> None:
    rng = random.Random(20 if mode == "fill" else 21)
    kept_whole = 0
    readable = 0
    for trial in range(TRIALS):
        length = rng.randrange(0, recorded.size)
        root_map = recorded.copy_to(tmp_path / f"detector-{trial}", length)
        writer = ZarrWriter(tmp_path / f"data-{trial}", external=mode, root_map=root_map)
        raised = write(writer, recorded.docs)
        ds, attrs = open_primary(writer, mode)
        whole = recorded.whole_rows(length)
        if not recorded.opens_cut(tmp_path / f"detector-{trial}"):
            whole = set()  # the library reads nothing of it: nothing is claimed
        else:
            readable += 1
        claimed = check_claims(recorded, ds)
        # Never a row past the cut; the rows before it kept unless the file's
        # own structure (its index, its headers) was cut too.
        assert claimed <= whole, f"cut at {length} of {recorded.size}"
        kept_whole += claimed == whole
        if len(claimed) < 12:
            assert raised and all(isinstance(e, ExternalFileError) for e in raised)
            assert attrs["bluesky_zarr"]["complete"] is False
        else:
            assert not raised
        writer.close()
    # Most cuts fall among the frames, after the file's structure.
    assert kept_whole >= TRIALS // 2
    if h5py.version.hdf5_version_tuple >= (2, 0):
        assert readable >= TRIALS // 2, "this HDF5 opens truncated files (SWMR)"


# -------------------------------------------- references checked again at stop
def references_then(
    recorded: Recorded, tmp_path: Path, change: Any
) -> tuple[ZarrWriter, Path]:
    """A virtual run of the intact file, ``change(file)`` applied after every
    frame is referenced and before the stop document."""
    root_map = recorded.copy_to(tmp_path / "detector")
    copy = tmp_path / "detector" / recorded.file.name
    writer = ZarrWriter(tmp_path / "data", external="virtual", root_map=root_map)
    assert write(writer, recorded.docs, until="stop") == []
    writer.flush()
    change(copy)
    writer(*recorded.docs[-1])
    return writer, copy


def virtual_attrs(writer: ZarrWriter) -> dict[str, Any]:
    from bluesky_zarr import open_virtual

    return dict(open_virtual(writer.stores[0])["primary"].attrs["virtual"])


def test_references_record_each_files_size_and_modification_time(
    recorded: Recorded, tmp_path: Path
) -> None:
    writer, copy = references_then(recorded, tmp_path, lambda file: None)
    ds, attrs = open_primary(writer, "virtual")
    info = os.stat(copy)
    files = virtual_attrs(writer)["files"]
    assert files == {str(copy): {"size": info.st_size, "mtime": info.st_mtime_ns / 1e9}}
    assert "changed" not in virtual_attrs(writer)
    assert check_claims(recorded, ds) == set(range(12))
    assert attrs["bluesky_zarr"]["complete"] is True


def test_a_file_that_vanished_before_stop_takes_its_points_off_written(
    recorded: Recorded, tmp_path: Path
) -> None:
    writer, copy = references_then(recorded, tmp_path, os.remove)
    ds, attrs = open_primary(writer, "virtual")
    assert not bool(ds["_written"].any())
    changed = virtual_attrs(writer)["changed"]
    assert changed[str(copy)]["why"] == "vanished"
    assert changed[str(copy)]["points_unwritten"] == 12
    assert attrs["bluesky_zarr"]["complete"] is False
    assert "vanished or were cut" in attrs["bluesky_zarr"]["incomplete_reason"]


def test_a_file_cut_after_its_frames_were_referenced_keeps_the_rows_before_the_cut(
    recorded: Recorded, tmp_path: Path
) -> None:
    length = recorded.size // 2

    def cut(file: Path) -> None:
        os.truncate(file, length)

    writer, copy = references_then(recorded, tmp_path, cut)
    ds, attrs = open_primary(writer, "virtual")
    whole = recorded.whole_rows(length)
    assert 0 < len(whole) < 12
    assert check_claims(recorded, ds) == whole
    record_ = virtual_attrs(writer)["changed"][str(copy)]
    assert record_["why"] == f"cut from {recorded.size} to {length} bytes"
    assert record_["points_unwritten"] == 12 - len(whole)
    assert attrs["bluesky_zarr"]["complete"] is False


def test_a_file_replaced_under_its_name_takes_its_points_off_written(
    recorded: Recorded, tmp_path: Path
) -> None:
    def replace(file: Path) -> None:
        other = file.with_suffix(".other")
        other.write_bytes(file.read_bytes())
        os.replace(other, file)  # the same bytes, but another file

    writer, copy = references_then(recorded, tmp_path, replace)
    ds, _ = open_primary(writer, "virtual")
    assert not bool(ds["_written"].any())
    changed = virtual_attrs(writer)["changed"][str(copy)]
    assert changed["why"] == "replaced by another file of the same name"


def test_a_file_appended_to_after_its_frames_were_referenced_is_named_and_kept(
    recorded: Recorded, tmp_path: Path
) -> None:
    def append(file: Path) -> None:
        with open(file, "ab") as handle:
            handle.write(b"\0" * 4096)
        info = os.stat(file)
        os.utime(file, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))

    writer, copy = references_then(recorded, tmp_path, append)
    ds, attrs = open_primary(writer, "virtual")
    assert check_claims(recorded, ds) == set(range(12))
    changed = virtual_attrs(writer)["changed"][str(copy)]
    assert changed["why"].startswith("modified after its last reference")
    assert (changed["points_unwritten"], changed["points_kept"]) == (0, 12)
    assert attrs["bluesky_zarr"]["complete"] is True


# ------------------------------------------------------------- other formats
def format_docs(RE: Any, tmp_path: Path, fmt: str) -> tuple[Docs, Any]:
    from test_external_formats import step_docs

    return step_docs(RE, tmp_path, fmt)


@pytest.mark.parametrize("fmt", ["tiff", "jpeg", "npy"])
def test_a_short_image_file_leaves_its_point_unwritten(RE, tmp_path, fmt):
    from test_external_formats import decoded

    docs, setup = format_docs(RE, tmp_path, fmt)
    short = Path(setup.log[2].where)
    os.truncate(short, short.stat().st_size // 2)
    writer = ZarrWriter(tmp_path / "data")
    raised = write_flushed(writer, docs)
    assert raised and short.name in str(raised[0])
    ds = open_stream(Path(writer.stores[0]))
    assert ds["_written"].values.tolist() == [True, True, False, True]
    for i in (0, 1, 3):
        np.testing.assert_array_equal(ds["det"].values[i], decoded(fmt, setup.log[i]))
    assert [line["name"] for line in refused_lines(writer)] == ["stream_datum"]


@pytest.mark.parametrize("damage", ["missing", "short"])
def test_a_zarr_chunk_missing_or_short_leaves_its_point_unwritten(RE, tmp_path, damage):
    docs, setup = format_docs(RE, tmp_path, "zarr")
    (sres,) = by_kind(docs, "stream_resource")
    chunk = Path(urlparse(sres["uri"]).path) / sres["parameters"]["path"] / "c" / "2" / "0" / "0"
    assert chunk.is_file()
    if damage == "missing":
        chunk.unlink()
    else:
        os.truncate(chunk, chunk.stat().st_size // 2)
    writer = ZarrWriter(tmp_path / "data")
    raised = write_flushed(writer, docs)
    assert len(raised) == 1
    ds = open_stream(Path(writer.stores[0]))
    assert ds["_written"].values.tolist() == [True, True, False, True]
    frames = np.stack([w.frame for w in setup.log])
    np.testing.assert_array_equal(ds["det"].values[[0, 1, 3]], frames[[0, 1, 3]])



# -------------------------------------------- ophyd v1 area detectors (AD_HDF5)
@pytest.mark.parametrize("mode", ["fill", "virtual"])
def test_an_area_detector_file_cut_after_it_was_opened_keeps_the_points_before_the_cut(
    tmp_path: Path, mode: str
) -> None:
    """The handler opened the file for the first points; then it is cut after
    the third frame: HDF5 checks a cut file only when it opens it."""
    from test_virtual import area_detector_run

    from bluesky_zarr.external._handlers import AreaDetectorHDF5Handler

    docs, expected = area_detector_run(tmp_path / "ad", 1)
    h5 = tmp_path / "ad" / "ad.h5"
    with h5py.File(h5, "r") as file:
        third = file["/entry/data/data"].id.get_chunk_info_by_coord((2, 0, 0))
    options: dict[str, Any] = {"external": mode}
    if mode == "fill":
        options["handler_registry"] = {"AD_HDF5": AreaDetectorHDF5Handler}
    writer = ZarrWriter(tmp_path / "data", **options)
    events = 0
    raised = []
    for name, doc in docs:
        if name == "event" and events == 3:
            os.truncate(h5, third.byte_offset + third.size)
        try:
            writer(name, doc)
        except ExternalFileError as err:
            raised.append(err)
        events += name == "event"
    assert len(raised) == 3 and all("cut short" in str(e) for e in raised)
    ds, attrs = open_primary(writer, mode)
    # Points 1-3 (a snaked 2 x 3 grid: (0,0), (0,1), (0,2)) hold their frames.
    assert ds["_written"].values.tolist() == [[True, True, True], [False, False, False]]
    np.testing.assert_array_equal(ds["cam"].values[0], expected[0])
    assert attrs["bluesky_zarr"]["complete"] is False
