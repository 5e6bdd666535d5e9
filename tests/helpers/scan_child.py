"""A scan run in a child process by the kill tests: prints where it is."""

from __future__ import annotations

import sys

from bluesky import RunEngine
from bluesky.plans import grid_scan

from bluesky_zarr import ZarrWriter
from bluesky_zarr.sim import PointCamera, motors


def main(directory: str) -> None:
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=(32, 32), name="cam")
    writer = ZarrWriter(
        directory,
        name_template="scan",
        # Small shards, a tiny buffer and a short flush interval make the
        # writer spill and merge partial shards: the riskiest writes.
        shards={"cam_image": (1, 3, 32, 32)},
        max_buffer_bytes=3 * 32 * 32 * 2,
        flush_interval=0.01,
    )
    RE = RunEngine({})

    def report(name: str, doc: dict) -> None:
        label = f"event {doc['seq_num']}" if name == "event" else name
        print(label, flush=True)

    RE.subscribe(report)
    RE.subscribe(writer)
    RE(grid_scan([cam], wavelength, 400, 700, 4, position, 0, 5, 5, snake_axes=True))
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
