"""``serve --kafka`` with no broker at the address: said once, then in each
status line, which does not look healthy (rather than the Kafka client's
"Connection refused" lines, several a second)."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import bluesky_zarr

SOURCE = Path(bluesky_zarr.__file__).resolve().parents[1]
STATUS_LINES = 3


def _closed_port() -> int:
    """A port of 127.0.0.1 that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_broker_is_reported_once_per_status_line(tmp_path):
    address = f"127.0.0.1:{_closed_port()}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SOURCE), *filter(None, [os.environ.get("PYTHONPATH")])]
    )}
    process = subprocess.Popen(
        [sys.executable, "-m", "bluesky_zarr._cli", "serve", "--kafka", address,
         "--topic", "beamline.documents", "--group-id", "writers",
         "--out", str(tmp_path / "runs"), "--status-interval", "1"],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert process.stderr is not None
        with process.stderr:
            for line in process.stderr:
                lines.put(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen: list[str] = []
    deadline = time.monotonic() + 120  # a bound, not a measurement
    try:
        while sum("status:" in line for line in seen) < STATUS_LINES:
            assert time.monotonic() < deadline, "\n".join(seen)
            assert process.poll() is None, "\n".join(seen)
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                pass
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
        reader.join(timeout=60)
    while not lines.empty():
        seen.append(lines.get())
    text = "\n".join(seen)

    status = [line for line in seen if "status:" in line]
    refused = [line for line in seen if "Connection refused" in line]
    # Once when it starts failing, then once in each status line.
    assert len(refused) <= len(status) + 1, text
    assert not [line for line in refused if "status:" not in line][1:], text
    for line in status:
        assert f"status: NOT CONNECTED: cannot reach the Kafka brokers {address}" in line, text
    assert "Traceback" not in text
    assert process.returncode == 0, text
