"""User options: dimension names, chunking, names; bad options are refused."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from bluesky.plans import grid_scan

import bluesky_zarr
from bluesky_zarr import ZarrWriter
from bluesky_zarr.sim import PointCamera, motors

from conftest import assert_frames_match, open_stream


def run_grid(RE, writer, shape=(8, 8)):
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=shape, name="cam")
    RE.subscribe(writer)
    RE(grid_scan([cam], wavelength, 400, 700, 4, position, 0, 5, 5, snake_axes=True))
    return writer.stores[-1]


def test_custom_dimension_names(RE, tmp_path):
    store = run_grid(RE, ZarrWriter(tmp_path, dims=["wl", "pos"]))
    ds = open_stream(store)
    assert ds["cam_image"].dims == ("wl", "pos", "y", "x")
    np.testing.assert_allclose(ds["wl"], np.linspace(400, 700, 4))
    assert ds["wl"].attrs["motor"] == "wavelength"
    # The readbacks keep the motors' names.
    assert ds["wavelength"].dims == ("wl", "pos")
    assert assert_frames_match(ds, "cam_image", {"w": "wl", "p": "pos"}, (8, 8)) == 20


@pytest.mark.parametrize(
    "chunks, shards",
    [
        ({"cam_image": (4, 1, 8, 8)}, None),  # all wavelengths per position
        ({"cam_image": (1, 1, 4, 4)}, {"cam_image": (2, 5, 8, 8)}),
        (None, {"cam_image": (4, 2, 8, 8)}),
        ({"cam_image": (3, 2, 5, 3)}, None),  # chunks that do not divide the shape
    ],
)
def test_custom_chunking(RE, tmp_path, chunks, shards):
    store = run_grid(RE, ZarrWriter(tmp_path, chunks=chunks, shards=shards))
    array = zarr.open_group(store, mode="r")["primary/cam_image"]
    if chunks:
        assert array.chunks == chunks["cam_image"]
    if shards:
        assert array.shards == shards["cam_image"]
    ds = open_stream(store)
    motors_at = {"wavelength": "wavelength", "position": "position"}
    assert assert_frames_match(ds, "cam_image", motors_at, (8, 8)) == 20
    assert bool(ds["_written"].all())


def test_default_layout_is_frame_chunks_in_row_shards(RE, tmp_path):
    store = run_grid(RE, ZarrWriter(tmp_path))
    array = zarr.open_group(store, mode="r")["primary/cam_image"]
    assert array.chunks == (1, 1, 8, 8)
    assert array.shards == (1, 5, 8, 8)


def test_uncompressed_option(RE, tmp_path):
    store = run_grid(RE, ZarrWriter(tmp_path, compressors=None))
    array = zarr.open_group(store, mode="r")["primary/cam_image"]
    assert array.compressors == ()


@pytest.mark.parametrize(
    "options, match",
    [
        ({"dims": "wavelength"}, "dims"),
        ({"chunks": {"cam_image": (1, 0, 8, 8)}}, "positive"),
        ({"chunks": [(1, 1, 8, 8)]}, "map data key"),
        ({"chunks": {"cam_image": "big"}}, "tuple of integers"),
        ({"shards": {"cam_image": (1, 1.5, 8, 8)}}, "positive integers"),
        ({"compressors": "fast"}, "compressors"),
        ({"max_buffer_bytes": 0}, "max_buffer_bytes"),
        ({"flush_interval": -1}, "flush_interval"),
        ({"workers": 0}, "workers"),
        ({"name_template": ""}, "name_template"),
    ],
)
def test_bad_options_are_refused_at_once(tmp_path, options, match):
    with pytest.raises(bluesky_zarr.OptionError, match=match):
        ZarrWriter(tmp_path, **options)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"dims": ["a", "b", "c"]}, "2 scan dimension"),
        ({"chunks": {"cam_image": (1, 8, 8)}}, "4 positive integers"),
        ({"chunks": {"cam_image": (1, 2, 8, 8)}, "shards": {"cam_image": (1, 3, 8, 8)}},
         "multiples"),
    ],
)
def test_options_that_do_not_fit_the_run_are_refused(RE, tmp_path, options, match):
    with pytest.raises(bluesky_zarr.OptionError, match=match):
        run_grid(RE, ZarrWriter(tmp_path, **options))


def test_existing_store_is_never_overwritten(RE, tmp_path):
    writer = ZarrWriter(tmp_path, name_template="scan")
    store = run_grid(RE, writer)
    before = open_stream(store)
    RE2 = type(RE)({})
    with pytest.raises(bluesky_zarr.StoreExistsError, match="overwrite"):
        run_grid(RE2, ZarrWriter(tmp_path, name_template="scan"))
    after = open_stream(store)
    np.testing.assert_array_equal(before["cam_image"], after["cam_image"])


def test_overwrite_opt_in(RE, tmp_path):
    run_grid(RE, ZarrWriter(tmp_path, name_template="scan"))
    RE2 = type(RE)({})
    store = run_grid(RE2, ZarrWriter(tmp_path, name_template="scan", overwrite=True))
    assert open_stream(store)["_written"].all()


@pytest.mark.parametrize(
    "sample, expected",
    [
        ("../../etc/passwd", "etc_passwd"),
        ("/abs/path", "abs_path"),
        ("we ird*name?", "we_ird_name_"),
    ],
)
def test_names_from_metadata_stay_inside_the_root(RE, tmp_path, sample, expected):
    root = tmp_path / "root"
    writer = ZarrWriter(root, name_template="{sample}-{scan_id}")
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=(4, 4), name="cam")
    RE.subscribe(writer)
    RE(grid_scan([cam], wavelength, 1, 2, 2, position, 1, 2, 2), sample=sample)
    (store,) = writer.stores
    assert store.parent == root
    assert expected in store.name
    assert open_stream(store)["_written"].all()


@pytest.mark.parametrize("template", ["../{scan_id}", "/tmp/{scan_id}"])
def test_templates_escaping_the_root_are_refused(tmp_path, template, RE):
    with pytest.raises(bluesky_zarr.BlueskyZarrError):
        run_grid(RE, ZarrWriter(tmp_path, name_template=template))


def test_missing_template_field_is_a_document_error(RE, tmp_path):
    with pytest.raises(bluesky_zarr.DocumentError, match="sample"):
        run_grid(RE, ZarrWriter(tmp_path, name_template="{sample}"))
