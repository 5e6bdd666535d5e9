"""The chunk buffer: frames held in memory until their write unit is complete.

Events are copied into *blocks*: in-memory images of one write unit (a shard,
or a chunk when unsharded) over the scan dimensions, spanning whole frames. A
block is handed to its run's background writer when all its points have
arrived (written once: write amplification 1), or earlier when the memory
budget is spent, the flush interval passes or the run stops; a block written
before is then merged with what is on disk (read-modify-write).

One :class:`BlockBuffer` serves every run of a writer, so its memory bound
holds for the writer as a whole: interleaved runs share it, and a run that
needs room may spill another run's oldest partial block. Memory held by
blocks (filling, queued or being written) and the copies made while writing
them is counted against the budget; when it is spent, the callback blocks
until a write finishes (backpressure).
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .._errors import DataShapeError, DataTypeError
from ..plan import ArraySpec, fill_value_for, preview
from ..storage import ArrayNode, UnitIO, aligned_empty, allow_pool
from ._memory import MemoryBudget
from ._workers import Workers

if TYPE_CHECKING:
    from ._workers import BackgroundWriter

#: Transient copies zarr makes of a block while it encodes and writes it
#: (chunk buffers, then the assembled shard), measured with the benchmark.
ENCODE_COPIES = 2

#: The same for a block merged with what is on disk: the image read back (into
#: which the block's new points go), besides the encoding copies.
MERGE_COPIES = ENCODE_COPIES + 1


#: The compressed chunks' buffers the process keeps for reuse are at most
#: this part of a writer's memory bound (8 MiB at least; see storage._blosc).
CHUNK_POOL_PARTS = 16

#: Value kinds (numpy ``dtype.kind``) accepted for each array kind.
_ACCEPTED_KINDS = {
    "f": "biuf",
    "c": "biufc",
    "i": "biu",
    "u": "biu",
    "b": "b",
    "O": "OUS",
    "U": "OUS",
    "S": "S",
    "V": "V",
    "M": "M",
    "m": "m",
}


@dataclass
class Block:
    """An in-memory image of one write unit of one array."""

    origin: tuple[int, ...]
    data: np.ndarray
    filled: np.ndarray
    count: int
    expected: int
    born: float
    nbytes: int
    #: Chunks encoded as their points arrive (sinks that encode on arrival,
    #: see ``ArraySink.encodes_on_arrival``).
    arrival: ArrivalEncoding | None = None
    #: Bytes reserved for the encoded chunks besides the block itself.
    allowance: int = 0


class ArrivalEncoding:
    """The chunks of one block encoded as its points arrive, on any worker.

    Each point's encoding is a job of its own, so the workers share the
    compression of one shard. The block's write then takes what they made
    (:meth:`take`): it waits for encodings under way, and encodes itself the
    points whose job has not started (which then does nothing). A point
    placed again is left to the write, which encodes what the block holds
    then.
    """

    def __init__(self, encode: Callable[[tuple[int, ...]], dict[tuple[int, ...], Any]]) -> None:
        #: Encodes one point of the block: its chunks by position in the shard.
        self._encode = encode
        self._cond = threading.Condition()
        self._chunks: dict[tuple[int, ...], dict[tuple[int, ...], Any]] = {}
        self._running = 0
        self._taken = False
        #: Points placed again after their first encoding was queued.
        self._again: set[tuple[int, ...]] = set()

    def placed_again(self, point: tuple[int, ...]) -> None:
        with self._cond:
            self._again.add(point)
            self._chunks.pop(point, None)

    def encode(self, point: tuple[int, ...]) -> None:
        """A worker's job: encode ``point``, unless the write has begun."""
        with self._cond:
            if self._taken or point in self._again:
                return
            self._running += 1
        chunks = None
        try:
            chunks = self._encode(point)
        finally:
            with self._cond:
                self._running -= 1
                if chunks is not None and point not in self._again:
                    self._chunks[point] = chunks
                self._cond.notify_all()

    def take(self, points: Iterable[tuple[int, ...]]) -> dict[tuple[int, ...], Any]:
        """The encoded chunks of ``points`` (those the block holds), by
        position in the shard, for the block's write; no job encodes after."""
        with self._cond:
            self._taken = True
            while self._running:
                self._cond.wait()
            # Taken once: the write gives their memory back to the encoder,
            # so a later write of the block encodes its points anew.
            done, self._chunks = self._chunks, {}
            again = set(self._again)
        encoded: dict[tuple[int, ...], Any] = {}
        for point in points:
            chunks = done.get(point) if point not in again else None
            encoded.update(chunks if chunks is not None else self._encode(point))
        return encoded


