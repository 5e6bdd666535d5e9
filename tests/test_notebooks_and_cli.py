"""The README's demo command and the example notebooks run as users run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from bluesky_zarr._cli import main

from conftest import assert_frames_match, open_stream

ROOT = Path(__file__).resolve().parents[1]


def test_demo_command(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--wavelengths", "3", "--positions",
                 "4", "--size", "16"]) == 0
    out = capsys.readouterr().out
    assert "points written: 12 of 12" in out
    assert "Mean frame intensity per wavelength" in out
    (store,) = tmp_path.glob("*.zarr")
    assert str(store) in out
    ds = open_stream(store)
    assert ds["cam_image"].dims == ("wavelength", "position", "y", "x")
    motors_at = {"wavelength": "wavelength", "position": "position"}
    assert assert_frames_match(ds, "cam_image", motors_at, (16, 16)) == 12


def test_console_script_is_installed(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bluesky_zarr._cli", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "demo" in result.stdout


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")))
def test_notebook_runs(name, tmp_path):
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.output_type == "error"
    ]
    assert not errors
