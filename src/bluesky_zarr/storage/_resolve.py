"""The root a writer's ``directory`` names: a local directory, a bucket, or
Icechunk repositories in either."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .._errors import OptionError
from ._icechunk import RepositoryRoot
from ._roots import FsspecRoot, LocalRoot, Root, is_url


def resolve_root(
    root: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    durable: bool = False,
    *,
    repositories: bool = False,
) -> Root:
    """The storage root named by a directory or an ``s3://bucket/prefix`` URL;
    ``repositories``: each run's store an Icechunk repository there
    (``external="virtual"``)."""
    base: LocalRoot | FsspecRoot
    if is_url(root):
        # An object is durable once its write returns.
        base = FsspecRoot(str(root), storage_options)
    elif storage_options:
        raise OptionError(
            f"storage_options= apply to object storage URLs (s3://...), not to the "
            f"local directory {str(root)!r}"
        )
    else:
        base = LocalRoot(root, durable=durable)
    if repositories:
        return RepositoryRoot(base)
    return base
