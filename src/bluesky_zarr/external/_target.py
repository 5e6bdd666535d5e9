"""What external data need of the run and streams their frames go to.

External data sit below the live writer (``write``) and never import it: the
run hands them these narrow interfaces, which its own objects fulfil
(``write.RunWriter`` and ``write.StreamWriter``). Frames read from files go to
a :class:`FrameTarget` (a stream), their reads to a :class:`JobQueue` (the
writer's reader thread), refused documents to the run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..plan._layout import StreamLayout
from ..storage._metadata import StoreMetadata


@dataclass(frozen=True)
class ExternalOptions:
    """The writer's options that concern external data."""

    #: ``"fill"``, ``"reference"`` or ``"virtual"``.
    mode: str = "fill"
    #: Handler classes by resource spec, the user's.
    handler_registry: Mapping[str, Any] = field(default_factory=dict)
    #: Directories by the root that resources name.
    root_map: Mapping[str, str] = field(default_factory=dict)
    #: Seconds between writes of the recorded references (None: at flushes).
    flush_interval: float | None = 5.0


class FrameTarget(Protocol):
    """A stream's arrays, as external data fill them (a ``write.StreamWriter``)."""

    name: str
    layout: StreamLayout
    #: The number of scan dimensions, and whether the scan dimension grows.
    n_scan: int
    growing: bool
    #: The stream's group (its attributes are rewritten, and the node kept).
    group: Any

    def put_frames(self, key: str, index: Sequence[np.ndarray], values: Sequence[Any]) -> None:
        """Place the values of data key ``key`` at the points ``index``."""

    def put_points(
        self, index: Sequence[np.ndarray], seq_nums: np.ndarray, times: np.ndarray
    ) -> None:
        """Record ``seq_num`` and ``time`` of points that no event describes."""

    def note_points(self, index: Sequence[np.ndarray], descriptor: Any) -> None:
        """Record the descriptor the points at ``index`` came with."""

    def ensure_length(self, length: int) -> None:
        """Grow a growing stream's arrays to ``length`` points."""

    def array_node(self, name: str) -> Any:
        """The array (its node: path, metadata) of array ``name``."""

    def remake_array(
        self,
        name: str,
        sample: np.ndarray,
        *,
        chunks: tuple[int, ...],
        serializer: Mapping[str, Any],
        compressors: Sequence[Any],
    ) -> str | None:
        """Make array ``name`` anew with these chunks and codecs (for chunks
        that reference a detector's file as it stores them); returns why not
        if frames were placed in it already."""

    def mark_referenced(self, name: str, region: tuple[slice, ...], filled: np.ndarray) -> None:
        """The points ``filled`` of ``region`` of array ``name`` are on disk
        (referenced): towards ``_written``."""

    def unmark(self, name: str, index: tuple[np.ndarray, ...]) -> None:
        """The points ``index`` of array ``name`` are no longer on disk."""


class Failure(Protocol):
    """A job that failed: what it was, and the error."""

    what: str
    error: BaseException


class JobQueue(Protocol):
    """Where external data read frames: off the RunEngine's thread."""

    def submit(
        self, lane: int, job: Callable[[], None], nbytes: int, what: str,
        done: Callable[[], None],
    ) -> None:
        """Run ``job`` in the background (``what`` names it if it fails)."""

    def drain(self) -> None:
        """Wait until every job submitted so far has run."""

    def new_failures(self) -> Sequence[Failure]:
        """Jobs that failed since the last call."""


class ExternalRun(Protocol):
    """What external data need of their run (a ``write.RunWriter``)."""

    @property
    def metadata(self) -> StoreMetadata:
        """The store's metadata (attributes of the stream groups)."""

    @property
    def meta_lock(self) -> threading.RLock:
        """Held while the store's metadata changes."""

    @property
    def streams(self) -> Mapping[str, FrameTarget]:
        """The run's streams by name."""

    @property
    def descriptors(self) -> Mapping[str, FrameTarget]:
        """The run's streams by the uid of each of their descriptors."""

    @property
    def path(self) -> Path | str | None:
        """The run's store: a local path, or a URL on object storage."""

    @property
    def buffer_lock(self) -> threading.RLock:
        """Held while frames are placed in the stream's blocks."""

    @property
    def reads(self) -> JobQueue:
        """The queue of the reads of detector files."""

    @property
    def repository(self) -> Any:
        """The Icechunk repository of an ``external="virtual"`` run."""

    def point_index(
        self, stream: FrameTarget, seq_nums: np.ndarray
    ) -> tuple[np.ndarray, ...]:
        """Index arrays (one per scan dimension) of the points ``seq_nums`` name."""

    def refuse(self, name: str, doc: Mapping[str, Any], error: BaseException) -> None:
        """Keep a document refused (and count it)."""
