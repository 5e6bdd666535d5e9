"""``bluesky-zarr ls`` over stores that real documents make awkward to list."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import pytest
from bluesky import RunEngine
from bluesky.plans import count
from bluesky.preprocessors import run_decorator
from event_model import compose_run
from ophyd.sim import det

from bluesky_zarr import ZarrWriter
from bluesky_zarr._cli import main
from bluesky_zarr.catalog._ls import list_stores


def _write_run(root: Path, start_time: float, **metadata: Any) -> None:
    """A complete two-point run whose start document says ``start_time``."""
    writer = ZarrWriter(root)
    bundle = compose_run(metadata={"scan_id": len(list(root.glob("*.zarr"))) + 1, **metadata})
    start = dict(bundle.start_doc, time=start_time)
    writer("start", start)
    stream = bundle.compose_descriptor(
        name="primary", data_keys={"d": {"source": "sim", "dtype": "number", "shape": []}}
    )
    writer("descriptor", stream.descriptor_doc)
    for value in (1.0, 2.0):
        writer("event", stream.compose_event(data={"d": value}, timestamps={"d": 0.0}))
    writer("stop", bundle.compose_stop())


def test_ls_lists_runs_whose_start_time_no_calendar_holds(tmp_path: Path, capsys) -> None:
    # Documents from other sources give times in milliseconds or nanoseconds:
    # the listing shows those runs (without a date) and every other one.
    _write_run(tmp_path, 1.7e9)
    _write_run(tmp_path, 1.7e12)  # milliseconds: the year 55 840
    _write_run(tmp_path, 1.7e18)  # nanoseconds
    entries = list_stores(tmp_path)
    assert len(entries) == 3
    assert sorted(e["started"] is None for e in entries) == [False, True, True]
    assert all(e["state"] == "complete" for e in entries)
    capsys.readouterr()
    assert main(["ls", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4, lines
    # inspect reads the same times the same way (it once raised errno 75 for
    # a time in nanoseconds that ls listed).
    for store in sorted(tmp_path.glob("*.zarr")):
        assert main(["inspect", "--json", str(store)]) == 0
        described = json.loads(capsys.readouterr().out)
        started = described["run"]["started"]
        entry = next(e for e in entries if e["name"] == store.name)
        assert started == entry["started"]
        assert main(["inspect", str(store)]) == 0
        assert "complete  yes" in capsys.readouterr().out


def test_ls_prints_one_line_per_run_whatever_its_fields_hold(
    tmp_path: Path, RE: RunEngine, capsys
) -> None:
    # A sample name pasted with a newline and a terminal escape, and a run
    # that failed with a multi-line reason (a traceback's worth).
    RE.subscribe(ZarrWriter(tmp_path))
    RE(count([det], num=2), sample="Si\nwafer \x1b[31m#3")

    @run_decorator(md={"sample": "Ge"})
    def failing():
        yield from bps.trigger_and_read([det])
        raise RuntimeError("beam lost\n  at the undulator\n  twice")

    with pytest.raises(RuntimeError):
        RE(failing())
    capsys.readouterr()
    assert main(["ls", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 3, out
    assert "\x1b" not in out
    assert any("Si\\nwafer" in line for line in lines), out
    assert any("beam lost" in line and "undulator" in line for line in lines), out


def test_ls_reports_a_run_record_it_cannot_read_and_lists_the_rest(
    tmp_path: Path, capsys
) -> None:
    _write_run(tmp_path, 1.7e9)
    odd = tmp_path / "odd.zarr"
    odd.mkdir()
    record = {"streams": {"primary": {"written_points": None}}, "complete": "maybe"}
    (odd / "zarr.json").write_text(json.dumps({
        "zarr_format": 3, "node_type": "group",
        "attributes": {"start": {"uid": "x", "time": 1.7e9}, "bluesky_zarr": record},
    }))
    problems: list[str] = []
    assert len(list_stores(tmp_path, problems=problems)) == 1
    assert len(problems) == 1 and "odd.zarr" in problems[0]
    capsys.readouterr()
    assert main(["ls", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2
    assert "odd.zarr" in captured.err


def test_ls_columns_line_up_with_wide_and_combining_letters(tmp_path: Path, capsys) -> None:
    for sample in ("Si", "硅晶片", "Ge\u0301"):  # wide letters; a combining accent
        _write_run(tmp_path, 1.7e9, sample=sample)
    capsys.readouterr()
    assert main(["ls", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4

    def column_of_points(line: str) -> int:
        return _columns(line[: line.index("POINTS" if line.startswith("STORE") else "2/2")])

    assert len({column_of_points(line) for line in lines}) == 1, lines


def _columns(text: str) -> int:
    import unicodedata

    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) == "W" else 1
        for c in text
    )