class ArraySink:
    """One array of a stream and the blocks filling for it."""

    def __init__(
        self,
        spec: ArraySpec,
        array: ArrayNode,
        n_scan: int,
        block_shape: tuple[int, ...] | None = None,
    ) -> None:
        assert spec.dtype is not None and spec.frame_shape is not None
        self.spec = spec
        self.name = spec.name
        self.array = array
        self.dtype = spec.dtype
        self.frame_shape = spec.frame_shape
        # A block spans whole write units (shards, else chunks), so blocks
        # never share a file and each is written without touching another.
        unit = array.shards or array.chunks
        self.block_shape = tuple(block_shape or unit[:n_scan])
        self.fill = fill_value_for(spec.dtype)
        self.blocks: dict[tuple[int, ...], Block] = {}
        #: Blocks handed to the writer at least once: later writes merge.
        self.submitted: set[tuple[int, ...]] = set()
        self.accepted = _ACCEPTED_KINDS.get(spec.dtype.kind, spec.dtype.kind)
        #: Writes whole blocks, without zarr-python's per-write path where
        #: the array's codecs allow (see ``_io``).
        self.io = UnitIO(array)
        direct = self.io.direct
        #: Each point's chunks are encoded by the workers as the point
        #: arrives, so a complete shard is only assembled and written.
        self.encodes_on_arrival = (
            direct is not None
            and direct.encodes_points_apart(n_scan, self.frame_shape)
            and self.block_shape == tuple(unit[:n_scan])
        )
        # Copies of a block made while it is written, and while it is merged
        # with what is on disk (the image read back and the file's bytes too).
        if direct is None:
            self._copies = (ENCODE_COPIES, MERGE_COPIES)
        elif self.encodes_on_arrival:
            # The encoded chunks are held beside the block (its allowance).
            self._copies = (0, 2)
        else:
            encode = direct.copies + (np.dtype(array.dtype) != self.dtype)
            self._copies = (encode, encode + 2)
        self._unit_bytes = math.prod(unit) * self.dtype.itemsize

    def copies(self, nbytes: int) -> tuple[int, int]:
        """Copies of a block of ``nbytes`` made while it is written, and while
        it is merged with what is on disk (the image read back and the file's
        bytes too), in units of ``nbytes``."""
        encode, merge = self._copies
        if self.io.direct is not None and nbytes < self._unit_bytes:
            # A block cut at an edge (of the scan, or of a frame that its
            # shards pass) is padded to its whole unit: one more copy.
            return encode + 1, merge + 1
        return encode, merge

    def check(self, value: Any) -> np.ndarray:
        """The value as an array of this sink's frame shape, or a clear error."""
        array = np.asarray(value)
        if array.shape != self.frame_shape:
            raise DataShapeError(
                f"data key {self.spec.key!r}: expected shape {self.frame_shape} as "
                f"declared by the descriptor, got {array.shape}"
            )
        if array.dtype.kind not in self.accepted:
            raise DataTypeError(
                f"data key {self.spec.key!r}: expected values storable as "
                f"{self.dtype}, got {array.dtype} ({preview(value)})"
            )
        return array



class BlockOwner(Protocol):
    """What the buffer needs of the stream whose blocks it holds."""

    name: str

    @property
    def run(self) -> Run: ...

    def block_layout(
        self, sink: ArraySink, key: tuple[int, ...]
    ) -> tuple[tuple[int, ...], np.dtype]: ...

    def new_block(self, sink: ArraySink, key: tuple[int, ...], data: np.ndarray) -> Block: ...

    #: Whether the stream's one scan dimension grows as points arrive.
    growing: bool

    def ensure_length(self, length: int) -> None:
        """Grow the stream's arrays to ``length`` points."""

    def mark_on_disk(
        self, sink: ArraySink, region: tuple[slice, ...], filled: np.ndarray
    ) -> None:
        """The points ``filled`` of ``region`` of ``sink``'s array are on disk."""


