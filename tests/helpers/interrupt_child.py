"""A user's script: a RunEngine, a ZarrWriter and a grid scan, nothing else.

test_interrupt.py interrupts it (SIGINT as Ctrl-C sends it, SIGTERM) at
random moments. It says on stdout, unbuffered, ``start`` once the writer has
taken the start document and ``event <seq_num>`` once it has taken each
event (it is subscribed after the writer).

With ``INTERRUPT_CHILD_NO_THREADS_AT_EXIT=1`` in its environment, no thread
starts at exit, after the writer's and weakref's exit handlers were
registered (so before they run), as on Python 3.12.

    python interrupt_child.py <root>
"""

from __future__ import annotations

import atexit
import os
import sys
import threading

from bluesky import RunEngine
from bluesky.plans import grid_scan

from bluesky_zarr import ZarrWriter
from bluesky_zarr.sim import PointCamera, motors

#: The scan: a 10 x 20 grid of 64 x 64 frames (see test_interrupt.py).
FRAME = (64, 64)


def say(name: str, doc: dict) -> None:
    # One write a line: bluesky's Ctrl-C messages come from another thread.
    sys.stdout.write((f"event {doc['seq_num']}" if name == "event" else name) + "\n")
    sys.stdout.flush()


def refuse_threads() -> None:
    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    threading.Thread.start = refuse  # type: ignore[method-assign]


def main(root: str) -> None:
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=FRAME, name="cam")
    RE = RunEngine({})
    RE.subscribe(ZarrWriter(root, name_template="scan"))
    if os.environ.get("INTERRUPT_CHILD_NO_THREADS_AT_EXIT"):
        atexit.register(refuse_threads)
    RE.subscribe(say)
    RE(grid_scan([cam], wavelength, 400, 700, 10, position, 0, 5, 20))
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
