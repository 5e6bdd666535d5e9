"""Blosc into the writer's own buffers: the bytes numcodecs makes, and a pool
that only ever takes back what it lent."""

from __future__ import annotations

import gc

import numcodecs
import numpy as np
import pytest

from bluesky_zarr.storage import _blosc
from bluesky_zarr.storage._blosc import Blosc


def _frames(n: int, shape: tuple[int, ...], dtype: str) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    y, x = np.mgrid[: shape[0], : shape[1]]
    return [
        (rng.poisson(50 + 40 * np.sin((x + 3 * k) / 9.0) ** 2 + y % 7)).astype(dtype)
        for k in range(n)
    ]


def test_the_library_function_is_called_directly() -> None:
    # numcodecs' extension exports blosc_compress_ctx here: the fast path is
    # what runs (not only the fallback).
    assert _blosc._COMPRESS_CTX is not None


@pytest.mark.parametrize("cname", ["lz4", "zstd", "blosclz"])
@pytest.mark.parametrize("shuffle", ["noshuffle", "shuffle", "bitshuffle"])
@pytest.mark.parametrize("dtype", ["<u2", "<f4", "<i8"])
def test_the_bytes_are_numcodecs_bytes(cname: str, shuffle: str, dtype: str) -> None:
    itemsize = np.dtype(dtype).itemsize
    ours = Blosc(cname, 5, shuffle, 0, itemsize)
    theirs = numcodecs.Blosc(
        cname=cname, clevel=5, shuffle=_blosc.SHUFFLES[shuffle], blocksize=0, typesize=itemsize
    )
    for frame in _frames(4, (96, 130), dtype):
        raw = frame.view(np.uint8).reshape(-1)
        encoded = ours.encode(raw)
        assert bytes(encoded) == bytes(theirs.encode(raw))
        back = np.empty_like(raw)
        ours.decode(encoded, back)
        np.testing.assert_array_equal(back.view(dtype).reshape(frame.shape), frame)
        ours.release(encoded)


def test_a_buffer_given_back_is_used_again_and_nothing_else_is_taken(monkeypatch) -> None:
    # A pool of the test's own (the process's may be full of other tests').
    monkeypatch.setattr(_blosc, "_POOL", _blosc._Pool(_blosc.POOL_BYTES))
    codec = Blosc("lz4", 5, "bitshuffle", 0, 2)
    first, second = (f.view(np.uint8).reshape(-1) for f in _frames(2, (64, 64), "<u2"))
    size = first.size + _blosc.MAX_OVERHEAD
    encoded = codec.encode(first)
    kept = bytes(encoded)
    codec.release(encoded)
    again = codec.encode(second)
    assert again.base is encoded.base  # the same memory, no fresh pages
    # What the pool did not lend never enters it: a frame of the user's, a
    # view of it, bytes, a buffer given back twice.
    user = np.zeros(first.size + _blosc.MAX_OVERHEAD, dtype=np.uint8)
    for foreign in (user, user[:100], kept, b"xyz", None):
        codec.release(foreign)
    codec.release(again)
    codec.release(again)
    assert len(_blosc._POOL.free[size]) == 1
    taken = codec.encode(first)
    assert taken.base is not user and bytes(taken) == kept


def test_buffers_dropped_instead_of_given_back_leave_nothing_behind() -> None:
    codec = Blosc("lz4", 5, "bitshuffle", 0, 2)
    for frame in _frames(20, (32, 32), "<u2"):
        codec.encode(frame.view(np.uint8).reshape(-1))  # a failed write: never given back
    gc.collect()
    assert codec._lent == {}


def test_the_pool_keeps_at_most_its_limit_for_all_codecs_together(monkeypatch) -> None:
    # Free buffers are memory the writer's bound does not count: the pool of
    # the process holds POOL_BYTES at most, however many runs encode at once.
    pool = _blosc._Pool(3 * (64 * 64 * 2 + _blosc.MAX_OVERHEAD))
    monkeypatch.setattr(_blosc, "_POOL", pool)
    codecs = [Blosc("lz4", 5, "bitshuffle", 0, 2) for _ in range(4)]
    frames = [f.view(np.uint8).reshape(-1) for f in _frames(8, (64, 64), "<u2")]
    lent = [(codec, codec.encode(frame)) for codec in codecs for frame in frames[:2]]
    for codec, encoded in lent:
        codec.release(encoded)
    assert pool.nbytes == pool.limit
    assert sum(len(v) for v in pool.free.values()) == 3
    # One codec takes back what another gave: the same memory.
    reused = codecs[3].encode(frames[5])
    assert any(reused.base is e.base for _, e in lent[:3])
    assert pool.nbytes == 2 * (64 * 64 * 2 + _blosc.MAX_OVERHEAD)


def test_a_buffer_larger_than_the_limit_is_kept_alone(monkeypatch) -> None:
    # A 2048x2048 frame's chunk is more than the limit: one is kept (each new
    # one costs its page faults), never two.
    pool = _blosc._Pool(1024)
    monkeypatch.setattr(_blosc, "_POOL", pool)
    codec = Blosc("lz4", 5, "bitshuffle", 0, 2)
    frames = [f.view(np.uint8).reshape(-1) for f in _frames(3, (64, 64), "<u2")]
    lent = [codec.encode(frame) for frame in frames]
    for encoded in lent:
        codec.release(encoded)
    assert sum(len(v) for v in pool.free.values()) == 1
    assert pool.nbytes == 64 * 64 * 2 + _blosc.MAX_OVERHEAD
