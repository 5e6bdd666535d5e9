"""Blosc compression into memory of the writer's own, without the interpreter lock.

zarr-python's Blosc codec compresses with numcodecs, which calls c-blosc's
``blosc_compress_ctx`` (on a thread other than the main one) into a new bytes
object of the largest size a chunk can take, then shrinks it: a fresh
allocation, its pages faulted in, for every chunk. The same function of the
same library (numcodecs' extension exports it) is called here through
``ctypes``, which lets the interpreter go for the call, into buffers kept and
reused: the bytes are the same, since the library, the function and its
arguments are (the tests compare them with zarr-python's). Where the
extension does not export it, numcodecs' own call is used.
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from typing import Any

import numcodecs
import numcodecs.blosc
import numpy as np

#: Bytes Blosc adds to a chunk at most (its header): ``BLOSC_MAX_OVERHEAD``.
MAX_OVERHEAD = 16

#: Bytes of free buffers kept for reuse, for every codec of the process
#: together: memory the writer's bound does not count (it counts encoded
#: chunks only while they are in flight). Writers raise it to a part of
#: their bound (see :func:`allow_pool`).
POOL_BYTES = 8 << 20


class _Pool:
    """Free buffers by size, shared by every codec (a buffer is only bytes)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.free: dict[int, list[np.ndarray]] = {}
        self.nbytes = 0
        self.lock = threading.Lock()

    def take(self, size: int) -> np.ndarray:
        with self.lock:
            free = self.free.get(size)
            if free:
                self.nbytes -= size
                return free.pop()
        return np.empty(size, dtype=np.uint8)

    def give(self, buffer: np.ndarray) -> None:
        with self.lock:
            # One buffer at least, larger than the limit as it may be (a
            # 2048x2048 frame's): each use of a new one costs its page faults.
            if self.nbytes + buffer.nbytes <= self.limit or not self.nbytes:
                self.free.setdefault(buffer.nbytes, []).append(buffer)
                self.nbytes += buffer.nbytes


_POOL = _Pool(POOL_BYTES)


def allow_pool(nbytes: int) -> None:
    """Let the pool keep up to ``nbytes`` (a part of a writer's memory bound:
    the largest any writer of the process allows, ``POOL_BYTES`` at least)."""
    with _POOL.lock:
        _POOL.limit = max(_POOL.limit, nbytes)

#: Shuffle filters by their Zarr V3 name, as c-blosc numbers them.
SHUFFLES = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


def _compress_ctx() -> Any:
    """c-blosc's ``blosc_compress_ctx`` from numcodecs' extension, or ``None``."""
    try:
        library = ctypes.CDLL(numcodecs.blosc.__file__)
        function = library.blosc_compress_ctx
    except (OSError, AttributeError):
        return None
    function.argtypes = [
        ctypes.c_int,  # clevel
        ctypes.c_int,  # doshuffle
        ctypes.c_size_t,  # typesize
        ctypes.c_size_t,  # nbytes
        ctypes.c_void_p,  # src
        ctypes.c_void_p,  # dest
        ctypes.c_size_t,  # destsize
        ctypes.c_char_p,  # compressor
        ctypes.c_size_t,  # blocksize
        ctypes.c_int,  # numinternalthreads
    ]
    function.restype = ctypes.c_int
    return function


_COMPRESS_CTX = _compress_ctx()


class Blosc:
    """One Blosc configuration (a chunk's codec): compresses a chunk into a
    buffer from the process's pool (one chunk's worst case each), which the
    caller hands back with :meth:`release` once the bytes are written."""

    def __init__(
        self, cname: str, clevel: int, shuffle: str, blocksize: int, typesize: int
    ) -> None:
        self.cname = cname
        self.clevel = int(clevel)
        self.shuffle = SHUFFLES[shuffle]
        self.blocksize = int(blocksize)
        self.typesize = int(typesize)
        self._cname = cname.encode()
        # numcodecs decodes (merges read shards back) and compresses where
        # the library's function cannot be called directly.
        self.codec = numcodecs.Blosc(
            cname=cname,
            clevel=self.clevel,
            shuffle=self.shuffle,
            blocksize=self.blocksize,
            typesize=self.typesize,
        )
        #: The pooled buffers handed out, by id: only these come back.
        self._lent: dict[int, weakref.ref[np.ndarray]] = {}
        self._lock = threading.Lock()

    def encode(self, raw: np.ndarray) -> Any:
        """``raw`` (contiguous bytes, a chunk) compressed: a view of a pooled
        buffer (give it back with :meth:`release`), or bytes."""
        nbytes = raw.nbytes
        if _COMPRESS_CTX is None or raw.dtype != np.uint8 or not raw.flags.c_contiguous:
            return self._encode_numcodecs(raw)
        size = nbytes + MAX_OVERHEAD
        out = _POOL.take(size)
        with self._lock:
            # A buffer dropped instead of given back leaves no entry behind.
            self._lent[id(out)] = weakref.ref(out, self._forget(id(out)))
        written = _COMPRESS_CTX(
            self.clevel, self.shuffle, self.typesize, nbytes, raw.ctypes.data,
            out.ctypes.data, size, self._cname, self.blocksize, 1,
        )
        if written <= 0:
            self.release(out[:0])
            return self._encode_numcodecs(raw)
        return out[:written]

    def _encode_numcodecs(self, raw: np.ndarray) -> Any:
        return self.codec.encode(raw)

    def release(self, part: Any) -> None:
        """Give back the pooled buffer behind ``part`` (anything else: nothing)."""
        base = getattr(part, "base", None)
        if base is None:
            return
        with self._lock:
            lent = self._lent.get(id(base))
            buffer = lent() if lent is not None else None
            if buffer is None or buffer is not base:
                return
            del self._lent[id(base)]
        _POOL.give(buffer)

    def _forget(self, key: int) -> Any:
        """What a lent buffer's weak reference calls when the buffer is gone."""
        lent = self._lent
        return lambda _ref: lent.pop(key, None)

    def decode(self, encoded: Any, out: np.ndarray) -> None:
        """Decompress ``encoded`` into ``out`` (contiguous bytes)."""
        self.codec.decode(encoded, out=out)
