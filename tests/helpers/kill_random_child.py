"""Forks the scans that test_kill_random.py kills at random times.

Importing bluesky, ophyd and zarr takes longer than the scan itself, so this
process imports once and forks one process per scan. No thread runs at the
fork: each forked process builds its own devices, RunEngine and writer, like
a fresh writer process. It says where it is through a named pipe, one
``<label> <monotonic time>`` line each: ``ready`` as it starts, then one line
per document (``start`` before the writer sees the start document), then
``done`` once the RunEngine has returned.

Commands on stdin, one a line, each answered by one line on stdout:

    run <root> <fifo>   fork a scan that writes into <root>; answers its pid
    reap <pid>          wait until that process has ended; answers its status

A forked process stays a zombie until it is reaped, so its pid cannot be
reused by another process while the test may still signal it.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import traceback

from bluesky import RunEngine
from bluesky.plans import grid_scan

from bluesky_zarr import ZarrWriter
from bluesky_zarr.sim import PointCamera, motors

#: The scan: a 4 x 5 grid of 32 x 32 frames (see test_kill_random.py).
SCAN = ("wavelength", 400, 700, 4, "position", 0, 5, 5)
FRAME = (32, 32)


def scan(root: str, fifo: str) -> None:
    out = os.open(fifo, os.O_WRONLY)

    def say(label: str) -> None:
        os.write(out, f"{label} {time.monotonic():.6f}\n".encode())

    say("ready")
    try:
        wavelength, position = motors("wavelength", "position")
        cam = PointCamera([wavelength, position], shape=FRAME, name="cam")
        writer = ZarrWriter(
            root,
            name_template="scan",
            # Small shards, a tiny buffer and a short flush interval make the
            # writer spill and merge partial shards: the riskiest writes.
            shards={"cam_image": (1, 3, *FRAME)},
            max_buffer_bytes=3 * FRAME[0] * FRAME[1] * 2,
            flush_interval=0.01,
        )
        RE = RunEngine({})

        def report(name: str, doc: dict) -> None:
            say(f"event{doc['seq_num']}" if name == "event" else name)

        # Subscribed first: "start" is said before the writer makes the store.
        RE.subscribe(report)
        RE.subscribe(writer)
        _, w0, w1, nw, _, p0, p1, npos = SCAN
        RE(grid_scan([cam], wavelength, w0, w1, nw, position, p0, p1, npos, snake_axes=True))
        say("done")
    except BaseException:  # noqa: BLE001 - said to the test, then the process ends
        say("error " + traceback.format_exc().replace("\n", " | "))
        os._exit(1)
    os._exit(0)


def main() -> None:
    # Keep the collector off the imported objects, so that forked processes
    # share their pages instead of copying them.
    gc.freeze()
    print("imported", flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        if command == "run":
            root, fifo = args
            pid = os.fork()
            if pid == 0:
                devnull = os.open(os.devnull, os.O_RDWR)
                os.dup2(devnull, 0)
                os.dup2(devnull, 1)
                scan(root, fifo)
            print(pid, flush=True)
        elif command == "reap":
            _, status = os.waitpid(int(args[0]), 0)
            print(status, flush=True)


if __name__ == "__main__":
    main()
