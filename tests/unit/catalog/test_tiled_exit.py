"""Registering with Tiled while Python exits (interrupted runs are finished in
an ``atexit`` handler, where Python 3.12 starts no thread): the store is
named in ``failures`` with the command that registers it later, at once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("tiled.client")

from bluesky_zarr.catalog import TiledRegistrar  # noqa: E402

from conftest import refuse_thread_starts  # noqa: E402


def test_no_thread_to_register_with_is_a_failure_said_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registrar = TiledRegistrar("http://127.0.0.1:1", timeout=30)
    store = tmp_path / "run.zarr"
    refuse_thread_starts(monkeypatch)
    started = time.monotonic()
    assert registrar.finish(store) is False
    assert time.monotonic() - started < 5  # not the 30 s timeout
    monkeypatch.undo()
    ((failed, why),) = registrar.failures
    assert failed == str(store) and "while Python exits" in why
    registrar.close()
