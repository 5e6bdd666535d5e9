"""The README's demo command and the example notebooks run as users run them."""

from __future__ import annotations

import argparse
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

import bluesky_zarr
from bluesky_zarr._cli import build_parser, main

from conftest import REPO, assert_frames_match, open_stream

ROOT = REPO


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


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--wavelengths", "0"], "argument --wavelengths: must be at least 1, got 0"),
        (["--wavelengths", "-3"], "argument --wavelengths: must be at least 1, got -3"),
        (["--positions", "0"], "argument --positions: must be at least 1, got 0"),
        (["--size", "0"], "argument --size: must be at least 1, got 0"),
        (["--size", "ten"], "argument --size: expected a whole number, got 'ten'"),
    ],
)
def test_demo_refuses_counts_below_one(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["demo", "--out", str(tmp_path), *argv])
    assert exit.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was scanned


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"bluesky-zarr {bluesky_zarr.__version__}"


def test_every_option_shows_its_default(capsys):
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) >= {"demo", "replay", "serve", "inspect", "ls"}
    for name, sub in commands.choices.items():
        with pytest.raises(SystemExit):
            main([name, "--help"])
        # Without whitespace: argparse wraps long defaults, also at hyphens.
        text = "".join(capsys.readouterr().out.split())
        for action in sub._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            if isinstance(action, argparse._HelpAction):
                continue
            flag = action.option_strings[-1]
            if action.required:
                assert "(required)" in text or ";required)" in text, (name, flag)
            elif action.default is argparse.SUPPRESS:
                # A default that is not a value (ls --field, register --api-key)
                # is named in the option's own help.
                assert "default:" in "".join((action.help or "").split()), (name, flag)
            else:
                shown = {f"(default:{action.default})", f"(default:{action.default!r},"}
                assert any(s in text for s in shown), (name, flag)
    with pytest.raises(SystemExit):
        main(["replay", "--help"])
    assert "(default:{scan_id:05d}-{uid:.8})" in "".join(capsys.readouterr().out.split())


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
