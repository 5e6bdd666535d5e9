"""Runs plans of tests/geometry_plans.py in a child process (with the
PYTHONHASHSEED its parent chose) and prints what each store looks like, one
JSON line per plan."""

from __future__ import annotations

import json
import sys

from bluesky import RunEngine

from bluesky_zarr import ZarrWriter

from geometry_plans import run_plan


def main(directory: str, names: list[str]) -> None:
    RE = RunEngine({}, call_returns_result=False)
    writer = ZarrWriter(directory)
    RE.subscribe(writer)
    for name in names:
        print(json.dumps(run_plan(RE, writer, name)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
