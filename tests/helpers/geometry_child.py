"""Runs plans of tests/helpers/geometry_plans.py in a child process (with the
PYTHONHASHSEED its parent chose) and prints what each store looks like, one
JSON line per plan."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bluesky import RunEngine

from bluesky_zarr import ZarrWriter
from helpers.geometry_plans import run_ophyd_async_spec_scan, run_plan


def main(directory: str, names: list[str]) -> None:
    RE = RunEngine({}, call_returns_result=False)
    writer = ZarrWriter(directory)
    RE.subscribe(writer)
    for name in names:
        if name == "ophyd_async_spec_scan":
            result = run_ophyd_async_spec_scan(RE, writer, Path(directory))
        else:
            result = run_plan(RE, writer, name)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
