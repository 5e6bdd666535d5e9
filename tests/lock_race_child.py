"""One of the processes that test_lock_race.py races on one store name.

    python lock_race_child.py writer <root> <log> <seconds>
    python lock_race_child.py lock <store path> <log> <seconds>

``writer`` runs short scans one after another for ``<seconds>``, each into
``<root>/same.zarr`` with ``overwrite=True``, and appends one JSON line per
run to ``<log>``: refused at start (and by which exception), written (and
when, on ``CLOCK_MONOTONIC``, which all processes of a machine share), or
failed after it started. Times: ``t_open`` just after the start document returned (the writer holds
the store), ``t_stopping`` just before the stop document is handed over (it
still does), ``t_closed`` just after the stop document returned. ``lock``
takes and releases the store lock of
``<store path>`` in a loop, appending ``<pid> start`` once it holds it and
``<pid> end`` before it lets go to ``<log>``, opened with ``O_APPEND`` by every
process, so the file's order is the order of the holds.

Both print ``ready`` once imported and start when a line comes on stdin, so
that all processes race from the same moment; at the end they print a JSON
summary.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bluesky import RunEngine
from bluesky.plans import grid_scan

from bluesky_zarr import StoreLockedError, ZarrWriter
from bluesky_zarr.sim import PointCamera, motors

try:
    from bluesky_zarr.write._run import StoreLock
except ImportError:  # the lock may live with the storage code
    from bluesky_zarr.storage._lock import StoreLock


def now() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def error_record(err: BaseException) -> dict[str, Any]:
    return {
        "error": type(err).__name__,
        "module": type(err).__module__,
        "message": str(err),
        "traceback": traceback.format_exception(err),
    }


def writer(root: str, log: str, seconds: float) -> dict[str, Any]:
    m1, m2 = motors("m1", "m2")
    cam = PointCamera([m1, m2], shape=(8, 8), name="cam")
    zarr_writer = ZarrWriter(root, name_template="same", overwrite=True)
    RE = RunEngine({}, call_returns_result=False)
    attempt: dict[str, Any] = {}

    def forward(name: str, doc: dict[str, Any]) -> None:
        # A start the writer refuses aborts the run, as it would with the
        # writer subscribed directly (and the next attempt comes soon). Later
        # exceptions are recorded, not raised, so that the run goes to its end.
        if "refused" in attempt:
            return
        if name == "stop":
            attempt["t_stopping"] = now()
        try:
            zarr_writer(name, doc)
        except Exception as err:
            if name == "start":
                attempt["refused"] = error_record(err)
                raise
            attempt.setdefault("errors", []).append({"document": name, **error_record(err)})
            return
        if name == "start":
            attempt["t_open"] = now()
            attempt["uid"] = doc["uid"]
        elif name == "stop":
            attempt["t_closed"] = now()

    RE.subscribe(forward)
    runs = 0
    with open(log, "a") as out:
        deadline = now() + seconds
        while now() < deadline:
            attempt = {}
            try:
                RE(grid_scan([cam], m1, 0, 1, 2, m2, 0, 1, 3))
            except Exception as err:  # noqa: BLE001 - recorded, judged by the test
                attempt.setdefault("errors", []).append({"document": "RE", **error_record(err)})
            record: dict[str, Any] = {"pid": os.getpid(), "t_end": now()}
            if "refused" in attempt:
                record.update(outcome="refused", **attempt["refused"])
            elif attempt.get("errors") or "t_closed" not in attempt:
                record.update(outcome="failed", **attempt)
            else:
                record.update(outcome="wrote", **attempt)
            out.write(json.dumps(record) + "\n")
            out.flush()
            runs += 1
    return {"pid": os.getpid(), "runs": runs}


def lock(store: str, log: str, seconds: float) -> dict[str, Any]:
    pid = os.getpid()
    out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    held = refused = 0
    deadline = now() + seconds
    while now() < deadline:
        try:
            taken = StoreLock(Path(store))
        except StoreLockedError:
            refused += 1
            continue
        except Exception as err:  # noqa: BLE001 - recorded, judged by the test
            message = f"{type(err).__module__}.{type(err).__name__}: {err}".replace("\n", " ")
            os.write(out, f"{pid} error {message}\n".encode())
            continue
        os.write(out, f"{pid} start\n".encode())
        time.sleep(0.0002)
        os.write(out, f"{pid} end\n".encode())
        taken.release()
        held += 1
    os.close(out)
    return {"pid": pid, "held": held, "refused": refused}


def main() -> None:
    mode, path, log, seconds = sys.argv[1:5]
    print("ready", flush=True)
    sys.stdin.readline()
    run = {"writer": writer, "lock": lock}[mode]
    print(json.dumps(run(path, log, float(seconds))), flush=True)


if __name__ == "__main__":
    main()
