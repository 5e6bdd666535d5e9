"""Forks the runs that test_review_metadata.py kills at random times.

Imports once, then forks one process per ``run <root>`` line on stdin and
answers its pid; ``reap <pid>`` waits for that process and answers its status.
Each run grows its streams (a count, a baseline, a monitor-like second stream
and an array whose shape only its first value tells), flushing every 10 ms,
so that its arrays are resized and the root's consolidated metadata rewritten
all the time.
"""

from __future__ import annotations

import gc
import os
import sys

import numpy as np
from event_model import compose_run

from bluesky_zarr import ZarrWriter


def run(root: str) -> None:
    try:
        writer = ZarrWriter(root, name_template="run", flush_interval=0.01,
                            max_buffer_bytes=1 << 16)
        bundle = compose_run(metadata={"scan_id": 1, "sample": "é"})
        writer("start", bundle.start_doc)
        number = {"source": "sim", "dtype": "number", "shape": []}
        late = {"source": "sim", "dtype": "array", "shape": [None, None]}
        primary = bundle.compose_descriptor(name="primary", data_keys={"d": number, "img": late})
        other = bundle.compose_descriptor(name="other", data_keys={"m": number})
        writer("descriptor", primary.descriptor_doc)
        for n in range(400):
            image = np.full((4, 3), n, dtype="uint16")
            writer("event", primary.compose_event(data={"d": float(n), "img": image},
                                                  timestamps={"d": 0.0, "img": 0.0}))
            if n == 50:
                writer("descriptor", other.descriptor_doc)
            if n > 50 and n % 7 == 0:
                writer("event", other.compose_event(data={"m": float(n)}, timestamps={"m": 0.0}))
        writer("stop", bundle.compose_stop())
    except BaseException:  # noqa: BLE001 - the process ends either way
        os._exit(1)
    os._exit(0)


def main() -> None:
    gc.freeze()
    print("imported", flush=True)
    for line in sys.stdin:
        command, argument = line.split()
        if command == "run":
            pid = os.fork()
            if pid == 0:
                devnull = os.open(os.devnull, os.O_RDWR)
                os.dup2(devnull, 0)
                os.dup2(devnull, 1)
                run(argument)
            print(pid, flush=True)
        elif command == "reap":
            _, status = os.waitpid(int(argument), 0)
            print(status, flush=True)


if __name__ == "__main__":
    main()
