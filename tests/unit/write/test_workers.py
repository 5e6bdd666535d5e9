"""The worker threads share the work, keep each lane in order, and share the
encoding of one block's frames without the write ever using a stale encoding."""

from __future__ import annotations

import os
import random
import threading
import time
from typing import Any

import numpy as np
import pytest

from bluesky_zarr.write._buffer import ArrivalEncoding
from bluesky_zarr.write._memory import MemoryBudget
from bluesky_zarr.write._workers import WORKER_NICENESS, BackgroundWriter, Workers

from conftest import refuse_thread_starts


def workers(count: int = 2) -> tuple[Workers, BackgroundWriter]:
    pool = Workers(MemoryBudget(1 << 30, count), count)
    return pool, BackgroundWriter(pool)


def test_jobs_without_a_lane_spread_over_every_worker():
    pool, background = workers()
    names: list[str] = []
    both = threading.Barrier(2, timeout=10)

    def job() -> None:
        names.append(threading.current_thread().name)
        both.wait()  # only passes if two workers run jobs at once

    try:
        for _ in range(2):
            background.submit(None, job, 0, "job", lambda: None, cost=1 << 20)
        background.drain()
        assert not background.failures, background.failures
        assert sorted(names) == ["bluesky-zarr-0", "bluesky-zarr-1"]
    finally:
        pool.stop()


def test_jobs_of_one_lane_run_in_order_on_one_worker_while_others_spread():
    pool, background = workers()
    order: dict[int, list[int]] = {lane: [] for lane in range(6)}
    threads: dict[int, set[str]] = {lane: set() for lane in range(6)}
    rng = random.Random(7)

    def job(lane: int, n: int) -> None:
        time.sleep(rng.random() / 2000)
        order[lane].append(n)
        threads[lane].add(threading.current_thread().name)

    try:
        for n in range(40):
            for lane in range(6):
                background.submit(
                    lane, lambda lane=lane, n=n: job(lane, n), 0, "job", lambda: None, cost=1
                )
        background.drain()
        assert not background.failures, background.failures
        for lane in range(6):
            assert order[lane] == list(range(40)), f"lane {lane} ran out of order"
        used = set().union(*threads.values())
        assert used == {"bluesky-zarr-0", "bluesky-zarr-1"}, used
    finally:
        pool.stop()


def test_a_failing_job_frees_its_lane_and_is_reported():
    pool, background = workers()
    ran: list[str] = []

    def fail() -> None:
        raise OSError("disk gone")

    try:
        background.submit("lane", fail, 0, "the failing job", lambda: None)
        background.submit("lane", lambda: ran.append("next"), 0, "next", lambda: None)
        background.drain()
        assert ran == ["next"]
        assert [f.what for f in background.failures] == ["the failing job"]
        assert not pool._lanes, "a finished lane is still held"
    finally:
        pool.stop()


def point_encoder(data: np.ndarray, calls: list[tuple[int, ...]], delay: float = 0.0) -> Any:
    def encode(point: tuple[int, ...]) -> dict[tuple[int, ...], bytes]:
        calls.append(point)
        if delay:
            time.sleep(delay)
        return {point + (0, 0): data[point].tobytes()}

    return encode


def test_take_uses_what_the_jobs_encoded_and_encodes_the_rest_itself():
    data = np.arange(4 * 3 * 2, dtype="u2").reshape(4, 3, 2)
    calls: list[tuple[int, ...]] = []
    arrival = ArrivalEncoding(point_encoder(data, calls))
    for k in (0, 2):
        arrival.encode((k,))
    encoded = arrival.take([(0,), (1,), (2,), (3,)])
    assert encoded == {(k, 0, 0): data[k].tobytes() for k in range(4)}
    assert sorted(calls) == [(0,), (1,), (2,), (3,)], "a point was encoded twice"
    arrival.encode((3,))  # a job that comes after the write does nothing
    assert len(calls) == 4


def test_a_point_placed_again_is_encoded_from_what_the_block_holds_at_the_write():
    data = np.zeros((2, 3, 2), dtype="u2")
    calls: list[tuple[int, ...]] = []
    arrival = ArrivalEncoding(point_encoder(data, calls))
    arrival.encode((0,))
    data[0] = 9  # the same point again, with another frame
    arrival.placed_again((0,))
    arrival.encode((0,))  # its second job: left to the write
    assert arrival.take([(0,)]) == {(0, 0, 0): data[0].tobytes()}


@pytest.mark.parametrize("seed", range(5))
def test_take_waits_for_encodings_under_way_on_other_workers(seed):
    """Encodings run on both workers while the block's write takes them: every
    point comes out exactly once, from the block's final data."""
    rng = random.Random(seed)
    n = 40
    data = np.arange(n * 4, dtype="u4").reshape(n, 2, 2)
    calls: list[tuple[int, ...]] = []
    arrival = ArrivalEncoding(point_encoder(data, calls, delay=0.0005))
    pool, background = workers()
    try:
        for k in range(n):
            background.submit(None, lambda k=k: arrival.encode((k,)), 0, "enc", lambda: None)
        time.sleep(rng.random() * 0.02)
        encoded = arrival.take([(k,) for k in range(n)])
        background.drain()
    finally:
        pool.stop()
    assert encoded == {(k, 0, 0): data[k].tobytes() for k in range(n)}
    assert sorted(calls) == [(k,) for k in range(n)], "a point was encoded twice or never"


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="needs per-thread nice (Linux)")
def test_workers_yield_the_cpu_to_the_run_engine_thread():
    """With more busy threads than cores, the RunEngine's thread must not wait
    a scheduler time slice for the workers: they run at a lower priority."""
    pool, background = workers()
    seen: dict[str, int] = {}

    def job() -> None:
        tid = threading.get_native_id()
        seen[threading.current_thread().name] = os.getpriority(os.PRIO_PROCESS, tid)

    try:
        for _ in range(4):
            background.submit(None, job, 0, "job", lambda: None, cost=1 << 20)
        background.drain()
    finally:
        pool.stop()
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert seen and all(nice == min(mine + WORKER_NICENESS, 19) for nice in seen.values()), seen
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine


def test_where_no_thread_can_start_a_job_runs_on_the_callers_thread_after_those_queued(
    monkeypatch: pytest.MonkeyPatch,
):
    pool, background = workers()
    order: list[tuple[int, str]] = []
    release = threading.Event()

    def job(n: int) -> None:
        if n == 1:
            assert release.wait(10)
        order.append((n, threading.current_thread().name))

    try:
        background.submit("lane", lambda: job(1), 4096, "job 1", lambda: None)
        pool.stop()  # the threads end once their queues are done
        # Job 1 is still under way when job 2 comes.
        threading.Timer(0.2, release.set).start()
        refuse_thread_starts(monkeypatch)
        background.submit("lane", lambda: job(2), 4096, "job 2", lambda: None)
        background.drain()
    finally:
        release.set()
        monkeypatch.undo()
        pool.stop(join=True)
    # The job queued first (a partial block) is done first, then the job
    # that could not be queued, here.
    assert [n for n, _ in order] == [1, 2]
    assert order[1][1] == threading.current_thread().name
    assert not background.failures
    assert pool.budget.in_flight == 0 and pool.budget.active == 0