class Run(Protocol):
    """What the buffer needs of the run a block belongs to."""

    @property
    def background(self) -> BackgroundWriter | None: ...

    def raise_failures(self) -> None: ...



class BufferPool:
    """Block buffers kept for reuse, their memory still counted as reserved.

    Fresh memory costs the RunEngine's thread a page fault (and the kernel a
    page of zeros) for every 4 KiB it first writes: about as much as copying
    the frame itself. A reused buffer is already mapped. The pool keeps at
    most ``per_shape`` buffers of a shape and a quarter of the budget in all
    (interleaved runs have blocks of several shapes).
    """

    def __init__(self, budget: MemoryBudget, per_shape: int = 4) -> None:
        self.budget = budget
        self.per_shape = per_shape
        self._free: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}
        self._kept = 0
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
        with self._lock:
            free = self._free.get((shape, dtype.str))
            if not free:
                return None
            array = free.pop()
            self._kept -= array.nbytes
            return array

    def give(self, array: np.ndarray) -> None:
        """Keep ``array`` for a later block, or give its memory up."""
        if array.dtype.kind != "O":
            with self._lock:
                free = self._free.setdefault((array.shape, array.dtype.str), [])
                if (
                    len(free) < self.per_shape
                    and self._kept + array.nbytes <= self.budget.limit // 4
                ):
                    free.append(array)
                    self._kept += array.nbytes
                    return
        self.budget.free(array.nbytes)

    def drop(self) -> bool:
        """Give up every kept buffer; whether there were any."""
        with self._lock:
            arrays = [a for free in self._free.values() for a in free]
            self._free.clear()
            self._kept = 0
        for array in arrays:
            self.budget.free(array.nbytes)
        return bool(arrays)


