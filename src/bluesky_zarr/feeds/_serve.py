"""``serve``: a service writing every run published through bluesky's 0MQ proxy.

The RunEngine's host publishes its documents (``bluesky.callbacks.zmq.Publisher``)
to a proxy (``bluesky-0MQ-proxy``); this service subscribes to the proxy's
outbound side with a ``RemoteDispatcher`` and hands each document to one
:class:`~bluesky_zarr.ZarrWriter`. SIGINT or SIGTERM stops it cleanly: the
runs still open are written as far as they arrived and marked incomplete.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Mapping
from typing import Any

from .._errors import BlueskyZarrError, DocumentOrderError, MissingDependencyError, ServeError
from ..write._writer import ZarrWriter

logger = logging.getLogger("bluesky_zarr.serve")


def give_document(
    writer: ZarrWriter,
    name: str,
    doc: dict[str, Any],
    ignored_runs: set[str],
    log: logging.Logger,
) -> bool:
    """Hand one document to a service's writer; False when the writer refused
    it (logged: a refused document never stops a service, and the writer
    keeps it in its run's store)."""
    try:
        writer(name, doc)
    except DocumentOrderError as err:
        # Documents of a run not being written: its start was not seen (the
        # service started mid-run) or refused, or it has stopped (a duplicate
        # delivered late: kept in its store, which no longer says complete).
        # Said once per run.
        run = str(doc.get("run_start") or doc.get("descriptor") or "?")
        if run not in ignored_runs:
            ignored_runs.add(run)
            log.warning("refusing documents of a run not being written: %s", err)
        return False
    except BlueskyZarrError as err:
        log.error("refused a %s document (kept in its run's store): %s", name, err)
        return False
    return True


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` as a (host, port) pair, or a :class:`ServeError`."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ServeError(
            f"expected the 0MQ proxy's outbound address as HOST:PORT (e.g. "
            f"localhost:5568), got {text!r}"
        )
    return host.strip("[]"), int(port)


class DocumentService:
    """Write every run seen on a 0MQ proxy; :meth:`run` until a signal.

    Parameters
    ----------
    address
        ``HOST:PORT`` of the proxy's outbound (subscriber) side.
    directory
        Root of the stores: a directory or an ``s3://bucket/prefix`` URL.
    prefix
        Only documents published with this prefix (``Publisher(prefix=...)``).
    **options
        Keyword options of :class:`~bluesky_zarr.ZarrWriter` (with ``tiled=``,
        every run written is registered with that Tiled server).
    """

    def __init__(
        self,
        address: str,
        directory: str | os.PathLike[str],
        *,
        prefix: bytes = b"",
        **options: Any,
    ) -> None:
        self.address = parse_address(address)
        try:
            import zmq  # noqa: F401 - bluesky's RemoteDispatcher needs it
        except ImportError:
            raise MissingDependencyError(
                'serve --zmq needs pyzmq: pip install "bluesky-zarr[zmq]"'
            ) from None
        self.writer = ZarrWriter(directory, **options)
        tiled = options.get("tiled")
        #: Where runs are registered, for the log (a URI, or a client node's).
        self.tiled: str | None = (
            None if tiled is None else tiled if isinstance(tiled, str) else str(tiled.uri)
        )
        self.prefix = prefix
        self.runs_started = 0
        self.runs_stopped = 0
        self.refused = 0
        self._ignored_runs: set[str] = set()
        self.stopped_by: str | None = None

    def __call__(self, name: str, doc: Mapping[str, Any]) -> None:
        """Hand one document to the writer; a bad run never stops the service."""
        try:
            accepted = give_document(self.writer, name, dict(doc), self._ignored_runs, logger)
        except Exception:  # noqa: BLE001 - logged loudly; the other runs go on
            self.refused += 1
            logger.exception("failed to write a %s document", name)
            return
        if not accepted:
            self.refused += 1
            return
        if name == "start":
            self.runs_started += 1
            logger.info(
                "run %s started (scan_id %s): writing %s",
                doc["uid"], doc.get("scan_id"), self.writer.stores[-1],
            )
        elif name == "stop":
            self.runs_stopped += 1
            logger.info(
                "run %s stopped (%s)", doc.get("run_start"), doc.get("exit_status", "unknown")
            )

    def run(self) -> None:
        """Receive and write documents until SIGINT or SIGTERM, then finish."""
        from bluesky.callbacks.zmq import RemoteDispatcher

        host, port = self.address
        dispatcher = RemoteDispatcher((host, port), prefix=self.prefix)
        dispatcher.subscribe(self)
        loop = dispatcher.loop

        def on_signal(signum: int) -> None:
            self.stopped_by = signal.Signals(signum).name
            for task in asyncio.all_tasks(loop):
                task.cancel()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        logger.info(
            "listening to the 0MQ proxy at %s:%s; writing runs to %s%s",
            host, port, self.writer.directory,
            f"; registering them with Tiled at {self.tiled}" if self.tiled else "",
        )
        try:
            dispatcher.start()
        except asyncio.CancelledError:
            if self.stopped_by is None:
                raise
        finally:
            open_runs = list(self.writer.open_runs)
            if open_runs:
                logger.info(
                    "finishing %d open run(s) as incomplete: %s",
                    len(open_runs), ", ".join(str(s) for s in open_runs),
                )
            self.writer.close(
                f"the service stopped ({self.stopped_by or 'error'}) before the run stopped"
            )
        failures = self.writer.tiled_failures
        if failures:
            logger.warning(
                "%d store(s) not registered with Tiled (written all the same): "
                "bluesky-zarr register --tiled %s %s",
                len(failures), self.tiled, " ".join(store for store, _ in failures),
            )
        logger.info(
            "stopped on %s: %d run(s) started, %d stopped, %d document(s) refused",
            self.stopped_by, self.runs_started, self.runs_stopped, self.refused,
        )
