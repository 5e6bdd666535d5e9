"""Frame dimensions take their coordinates from the devices' configuration.

An ophyd device (``bluesky_zarr.sim.SpectrumDetector``, a multichannel
analyser) declares its spectrum's dimension (``dims: ["energy"]``) and holds
the energy of each bin in a configuration component; xarray reads the
spectra back with those energies as the dimension's coordinate, also when
the device is recalibrated during the run.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import tensorstore
from bluesky import RunEngine
from bluesky import plan_stubs as bps
from bluesky.plans import count, grid_scan, scan

from bluesky_zarr import OptionError, ZarrWriter
from bluesky_zarr.sim import PointCamera, SpectrumDetector, motors, spectrum_at

from conftest import open_stream

ENERGIES = np.linspace(1.0, 10.0, 32)
RECALIBRATED = np.linspace(1.5, 10.5, 32)


def recalibrate_at(mca: SpectrumDetector, step_number: int, energies: Any) -> Any:
    """A per_step that reconfigures the analyser before step ``step_number``."""
    steps: list[Any] = []

    def per_step(detectors: Any, step: Any, pos_cache: Any) -> Any:
        steps.append(step)
        if len(steps) == step_number:
            yield from bps.configure(mca, {"energy": np.asarray(energies)})
        yield from bps.one_nd_step(detectors, step, pos_cache)

    return per_step


def test_a_spectrum_has_the_energies_of_its_bins_as_coordinate(RE: RunEngine, tmp_path) -> None:
    wavelength, position = motors("wavelength", "position")
    mca = SpectrumDetector([wavelength, position], energies=ENERGIES)
    cam = PointCamera([wavelength, position], shape=(4, 5), name="cam")
    writer = ZarrWriter(tmp_path)
    RE.subscribe(writer)
    RE(grid_scan([mca, cam], wavelength, 400, 700, 3, position, 0, 5, 4, snake_axes=True))
    ds = open_stream(writer.stores[0])

    spectrum = ds["mca_spectrum"]
    assert spectrum.dims == ("wavelength", "position", "energy")
    assert "energy" in ds.indexes
    np.testing.assert_array_equal(ds["energy"].values, ENERGIES)
    assert ds["energy"].attrs["units"] == "keV"
    assert ds["energy"].attrs["configuration_key"] == "mca_energy"
    assert spectrum.attrs["units"] == "counts"
    # Frames of a camera without a configured axis keep plain dimensions.
    assert ds["cam_image"].dims == ("wavelength", "position", "y", "x")
    assert "y" not in ds.coords
    # Every spectrum is the one the analyser recorded there, bin for bin.
    for i, j in np.ndindex(3, 4):
        at = {"wavelength": float(ds["wavelength"][i]), "position": float(ds["position"][j])}
        np.testing.assert_array_equal(spectrum.values[i, j], spectrum_at(at, ENERGIES))
    # Selected by energy: the line at 6.4 keV is the brightest bin.
    line = spectrum.sel(energy=6.4, method="nearest")
    assert line.dims == ("wavelength", "position")
    assert (spectrum.idxmax("energy").values == ENERGIES[np.argmin(abs(ENERGIES - 6.4))]).all()
    assert bool(ds["_written"].all())
    # Nothing is per point when the configuration never changed.
    assert "energy_per_point" not in ds.variables
    # Another Zarr V3 implementation reads the coordinate as it is.
    spec = {"driver": "zarr3",
            "kvstore": {"driver": "file", "path": str(writer.stores[0] / "primary" / "energy")}}
    np.testing.assert_array_equal(
        np.asarray(tensorstore.open(spec, open=True).result().read().result()), ENERGIES
    )


def test_a_recalibration_during_the_run_gives_each_point_its_energies(
    RE: RunEngine, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    (position,) = motors("position")
    mca = SpectrumDetector([position], energies=ENERGIES)
    writer = ZarrWriter(tmp_path)
    RE.subscribe(writer)
    documents: list[tuple[str, dict[str, Any]]] = []
    RE.subscribe(lambda name, doc: documents.append((name, doc)))
    with caplog.at_level(logging.WARNING, logger="bluesky_zarr"):
        RE(scan([mca], position, 0, 5, 6, per_step=recalibrate_at(mca, 4, RECALIBRATED)))
    descriptors = [d for n, d in documents if n == "descriptor"]
    assert len(descriptors) == 2, "the RunEngine describes the stream again after configure"
    assert "changed during the run" in caplog.text

    ds = open_stream(writer.stores[0])
    # The index keeps the first descriptor's energies, and says it changed.
    np.testing.assert_array_equal(ds["energy"].values, ENERGIES)
    assert "energy_per_point" in ds["energy"].attrs["comment"]
    per_point = ds["energy_per_point"]
    assert per_point.dims == ("position", "energy")
    assert "energy_per_point" in ds["mca_spectrum"].coords
    assert per_point.attrs["units"] == "keV"
    events = [d for n, d in documents if n == "event"]
    for point, event in enumerate(events):
        energies = ENERGIES if event["descriptor"] == descriptors[0]["uid"] else RECALIBRATED
        np.testing.assert_array_equal(per_point.values[point], energies)
        np.testing.assert_array_equal(
            ds["mca_spectrum"].values[point],
            spectrum_at({"position": float(ds["position"][point])}, energies),
        )
        # The line sits at 6.4 keV in the energies of its own point.
        brightest = int(ds["mca_spectrum"].values[point].argmax())
        assert abs(per_point.values[point, brightest] - 6.4) < 0.3
    assert [e["descriptor"] for e in events].count(descriptors[1]["uid"]) == 3
    # The group keeps both descriptors verbatim (their configurations).
    kept = ds.attrs["descriptors"]
    assert [d["uid"] for d in kept] == [d["uid"] for d in descriptors]


def test_a_recalibration_in_a_growing_stream(RE: RunEngine, tmp_path) -> None:
    mca = SpectrumDetector(energies=ENERGIES)
    writer = ZarrWriter(tmp_path)
    RE.subscribe(writer)

    def plan() -> Any:
        def shots(n: int) -> Any:
            for _ in range(n):
                yield from bps.trigger_and_read([mca])

        from bluesky import preprocessors as bpp

        @bpp.run_decorator()
        def inner() -> Any:
            yield from shots(2)
            yield from bps.configure(mca, {"energy": RECALIBRATED})
            yield from shots(3)

        return (yield from inner())

    RE(plan())
    ds = open_stream(writer.stores[0])
    assert ds["mca_spectrum"].dims == ("time", "energy")
    np.testing.assert_array_equal(ds["energy"].values, ENERGIES)
    expected = np.stack([ENERGIES] * 2 + [RECALIBRATED] * 3)
    np.testing.assert_array_equal(ds["energy_per_point"].values, expected)
    for point in range(5):
        np.testing.assert_array_equal(
            ds["mca_spectrum"].values[point], spectrum_at({}, expected[point])
        )


def test_frame_coords_maps_a_dimension_to_a_configuration_key(RE: RunEngine, tmp_path) -> None:
    (position,) = motors("position")
    # The data key calls the dimension "channel": no configuration key of that name.
    mca = SpectrumDetector([position], energies=ENERGIES, dim="channel")
    plain = ZarrWriter(tmp_path / "plain")
    mapped = ZarrWriter(tmp_path / "mapped", frame_coords={"channel": "mca_energy"})
    RE.subscribe(plain)
    RE.subscribe(mapped)
    RE(scan([mca], position, 0, 5, 3))
    without = open_stream(plain.stores[0])
    assert without["mca_spectrum"].dims == ("position", "channel")
    assert "channel" not in without.coords
    ds = open_stream(mapped.stores[0])
    assert ds["mca_spectrum"].dims == ("position", "channel")
    np.testing.assert_array_equal(ds["channel"].values, ENERGIES)
    assert ds["channel"].attrs["units"] == "keV"


def test_each_analyser_has_an_energy_axis_of_its_own(
    RE: RunEngine, tmp_path
) -> None:
    (position,) = motors("position")
    first = SpectrumDetector([position], energies=ENERGIES, name="mca")
    other = np.linspace(0.5, 20.0, 32)
    second = SpectrumDetector([position], energies=other, name="xrf")
    same = SpectrumDetector([position], energies=ENERGIES, name="twin")
    writer = ZarrWriter(tmp_path)
    RE.subscribe(writer)
    RE(scan([first, second, same], position, 0, 5, 3))
    ds = open_stream(writer.stores[0])
    assert ds["mca_spectrum"].dims == ("position", "energy")
    assert ds["xrf_spectrum"].dims == ("position", "xrf_spectrum_energy")
    # Each device's axis is its own, even with equal values today:
    # recalibrating one must not move the other's.
    assert ds["twin_spectrum"].dims == ("position", "twin_spectrum_energy")
    np.testing.assert_array_equal(ds["energy"].values, ENERGIES)
    np.testing.assert_array_equal(ds["twin_spectrum_energy"].values, ENERGIES)
    np.testing.assert_array_equal(ds["xrf_spectrum_energy"].values, other)
    np.testing.assert_array_equal(
        ds["xrf_spectrum"].values[1], spectrum_at({"position": 2.5}, other)
    )


def test_a_declared_key_that_does_not_fit_is_said_and_left_out(
    RE: RunEngine, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    mca = SpectrumDetector(energies=ENERGIES, dim="channel")
    writer = ZarrWriter(
        tmp_path, frame_coords={"channel": "mca_gain", "pixel": "mca_energy"}
    )
    RE.subscribe(writer)
    with caplog.at_level(logging.WARNING, logger="bluesky_zarr"):
        RE(count([mca], 2))
    ds = open_stream(writer.stores[0])
    assert "channel" not in ds.coords
    np.testing.assert_array_equal(ds["mca_spectrum"].values[0], spectrum_at({}, ENERGIES))
    assert "'mca_gain', which no device's configuration holds" in caplog.text
    assert "frame_coords= names dimensions that no frame of run" in caplog.text
    assert "['pixel']" in caplog.text


@pytest.mark.parametrize(
    "value",
    ["energy", {"energy": 3}, {"": "mca_energy"}, {"energy": ""}, [("energy", "mca_energy")]],
)
def test_bad_frame_coords_are_refused(tmp_path, value: Any) -> None:
    with pytest.raises(OptionError, match="frame_coords="):
        ZarrWriter(tmp_path, frame_coords=value)