class BlockBuffer:
    """The blocks of every run of one writer, within one memory bound."""

    def __init__(self, limit: int, workers: int) -> None:
        self.budget = MemoryBudget(limit, workers)
        self.pool = BufferPool(self.budget)
        # Compressed chunks' buffers kept for reuse: a part of the bound.
        allow_pool(limit // CHUNK_POOL_PARTS)
        #: The worker threads that write blocks, for every run.
        self.workers = Workers(self.budget, workers)
        #: The thread that reads frames from detectors' files (stream_datum),
        #: for every run, in the order the documents came.
        self.reader = Workers(self.budget, 1, name="bluesky-zarr-reader")
        #: Held while blocks are placed, submitted or spilled (any run).
        self.lock = threading.RLock()
        #: Partially filled blocks, oldest first.
        self._open: dict[tuple[int, tuple[int, ...]], tuple[BlockOwner, ArraySink]] = {}

    def stop(self, join: bool = False) -> None:
        """End the worker and reader threads once their queued jobs are done
        (the next job starts them again); with ``join``, wait until they have."""
        self.reader.stop(join)
        self.workers.stop(join)

    def place(
        self, stream: BlockOwner, sink: ArraySink, index: tuple[int, ...], value: Any
    ) -> None:
        """Copy one point's value into its block; hand full blocks to the writer."""
        key = tuple(i // b for i, b in zip(index, sink.block_shape))
        block = sink.blocks.get(key)
        if block is None:
            shape, dtype = stream.block_layout(sink, key)
            data = self.pool.take(shape, dtype)
            if data is None:
                nbytes = math.prod(shape) * dtype.itemsize
                self._reserve(nbytes, sink.copies(nbytes), stream)
                data = aligned_empty(shape, dtype) if dtype.kind != "O" else np.empty(shape, dtype)
            block = stream.new_block(sink, key, data)
            if sink.encodes_on_arrival:
                # Room for the encoded chunks (at most about the block's size).
                self._reserve(
                    block.nbytes, sink.copies(block.nbytes), stream, held=block.nbytes
                )
                block.allowance = block.nbytes
                direct = sink.io.direct
                assert direct is not None
                block.arrival = ArrivalEncoding(functools.partial(direct.encode_point, data))
            sink.blocks[key] = block
            self._open[(id(sink), key)] = (stream, sink)
        local = tuple(i - o for i, o in zip(index, block.origin))
        block.data[local] = value
        if block.arrival is not None:
            if block.filled[local]:
                block.arrival.placed_again(local)
            else:
                self._encode(stream, sink, block, local)
        if not block.filled[local]:
            block.filled[local] = True
            block.count += 1
            if block.count == block.expected:
                self.submit(stream, sink, key)

    def submit(self, stream: BlockOwner, sink: ArraySink, key: tuple[int, ...]) -> None:
        """Hand a block to its run's background writer."""
        block: Block = sink.blocks.pop(key)
        self._open.pop((id(sink), key), None)
        merge = key in sink.submitted
        sink.submitted.add(key)
        background = stream.run.background
        assert background is not None

        def done() -> None:
            self.pool.give(block.data)
            if block.allowance:
                self.budget.free(block.allowance)

        background.submit(
            (id(sink), key),
            lambda: self.write_block(stream, sink, block, merge),
            block.nbytes,
            f"writing {stream.name}/{sink.name} at {block.origin}",
            done,
            copies=sink.copies(block.nbytes)[1 if merge else 0],
        )

    def write_block(
        self, owner: BlockOwner, sink: ArraySink, block: Block, merge: bool
    ) -> None:
        """Write one block to disk (a worker thread), then tell its stream
        which points are on disk: the block's data goes from here to the
        shard writer (``storage``), never back up through the stream."""
        filled = block.filled
        data = block.data
        if owner.growing and block.count < block.expected:
            # Write only up to the last point received: the array's length
            # never claims points that have not been measured. A merge keeps
            # the extent an earlier write of the block reached (its points
            # past this write's last are on disk, and must stay).
            last = int(np.flatnonzero(filled)[-1]) + 1
            if merge:
                last = max(last, min(filled.shape[0], sink.array.shape[0] - block.origin[0]))
            filled = filled[:last]
            data = data[:last]
        if block.count < block.expected:
            data[~filled] = sink.fill
        region = tuple(slice(o, o + n) for o, n in zip(block.origin, filled.shape))
        if owner.growing:
            owner.ensure_length(region[0].stop)
        reused = None
        if merge:
            # What an earlier write of this block left on disk, with the new
            # points placed over it; read into a buffer kept for reuse, where
            # there is one (no fresh memory).
            reused = self.pool.take(data.shape, data.dtype)
            current = sink.io.read(sink.array, block.origin, data.shape, reused)
            if current is not reused and reused is not None:
                self.pool.give(reused)
                reused = None
            current[filled] = data[filled]
            data = current
        encoded = None
        if block.arrival is not None:
            points = zip(*np.nonzero(filled))
            encoded = block.arrival.take(tuple(int(i) for i in point) for point in points)
        sink.io.write(sink.array, block.origin, data, encoded)
        if reused is not None:
            self.pool.give(reused)

        owner.mark_on_disk(sink, region, filled)

    def _encode(
        self, stream: BlockOwner, sink: ArraySink, block: Block, point: tuple[int, ...]
    ) -> None:
        """Encode one point's chunks in the background, on whichever worker is
        free, ahead of the block's write (see :class:`ArrivalEncoding`)."""
        arrival = block.arrival
        background = stream.run.background
        assert arrival is not None and background is not None
        background.submit(
            None,
            lambda: arrival.encode(point),
            0,
            f"encoding {stream.name}/{sink.name} at {block.origin}",
            lambda: None,
            copies=0,
            cost=block.nbytes // max(block.expected, 1),
        )

    def _reserve(
        self, nbytes: int, copies: tuple[int, int], stream: BlockOwner, held: int = 0
    ) -> None:
        """Make room for a new block (``held``: its bytes reserved already):
        spill old partial blocks, else wait."""
        while not self.budget.try_reserve(nbytes, copies, held):
            if self.pool.drop():
                continue
            if self.budget.in_flight >= nbytes or not self._open:
                self.budget.wait(0.05)
                stream.run.raise_failures()
            else:
                (_, key), (owner, sink) = next(iter(self._open.items()))
                self.submit(owner, sink, key)

    def spill(self, run: object, older_than: float | None = None) -> None:
        """Hand the partial blocks of ``run`` to its writer (those older than
        ``older_than`` seconds, or all)."""
        with self.lock:
            now = time.monotonic()
            for (_, key), (stream, sink) in list(self._open.items()):
                if stream.run is not run:
                    continue
                if older_than is None or now - sink.blocks[key].born >= older_than:
                    self.submit(stream, sink, key)
