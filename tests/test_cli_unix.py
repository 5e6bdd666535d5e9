"""The command line behaves like a Unix tool: quiet on a closed pipe, one-line
errors for what a user can fix, ``~`` meaning the home directory.

Every case runs the command as a user does: a real process, real pipes, a
real ``head``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from event_model import compose_run

import bluesky_zarr
from bluesky_zarr import ZarrWriter

from conftest import open_stream

SOURCE = Path(bluesky_zarr.__file__).resolve().parents[1]

#: Linux's F_SETPIPE_SZ: a pipe of one page, so that an output of a few pages
#: cannot fit in it whatever the system's default pipe size.
F_SETPIPE_SZ = 1031
PIPE_BYTES = 4096


def environment(**extra: str) -> dict[str, str]:
    """The environment of a command run on the package under test."""
    path = os.pathsep.join([str(SOURCE), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path, **extra}


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "bluesky_zarr._cli", *args]


def run(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("env", environment())
    return subprocess.run(command(*args), capture_output=True, text=True, timeout=120, **kwargs)


def assert_one_line_error(result: subprocess.CompletedProcess[str], prefix: str) -> str:
    """The command failed with one line on stderr (no traceback); returns it."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"bluesky-zarr {prefix}: error: "), lines[0]
    return lines[0]


# ----------------------------------------------------------- a closed pipe
#: A sample's description, as long as some are (it widens every line of ``ls``).
SAMPLE = "GaAs wafer, 2 inch, (100), Si-doped 1e18, cleaved; " * 6


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """A directory of 300 runs, and a run whose stream has 1,000 data keys
    (a baseline of every process variable of a beamline)."""
    root = tmp_path_factory.mktemp("stores")
    bundle = compose_run(metadata={"scan_id": 1, "plan_name": "count", "sample": SAMPLE})
    keys = {
        f"storage_ring_monitor_{i:04d}": {"dtype": "number", "shape": [], "source": f"PV:{i}"}
        for i in range(1000)
    }
    stream = bundle.compose_descriptor(name="baseline", data_keys=keys)
    writer = ZarrWriter(root / "wide", name_template="run")
    writer("start", bundle.start_doc)
    writer("descriptor", stream.descriptor_doc)
    for seq_num in (1, 2):
        writer("event", stream.compose_event(
            data={k: float(seq_num) for k in keys}, timestamps={k: 0.0 for k in keys},
            seq_num=seq_num,
        ))
    writer("stop", bundle.compose_stop())
    writer.close()
    store = root / "wide" / "run.zarr"
    assert open_stream(store, "baseline")["storage_ring_monitor_0999"].values.tolist() == [1, 2]

    many = root / "many"
    writer = ZarrWriter(many, name_template="{scan_id:05d}")
    bundle = compose_run(metadata={"scan_id": 1, "plan_name": "count", "sample": SAMPLE})
    writer("start", bundle.start_doc)
    writer("stop", bundle.compose_stop())
    writer.close()
    for n in range(2, 301):
        shutil.copytree(many / "00001.zarr", many / f"{n:05d}.zarr")
    return {"wide": store, "many": many}


@pytest.mark.parametrize(
    "args",
    [("ls", "many"), ("ls", "--json", "many"), ("inspect", "wide"), ("inspect", "--json", "wide")],
    ids=["ls", "ls --json", "inspect", "inspect --json"],
)
def test_output_piped_into_head_ends_quietly(stores, args):
    argv = [a if a not in stores else str(stores[a]) for a in args]
    whole = subprocess.run(command(*argv), capture_output=True, env=environment(), timeout=120)
    assert whole.returncode == 0 and whole.stderr == b""
    # More than the pipe and head's buffer hold: the command is still writing
    # when head has read its lines and gone.
    assert len(whole.stdout) > 16 * PIPE_BYTES

    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, F_SETPIPE_SZ, PIPE_BYTES)
    head = subprocess.Popen(["head", "-n", "3"], stdin=read_end, stdout=subprocess.PIPE)
    os.close(read_end)
    cli = subprocess.Popen(
        command(*argv), stdout=write_end, stderr=subprocess.PIPE, env=environment()
    )
    os.close(write_end)
    shown, _ = head.communicate(timeout=120)
    _, errors = cli.communicate(timeout=120)

    assert shown.splitlines() == whole.stdout.splitlines()[:3]
    assert errors == b"", errors.decode()
    # The status a process ended by SIGPIPE has, as the shell reports it.
    assert cli.returncode == 141


