"""Faults of storage and of runs: errors are loud, nothing written is lost."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time

import numpy as np
import pytest
from bluesky import Msg, RunEngine
from bluesky.plans import grid_scan
from bluesky.preprocessors import msg_mutator, plan_mutator
from bluesky.utils import RunEngineInterrupted
from zarr.storage import WrapperStore

import bluesky_zarr
from bluesky_zarr import ZarrWriter
from bluesky_zarr.sim import PointCamera, motors

from conftest import (
    assert_frames_match,
    assert_written_points_hold_their_frames,
    open_stream,
    open_tree,
    refuse_thread_starts,
)

MOTORS_AT = {"wavelength": "wavelength", "position": "position"}


class FaultyStore(WrapperStore):
    """Fails chosen writes of chunk data, as a full or read-only disk would:
    the n-th writes (``fail_on``, ``every``) or the writes of chosen chunk or
    shard keys (``fail_keys``, which do not depend on the order in which
    worker threads happen to write)."""

    def __init__(
        self,
        store,
        *,
        error: OSError,
        fail_on: set[int] = frozenset(),
        every: int = 0,
        fail_keys: tuple[str, ...] = (),
    ) -> None:
        super().__init__(store)
        self.error = error
        self.fail_on = fail_on
        self.every = every
        self.fail_keys = fail_keys
        self.writes = 0
        self.lock = threading.Lock()

    def _with_store(self, store):
        return type(self)(
            store, error=self.error, fail_on=self.fail_on, every=self.every,
            fail_keys=self.fail_keys,
        )

    async def set(self, key, value):
        if "cam_image/c" in key:
            with self.lock:
                self.writes += 1
                n = self.writes
            if n in self.fail_on or (self.every and n % self.every == 0):
                raise self.error
            if key.endswith(self.fail_keys):
                raise self.error
        return await self._store.set(key, value)


def faulty(**kwargs):
    return lambda store: FaultyStore(store, **kwargs)


def grid(cam, wavelength, position, n_wl=3, n_pos=4):
    return grid_scan([cam], wavelength, 1, 3, n_wl, position, 0, 1, n_pos)


FRAME = (8, 8)


def grid_run(tmp_path, **options):
    """A RunEngine with a ZarrWriter on ``tmp_path``, a camera and two motors.

    (Not named ``setup``: pytest 8.0 calls a module-level ``setup`` itself, as
    nose did, with the module as its argument.)
    """
    wavelength, position = motors("wavelength", "position")
    cam = PointCamera([wavelength, position], shape=FRAME, name="cam")
    writer = ZarrWriter(tmp_path, flush_interval=None, **options)
    RE = RunEngine({})
    RE.subscribe(writer)
    return RE, writer, cam, wavelength, position


@pytest.mark.parametrize(
    "error, builtin",
    [
        (OSError(errno.ENOSPC, "No space left on device"), OSError),
        (PermissionError(errno.EACCES, "Permission denied"), PermissionError),
    ],
    ids=["disk-full", "permission-denied"],
)
def test_storage_fault_reaches_the_run_engine_and_store_is_finalised(tmp_path, error, builtin):
    # The second shard of the first row (points 2-3) fails. Chosen by key: the
    # two shards of a row are written by different workers, in either order.
    RE, writer, cam, wavelength, position = grid_run(
        tmp_path, store_wrapper=faulty(error=error, fail_keys=("cam_image/c.0.1.0.0",)),
        shards={"cam_image": (1, 2, 8, 8)},
    )
    with pytest.raises(bluesky_zarr.WriteError) as info:
        RE(grid(cam, wavelength, position))
    assert isinstance(info.value.__cause__, builtin)
    assert "cam_image" in str(info.value)
    (store,) = writer.stores
    tree = open_tree(store)
    assert tree.attrs["exit_status"] == "fail"
    # The stop was recorded, but the store lacks what failed to be written.
    assert tree.attrs["bluesky_zarr"]["complete"] is False
    assert "write(s) failed" in tree.attrs["bluesky_zarr"]["incomplete_reason"]
    assert tree.attrs["bluesky_zarr"]["write_failures"]
    written = assert_written_points_hold_their_frames(store, FRAME)
    # The shard that failed (points 2-3 of the first row) is not claimed.
    assert written[0, :2].all() and not written[0, 2:].any()


def test_every_nth_write_failing_with_on_error_log_keeps_the_scan_going(tmp_path, caplog):
    RE, writer, cam, wavelength, position = grid_run(
        tmp_path,
        store_wrapper=faulty(error=OSError(errno.EIO, "I/O error"), fail_on=set(), every=3),
        shards={"cam_image": (1, 1, 8, 8)},
        on_error="log",
    )
    RE(grid(cam, wavelength, position))
    (store,) = writer.stores
    tree = open_tree(store)
    assert tree.attrs["exit_status"] == "success"
    failures = tree.attrs["bluesky_zarr"]["write_failures"]
    assert len(failures) == 4  # writes 3, 6, 9, 12 of 12 frames
    written = assert_written_points_hold_their_frames(store, FRAME)
    assert written.sum() == 8
    assert any("I/O error" in r.getMessage() for r in caplog.records)


def test_background_threads_survive_failures(tmp_path):
    RE, writer, cam, wavelength, position = grid_run(
        tmp_path,
        store_wrapper=faulty(error=OSError(errno.EIO, "I/O error"), fail_on={1, 2, 3}),
        on_error="log", workers=1, shards={"cam_image": (1, 1, 8, 8)},
    )
    RE(grid(cam, wavelength, position))
    written = assert_written_points_hold_their_frames(writer.stores[0], FRAME)
    assert written.sum() == 9


def pause_after_event(n):
    """A plan mutator pausing the RunEngine right after the n-th event is saved."""
    count = [0]

    def mutate(msg):
        if msg.command == "save":
            count[0] += 1
            if count[0] == n:
                def save_then_pause():
                    result = yield msg
                    yield Msg("pause", defer=False)
                    return result
                return save_then_pause(), None
        return None, None

    return mutate


def test_pause_and_resume_rewinds_without_duplicates(tmp_path):
    RE, writer, cam, wavelength, position = grid_run(tmp_path)
    seq_nums = []
    RE.subscribe(lambda name, doc: seq_nums.append(doc["seq_num"]) if name == "event" else None)
    with pytest.raises(RunEngineInterrupted):
        RE(plan_mutator(grid(cam, wavelength, position), pause_after_event(5)))
    RE.resume()
    # The RunEngine re-measured point 5 after rewinding to its checkpoint.
    assert seq_nums.count(5) == 2 and len(seq_nums) == 13
    tree = open_tree(writer.stores[0])
    assert tree.attrs["stop"]["num_events"] == {"primary": 12}
    assert tree.attrs["bluesky_zarr"]["streams"]["primary"]["written_points"] == 12
    ds = open_stream(writer.stores[0])
    assert sorted(ds["seq_num"].values.ravel().tolist()) == list(range(1, 13))
    assert assert_frames_match(ds, "cam_image", MOTORS_AT, FRAME) == 12


@pytest.mark.parametrize("how", ["abort", "halt"])
def test_aborted_and_halted_runs_are_finalised(tmp_path, how):
    RE, writer, cam, wavelength, position = grid_run(tmp_path)
    with pytest.raises(RunEngineInterrupted):
        RE(plan_mutator(grid(cam, wavelength, position), pause_after_event(5)))
    if how == "abort":
        RE.abort(reason="sample moved")
    else:
        RE.halt()
    tree = open_tree(writer.stores[0])
    assert tree.attrs["exit_status"] == "abort"
    assert tree.attrs["bluesky_zarr"]["complete"] is True
    written = assert_written_points_hold_their_frames(writer.stores[0], FRAME)
    assert written.sum() == 5


def test_exception_in_the_plan_is_recorded(tmp_path):
    RE, writer, cam, wavelength, position = grid_run(tmp_path)
    triggers = [0]

    def fail_on_sixth_trigger(msg):
        if msg.command == "trigger" and msg.obj is cam:
            triggers[0] += 1
            if triggers[0] == 6:
                raise RuntimeError("motor controller fault")
        return msg

    with pytest.raises(RuntimeError, match="motor controller"):
        RE(msg_mutator(grid(cam, wavelength, position), fail_on_sixth_trigger))
    tree = open_tree(writer.stores[0])
    assert tree.attrs["exit_status"] == "fail"
    assert "motor controller fault" in tree.attrs["stop"]["reason"]
    assert assert_written_points_hold_their_frames(writer.stores[0], FRAME).sum() == 5


def test_ctrl_c_twice_halts_and_the_store_is_finalised(tmp_path):
    RE, writer, cam, wavelength, position = grid_run(tmp_path)

    def interrupt(name, doc):
        if name == "event" and doc["seq_num"] == 4:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            # The handler runs in the main thread while this callback holds
            # the RunEngine: let it register both presses before the (fast)
            # scan could finish on its own.
            time.sleep(0.5)

    RE.subscribe(interrupt)
    with pytest.raises(RunEngineInterrupted):
        RE(grid(cam, wavelength, position))
    if RE.state == "paused":
        RE.halt()
    tree = open_tree(writer.stores[0])
    assert tree.attrs["exit_status"] == "abort"
    assert assert_written_points_hold_their_frames(writer.stores[0], FRAME).sum() >= 4


def test_a_store_being_written_cannot_be_taken_by_a_second_writer(tmp_path):
    from event_model import compose_run

    run = compose_run(metadata={"scan_id": 7})
    first = ZarrWriter(tmp_path, name_template="shared")
    first("start", run.start_doc)
    second = ZarrWriter(tmp_path, name_template="shared", overwrite=True)
    other = compose_run(metadata={"scan_id": 8})
    with pytest.raises(bluesky_zarr.StoreLockedError, match="another writer"):
        second("start", other.start_doc)
    first("stop", run.compose_stop())
    assert open_tree(first.stores[0]).attrs["exit_status"] == "success"
    # Once the first writer is done, an explicit overwrite may replace it.
    second("start", other.start_doc)
    second("stop", other.compose_stop())
    assert open_tree(second.stores[0]).attrs["start"]["scan_id"] == 8


def test_dtype_that_cannot_be_stored_is_refused(tmp_path):
    RE, writer, cam, wavelength, position = grid_run(tmp_path)
    cam.frame_dtype = np.dtype("float32")  # the descriptor says uint16 ...
    cam.describe = lambda: {
        k: {**v, "dtype_numpy": "<u2"} for k, v in PointCamera.describe(cam).items()
    }
    with pytest.raises(bluesky_zarr.DataTypeError, match="uint16"):
        RE(grid(cam, wavelength, position))
    assert open_tree(writer.stores[0]).attrs["exit_status"] == "fail"


def test_event_with_unknown_descriptor_uid(tmp_path):
    from event_model import compose_run

    run = compose_run()
    writer = ZarrWriter(tmp_path)
    writer("start", run.start_doc)
    descriptor = run.compose_descriptor(
        name="primary", data_keys={"x": {"dtype": "number", "shape": [], "source": "s"}}
    )
    writer("descriptor", descriptor.descriptor_doc)
    event = descriptor.compose_event(data={"x": 1.0}, timestamps={"x": 0.0}, seq_num=1)
    event["descriptor"] = "no-such-descriptor"
    with pytest.raises(bluesky_zarr.DocumentOrderError, match="no-such-descriptor"):
        writer("event", event)


def test_a_run_whose_stop_raised_is_not_reopened_by_close(tmp_path):
    RE, writer, cam, wavelength, position = grid_run(
        tmp_path,
        store_wrapper=faulty(error=OSError(errno.EIO, "I/O error"), fail_on={12}),
        shards={"cam_image": (1, 1, 8, 8)},
    )
    # The last frame's write fails after the last event: only stop reports it.
    with pytest.raises(bluesky_zarr.WriteError):
        RE(grid(cam, wavelength, position))
    assert list(writer.open_runs) == []
    writer.close()
    tree = open_tree(writer.stores[0])
    # close() did not reopen the run: the stop's record stands (the failed
    # write of the last frame makes it incomplete, and says so).
    assert "stop" in tree.attrs
    assert tree.attrs["bluesky_zarr"]["complete"] is False
    assert tree.attrs["bluesky_zarr"]["incomplete_reason"] == (
        "stream 'primary' has 11 of its 12 events written; 1 write(s) failed"
    )


def test_a_run_interrupted_where_no_thread_can_start_is_finished_all_the_same(
    tmp_path, monkeypatch
):
    # Ctrl-C pauses the scan; the script ends and the writer finishes the
    # run in its atexit handler, where Python 3.12 starts no thread, with its
    # worker threads stopped (as a finalizer run at exit before it did).
    RE, writer, cam, wavelength, position = grid_run(tmp_path)
    taken = []

    def pause(name, doc):
        taken.extend([doc["seq_num"]] if name == "event" else [])
        if name == "event" and doc["seq_num"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: pause at the next point
            time.sleep(0.2)  # the handler runs while the RunEngine waits here

    RE.subscribe(pause)
    with pytest.raises(RunEngineInterrupted):
        RE(grid(cam, wavelength, position, n_pos=8))
    writer.buffer.stop()
    go, outcome = threading.Event(), []

    def at_exit():
        go.wait()
        try:
            writer._interrupt("interrupted")
            outcome.append("finished")
        except BaseException as err:  # noqa: BLE001 - reported below
            outcome.append(err)

    finisher = threading.Thread(target=at_exit, daemon=True)
    finisher.start()

    refuse_thread_starts(monkeypatch)
    go.set()
    finisher.join(30)
    monkeypatch.undo()
    assert not finisher.is_alive(), "finishing the run hangs"
    RE.halt()
    assert outcome == ["finished"]
    tree = open_tree(writer.stores[0])
    assert tree.attrs["exit_status"] == "abort"
    assert tree.attrs["bluesky_zarr"]["incomplete_reason"] == "interrupted"
    written = assert_written_points_hold_their_frames(writer.stores[0], FRAME)
    # Every event the writer took (Ctrl-C pauses at the next point, so
    # 3 or 4).
    assert written.sum() == len(taken) in (3, 4)
    assert not writer.stores[0].with_name(f".{writer.stores[0].name}.lock").exists()
