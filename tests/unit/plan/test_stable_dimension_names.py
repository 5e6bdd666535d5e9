"""Dimension names do not depend on the process: the same scan, the same names.

bluesky builds ``motors`` and ``hints.dimensions`` of ``scan_nd`` from the
cycler's keys, a set, so their order follows the hash seed of the process
(and where in memory the devices lie).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from bluesky.plans import scan_nd
from cycler import cycler
from ophyd.sim import SynAxis, SynGauss

import bluesky_zarr
from bluesky_zarr import ZarrWriter

from conftest import open_stream

#: Processes are started in batches, with new hash seeds, until both orders came.
BATCH = 4
MAX_BATCHES = 4

CHILD = """
import json, sys
import xarray as xr
from bluesky import RunEngine
from bluesky.plans import scan_nd
from cycler import cycler
from ophyd.sim import SynAxis, SynGauss
from bluesky_zarr import ZarrWriter

motor1, motor2 = SynAxis(name="motor1"), SynAxis(name="motor2")
peak = SynGauss("peak", motor1, "motor1", center=2, Imax=1, sigma=1)
RE = RunEngine({})
writer = ZarrWriter(sys.argv[1], name_template="scan")
starts = []
RE.subscribe(lambda name, doc: starts.append(doc) if name == "start" else None)
RE.subscribe(writer)
RE(scan_nd([peak], cycler(motor1, [1, 2, 3, 4]) + cycler(motor2, [10, 20, 30, 40])))
ds = xr.open_zarr(writer.stores[0], group="primary").load()
print(json.dumps({
    "motors": list(starts[0]["motors"]),
    "dims": {name: list(var.dims) for name, var in ds.variables.items()},
    "coords": sorted(ds.coords),
    "values": {
        name: var.values.tolist() for name, var in ds.variables.items() if name != "time"
    },
}))
"""


def run_in_process(seed: int, directory: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONHASHSEED=str(seed))
    # The child imports this package from where this process does.
    package_root = str(Path(bluesky_zarr.__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join([package_root, env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, "-W", "ignore", "-c", CHILD, str(directory)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_scan_nd_of_motors_stepped_together_names_the_same_dimension(tmp_path):
    results = {}
    for batch in range(MAX_BATCHES):
        seeds = range(batch * BATCH, (batch + 1) * BATCH)
        children = {seed: run_in_process(seed, tmp_path / str(seed)) for seed in seeds}
        for seed, child in children.items():
            out, err = child.communicate(timeout=120)
            assert child.returncode == 0, err
            results[seed] = json.loads(out.strip().splitlines()[-1])
        if len({tuple(r["motors"]) for r in results.values()}) > 1:
            break

    # The documents may list the motors in different orders in different
    # processes (both orders are forced in the test below, whatever happens
    # here). The store does not: named after the first motor in sorted order, the
    # other is a coordinate along the same dimension.
    first = results[0]
    assert first["dims"]["peak"] == ["motor1"]
    assert first["dims"]["motor2"] == ["motor1"]
    assert first["coords"] == ["motor1", "motor2"]
    assert first["values"]["motor1"] == [1, 2, 3, 4]
    assert first["values"]["motor2"] == [10, 20, 30, 40]
    assert first["values"]["seq_num"] == [1, 2, 3, 4]
    for seed, result in results.items():
        assert result["dims"] == first["dims"], seed
        assert result["coords"] == first["coords"], seed
        assert result["values"] == first["values"], seed


def test_both_orders_of_the_motors_give_the_same_store(RE, tmp_path):
    """The two orders bluesky may put the motors in, forced: the same store."""
    motor1, motor2 = SynAxis(name="motor1"), SynAxis(name="motor2")
    peak = SynGauss("peak", motor1, "motor1", center=2, Imax=1, sigma=1)
    docs: list[tuple[str, dict[str, Any]]] = []
    RE(
        scan_nd([peak], cycler(motor1, [1, 2, 3, 4]) + cycler(motor2, [10, 20, 30, 40])),
        lambda name, doc: docs.append((name, copy.deepcopy(doc))),
    )
    stores = []
    for order in (["motor1", "motor2"], ["motor2", "motor1"]):
        writer = ZarrWriter(tmp_path / "-".join(order), name_template="scan")
        for name, doc in docs:
            if name == "start":
                doc = copy.deepcopy(doc)
                doc["motors"] = list(order)
                doc["hints"]["dimensions"] = [([m], "primary") for m in order]
            writer(name, doc)
        stores.append(writer.stores[0])
    first, second = (open_stream(Path(store)) for store in stores)
    assert first["peak"].dims == second["peak"].dims == ("motor1",)
    assert sorted(first.coords) == sorted(second.coords) == ["motor1", "motor2"]
    for name in first.variables:
        np.testing.assert_array_equal(first[name].values, second[name].values, err_msg=name)
