"""The memory bound holds for the process, not only in the writer's books.

``benchmarks/bench_memory.py`` feeds grid scans of 512×512 frames (100 MB,
more than the 64 MiB bound) to one writer, in a process of its own, and
measures how far the process's resident memory grew (Linux VmHWM). Memory is
not time: the figures vary by a few MiB from run to run, not by factors.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

BENCH = REPO / "benchmarks" / "bench_memory.py"


def measure(case: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", "--case", case],
        check=True, capture_output=True, text=True, timeout=300,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("case", ["row-shards", "late"])
def test_resident_memory_grows_within_the_bound(case):
    # "late": chunks of all wavelengths at a position complete only in the
    # last row, so partial chunks spill and are merged (read back) again.
    result = measure(case)
    assert result["data_MiB"] > result["bound_MiB"]
    assert result["accounted_peak_MiB"] <= result["bound_MiB"]
    assert result["ratio_to_bound"] <= 1.15, result


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_interleaved_runs_share_one_bound():
    # Four runs at once hold what one writer's bound allows, not four times it.
    result = measure("interleaved")
    assert result["runs"] == 4 and result["data_MiB"] > 4 * result["bound_MiB"]
    assert result["accounted_peak_MiB"] <= result["bound_MiB"], result
    assert result["ratio_to_bound"] <= 1.15, result
