"""Store names from the start document: a template formatted over it, sanitised.

Values are sanitised (letters, digits and ``._+-``), so metadata cannot
place a store outside the root; a name component too long for a file
system is shortened with a hash of the whole, so names stay distinct.
"""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._errors import DocumentError, OptionError, UnsafeNameError

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._+-]")


def sanitize_name(text: str) -> str:
    """Return ``text`` made safe as one path component or array name.

    Characters other than letters, digits and ``._+-`` become ``_``, and
    leading dots are dropped, so the result can neither climb out of a
    directory (``..``) nor hide (``.name``).
    """
    cleaned = _UNSAFE_CHARS.sub("_", str(text)).lstrip(".")
    return cleaned


DEFAULT_NAME_TEMPLATE = "{scan_id:05d}-{uid:.8}"


#: Longest store name component, in bytes (UTF-8). File names may have 255
#: bytes; the writer adds a hidden lock file ``.<name>.lock`` and may add a
#: hidden temporary directory ``.<name>.tmp-XXXXXXXX`` beside each store.
MAX_NAME_BYTES = 200

# A template field: a start document key, then any number of [index] parts.
_TEMPLATE_FIELD = re.compile(r"[^.\[\]]+(?:\[[^\]]+\])*")


class _SafeFormatter(string.Formatter):
    """Formats a template over the start document, sanitising every value."""

    def format_field(self, value: Any, format_spec: str) -> str:
        return sanitize_name(super().format_field(value, format_spec))


def check_name_template(template: str) -> None:
    """Raise :class:`OptionError` for a name template that no start document
    can fill: a path leaving the root, bad syntax (``"{scan_id"``), a
    positional field (``{}``) or a field taking an attribute (``{sample.real}``).
    Fields may index into the start document (``{plan_args[num]}``).
    """
    if Path(template).is_absolute() or ".." in Path(template).parts:
        raise OptionError(
            f"name_template must be a relative path inside the root, got {template!r}"
        )
    _check_template_fields(template, template)


def _check_template_fields(text: str, template: str) -> None:
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as err:
        raise OptionError(
            f"name_template {template!r} is not a valid format string: {err}"
        ) from None
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if not field or field.split("[")[0].isdigit():
            raise OptionError(
                f"name_template fields must name start document fields, like "
                f"{{scan_id}}, got {{{field}}} in {template!r}"
            )
        if not _TEMPLATE_FIELD.fullmatch(field):
            if "." in re.sub(r"\[[^\]]*\]", "", field):
                raise OptionError(
                    f"name_template fields may index into the start document "
                    f"({{plan_args[num]}}) but not take attributes, got {{{field}}} "
                    f"in {template!r}"
                )
            raise OptionError(f"name_template {template!r} has a malformed field {{{field}}}")
        if conversion not in (None, "r", "s", "a"):
            raise OptionError(
                f"name_template {template!r}: unknown conversion !{conversion} in "
                f"{{{field}}} (expected !r, !s or !a)"
            )
        if spec:
            _check_template_fields(spec, template)


def shorten_name(part: str, limit: int = MAX_NAME_BYTES) -> str:
    """``part``, or if it is longer than ``limit`` bytes (UTF-8), its start
    followed by ``-`` and 8 hex digits of the SHA-256 of the whole of it: as
    long as ``limit``, recognisable, and distinct for distinct parts."""
    raw = part.encode()
    if len(raw) <= limit:
        return part
    digest = hashlib.sha256(raw).hexdigest()[:8]
    head = raw[: limit - len(digest) - 1].decode("utf-8", errors="ignore")
    return f"{head}-{digest}"


def store_name(template: str, start: Mapping[str, Any]) -> list[str]:
    """The parts of a run's store name: ``template`` formatted over ``start``.

    Values from the start document are sanitised; literal ``/`` in the
    template separates the parts (subdirectories). The last part ends in
    ``.zarr``; no part is empty, ``.`` or ``..``, and no part is longer than
    :data:`MAX_NAME_BYTES` (longer ones are shortened by :func:`shorten_name`).
    """
    check_name_template(template)
    try:
        name = _SafeFormatter().vformat(template, (), _Defaulting(start))
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as err:
        raise DocumentError(
            f"cannot build the store name from name_template {template!r} and the "
            f"start document: {err!r}"
        ) from None
    parts = [p for p in name.split("/") if p]
    if not parts or any(not p or p in {".", ".."} for p in parts):
        raise UnsafeNameError(
            f"name_template {template!r} gives an empty or unsafe store name {name!r}"
        )
    suffix = ".zarr"
    parts = [shorten_name(p) for p in parts[:-1]] + [
        shorten_name(parts[-1], MAX_NAME_BYTES - len(suffix)) + suffix
    ]
    return parts


def store_path(root: Path, template: str, start: Mapping[str, Any]) -> Path:
    """The path of a run's store: ``root / (template formatted over start) + .zarr``.

    Values from the start document are sanitised; literal ``/`` in the
    template makes subdirectories. The result always lies inside ``root``.
    """
    path = root.joinpath(*store_name(template, start))
    resolved_root = root.resolve()
    if resolved_root not in path.resolve().parents:
        raise UnsafeNameError(f"store path {path} would lie outside {root}")
    return path


class _Defaulting(dict[str, Any]):
    """Start-document view whose missing ``scan_id`` formats as 0."""

    def __init__(self, start: Mapping[str, Any]) -> None:
        super().__init__(start)
        self.setdefault("scan_id", 0)
