"""``export``: the suitcase-style entry point, documents in, stores out."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..write._writer import ZarrWriter


def export(
    gen: Iterable[tuple[str, dict[str, Any]]],
    directory: str | os.PathLike[str],
    **options: Any,
) -> list[Path | str]:
    """Write the runs of a document stream into Zarr stores, one per run.

    The suitcase convention: ``export(gen, directory, **options)`` beside the
    :class:`~bluesky_zarr.ZarrWriter` callback that does the work.

    Parameters
    ----------
    gen
        ``(name, document)`` pairs, e.g. from a RunEngine, a databroker or
        tiled run's ``documents()``, or a recorded file.
    directory
        Root directory of the stores, or an ``s3://bucket/prefix`` URL.
    **options
        Keyword options of :class:`~bluesky_zarr.ZarrWriter` (``chunks``,
        ``name_template``, ``storage_options``, ...).

    Returns
    -------
    list
        The stores written, in order: paths, or URLs for object storage.

    Notes
    -----
    Runs that the stream leaves open (no stop document) are written as far
    as they go and marked incomplete. Should the stream raise, the runs still
    open are finished the same way before the exception propagates.
    """
    writer = ZarrWriter(directory, **options)
    try:
        for name, doc in gen:
            writer(name, doc)
    except BaseException:
        writer.close("the document stream failed before the run stopped")
        raise
    writer.close("the document stream ended before the run stopped")
    return list(writer.stores)
