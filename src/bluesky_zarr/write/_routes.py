"""Which run each document belongs to: one routing table for a writer.

A start document opens a run; a descriptor, resource or stream_resource
names its run (an old resource does not: it belongs to the one open run);
events and stream_datum name their descriptor, datum their resource. The
table keeps, by uid, the run of every descriptor and resource of the open
runs, those that were refused (their documents are refused with them), and,
for a while, those of runs that ended (their late documents are kept in the
ended run's store).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from .._errors import DocumentError, DocumentOrderError

#: Ended runs remembered (oldest dropped first), so that their documents
#: refused after the end are kept in their stores too.
ENDED_RUNS_KEPT = 1000

#: The document kinds the writer takes.
KINDS = frozenset({
    "start", "descriptor", "event", "event_page", "stop", "resource", "datum",
    "datum_page", "stream_resource", "stream_datum",
})

Run = TypeVar("Run")


@dataclass
class Route:
    """The run a descriptor or resource belongs to, and why it was refused
    (its documents are refused with it), if it was."""

    run_start: str
    kind: str
    refused: str | None = None


class Routes(Generic[Run]):
    """The runs of one writer and the documents that belong to them."""

    def __init__(self) -> None:
        #: The open runs by start uid.
        self.runs: dict[str, Run] = {}
        #: Every start uid seen (a second start with one is refused).
        self.seen_starts: set[str] = set()
        #: Descriptors and resources of the open runs, by uid.
        self._ids: dict[str, Route] = {}
        #: The store of each run that ended (stopped, or closed), and the run of
        #: each of their descriptors and resources.
        self.ended: OrderedDict[str, Path | str] = OrderedDict()
        self._ended_ids: dict[str, str] = {}

    # ---------------------------------------------------------------- lookups
    def parent_of(self, name: str, doc: Mapping[str, Any]) -> str | None:
        """The uid of the descriptor or resource a document refers to."""
        if name in ("event", "event_page", "stream_datum"):
            return doc.get("descriptor")
        if name in ("datum", "datum_page"):
            return doc.get("resource")
        return None

    def run_start(self, name: str, doc: Any) -> str | None:
        """The start uid of the run a document belongs to, if it says so
        clearly (an open run's, a refused document's, or an ended run's)."""
        if not isinstance(doc, Mapping):
            return None
        try:
            if name == "start":
                return doc.get("uid")
            if name in ("descriptor", "stop", "resource", "stream_resource"):
                run_start = doc.get("run_start")
                if run_start is None and name == "resource" and len(self.runs) == 1:
                    # An old resource document names no run: the one open.
                    run_start = next(iter(self.runs))
                return run_start
            parent = self.parent_of(name, doc)
            if not isinstance(parent, str):
                return None
            route = self._ids.get(parent)
            if route is not None:
                return route.run_start
            return self._ended_ids.get(parent)
        except TypeError:  # an unhashable id
            return None

    def run_of(self, name: str, doc: Any) -> Run | str | None:
        """The open run a document belongs to, or the start uid of an ended
        run it belongs to, or None."""
        run_start = self.run_start(name, doc)
        if not isinstance(run_start, str):
            return None  # none said, or not a uid (refused as such)
        run = self.runs.get(run_start)
        if run is not None:
            return run
        return run_start if run_start in self.ended else None

    # ---------------------------------------------------------------- changes
    def open(self, uid: str, run: Run) -> None:
        self.seen_starts.add(uid)
        self.runs[uid] = run

    def add(self, name: str, doc: Mapping[str, Any]) -> None:
        """Note a descriptor or resource taken."""
        if name not in ("descriptor", "resource", "stream_resource"):
            return
        run_start = self.run_start(name, doc)
        if isinstance(run_start, str):
            self._ids[doc["uid"]] = Route(run_start, name)

    def refuse(self, name: str, doc: Mapping[str, Any], why: str) -> None:
        """Note a descriptor or resource refused: its documents are refused too."""
        uid = doc.get("uid")
        if name not in ("descriptor", "resource", "stream_resource") or not isinstance(uid, str):
            return
        if uid in self._ids and self._ids[uid].refused is None:
            return  # taken before: a second one refused leaves the first in place
        run_start = self.run_start(name, doc)
        if isinstance(run_start, str):
            self._ids[uid] = Route(run_start, name, why)

    def kept_after_end(self, name: str, doc: Mapping[str, Any], run_start: str) -> None:
        """A document of an ended run was kept in its store: the documents
        that refer to it are kept there too."""
        uid = doc.get("uid")
        if name in ("descriptor", "resource", "stream_resource") and isinstance(uid, str):
            self._ended_ids[uid] = run_start

    def close(self, run_start: str, store: Path | str | None, *, ended: bool = True) -> None:
        """Drop an open run; an ended run is remembered (its store, the ids of
        its descriptors and resources) for a while, to keep its documents that
        come after the end."""
        self.runs.pop(run_start, None)
        ids = [uid for uid, route in self._ids.items() if route.run_start == run_start]
        for uid in ids:
            del self._ids[uid]
        if not ended:
            # Its documents may come again: they are the run's, not late ones.
            self.seen_starts.discard(run_start)
            self.ended.pop(run_start, None)
            return
        if store is None:
            return
        self.ended[run_start] = store
        self._ended_ids.update(dict.fromkeys(ids, run_start))
        while len(self.ended) > ENDED_RUNS_KEPT:
            oldest, _ = self.ended.popitem(last=False)
            for uid in [u for u, s in self._ended_ids.items() if s == oldest]:
                del self._ended_ids[uid]

    # ---------------------------------------------------------------- checks
    def check(self, name: str, doc: Mapping[str, Any]) -> None:
        """Refuse a document that does not fit the runs seen so far."""
        try:
            if name == "start":
                if doc["uid"] in self.seen_starts:
                    raise DocumentOrderError(
                        f"a second start document with uid {doc['uid']!r}; every run "
                        f"needs a new uid"
                    )
            elif name in ("descriptor", "stop"):
                if doc["run_start"] not in self.runs:
                    raise DocumentOrderError(
                        f"{name} document for run {doc['run_start']!r}, which has not "
                        f"started (or has stopped) in this writer"
                    )
            elif name in ("resource", "stream_resource"):
                # Old resource documents do not name their run.
                run_start = doc["run_start"] if name == "stream_resource" else doc.get("run_start")
                if run_start is not None and run_start not in self.runs:
                    raise DocumentOrderError(
                        f"{name} {doc['uid']!r} belongs to run {run_start!r}, which has not "
                        f"started (or has stopped) in this writer"
                    )
            if name in ("event", "event_page", "stream_datum"):
                self._check_parent(name, doc["descriptor"], "descriptor")
            if name in ("datum", "datum_page", "stream_datum"):
                kind = "stream_resource" if name == "stream_datum" else "resource"
                self._check_parent(name, doc[kind], kind)
        except KeyError as err:
            raise DocumentError(f"{name} document lacks the field {err.args[0]!r}") from None

    def _check_parent(self, name: str, uid: Any, label: str) -> None:
        route = self._ids.get(uid)
        if route is not None and route.refused is not None and route.kind == label:
            raise DocumentOrderError(
                f"{name} refers to {label} {uid!r}, which was refused: {route.refused}"
            )
        if route is None or route.kind != label:
            raise DocumentOrderError(
                f"{name} refers to {label} {uid!r}, which this writer has not seen (it "
                f"must follow its {label})"
            )
