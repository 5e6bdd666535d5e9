"""The write floor: the live callback.

:class:`ZarrWriter` routes documents to one :class:`RunWriter` per run
(``_run``), which places each stream's points (``_stream``) in the chunk
buffer (``_buffer``), whose complete blocks the workers write (``_workers``);
a stream whose grid proved wrong is laid out anew (``_relayout``).
"""

from ._writer import ZarrWriter

__all__ = [
    "ZarrWriter",
]