# ------------------------------------------------------- one-line errors
def test_demo_into_a_file_is_a_one_line_error(tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("my notes\n")
    result = run("demo", "--out", str(target), "--wavelengths", "2", "--positions", "2")
    line = assert_one_line_error(result, "demo")
    assert str(target) in line and "is a file, not a directory" in line
    assert result.returncode == 1
    assert target.read_text() == "my notes\n"


def test_debug_shows_the_traceback(tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("my notes\n")
    for argv in (["--debug", "demo", "--out", str(target)], ["demo", "--out", str(target),
                                                             "--debug"]):
        result = run(*argv)
        assert result.returncode == 1
        assert "Traceback (most recent call last)" in result.stderr
        assert "bluesky_zarr._errors.StorageError" in result.stderr


def test_replay_into_an_unwritable_directory_is_a_one_line_error(tmp_path):
    if os.geteuid() == 0:
        # root writes anywhere: a directory below a file stands in.
        out = tmp_path / "file" / "runs"
        (tmp_path / "file").write_text("")
    else:
        (tmp_path / "locked").mkdir(mode=0o500)
        out = tmp_path / "locked" / "runs"
    recorded = tmp_path / "run.jsonl"
    recorded.write_text("")
    line = assert_one_line_error(run("replay", str(recorded), "--out", str(out)), "replay")
    assert str(out) in line


def test_serve_zmq_without_pyzmq_names_the_extra_to_install(tmp_path):
    out = tmp_path / "runs"
    hide = (
        "import sys; sys.modules['zmq'] = None; from bluesky_zarr._cli import main; "
        f"sys.exit(main(['serve', '--zmq', 'localhost:5578', '--out', {str(out)!r}]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", hide], capture_output=True, text=True, env=environment(),
        timeout=120,
    )
    line = assert_one_line_error(result, "serve")
    assert 'pip install "bluesky-zarr[zmq]"' in line
    assert not out.exists()  # nothing made before the check


# ----------------------------------------------------------------- ~ paths
def test_a_path_beginning_with_tilde_is_in_the_home_directory(tmp_path):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = environment(HOME=str(home))
    script = (
        "from bluesky import RunEngine\n"
        "from bluesky.plans import count\n"
        "from ophyd.sim import det\n"
        "from bluesky_zarr import ZarrWriter\n"
        "import suitcase.jsonl\n"
        "RE = RunEngine({})\n"
        "RE.subscribe(ZarrWriter('~/data', name_template='counted'))\n"
        "RE.subscribe(suitcase.jsonl.Serializer('recorded'))\n"
        "RE(count([det], 3))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert not (work / "~").exists()
    store = home / "data" / "counted.zarr"
    assert open_stream(store)["det"].values.tolist() == [1.0, 1.0, 1.0]

    # The command line, with paths quoted (so no shell expands them).
    listing = run("ls", "~/data", cwd=work, env=env)
    assert listing.returncode == 0, listing.stderr
    assert "counted.zarr" in listing.stdout
    described = run("inspect", "~/data/counted.zarr", cwd=work, env=env)
    assert described.returncode == 0, described.stderr
    assert "written 3 of 3 points" in described.stdout
    (recorded,) = (work / "recorded").glob("*.jsonl")
    shutil.move(recorded, home / "run.jsonl")
    replayed = run("replay", "~/run.jsonl", "--out", "~/again", "--no-progress",
                   cwd=work, env=env)
    assert replayed.returncode == 0, replayed.stderr
    (again,) = (home / "again").glob("*.zarr")
    assert open_stream(again)["det"].values.tolist() == [1.0, 1.0, 1.0]
    assert not (work / "~").exists()


def test_replay_of_a_missing_file_says_so_before_writing_anything(tmp_path):
    bundle = compose_run(metadata={"scan_id": 1})
    recorded = tmp_path / "run.jsonl"
    recorded.write_text(
        f'["start", {json.dumps(bundle.start_doc)}]\n'
        f'["stop", {json.dumps(bundle.compose_stop())}]\n'
    )
    out = tmp_path / "out"
    result = run("replay", str(recorded), str(tmp_path / "rnu.jsonl"), "--out", str(out))
    line = assert_one_line_error(result, "replay")
    assert "rnu.jsonl: cannot open" in line and "No such file" in line
    assert result.stdout == ""
    assert not out.exists()  # the first file was not replayed before the mistake was seen
