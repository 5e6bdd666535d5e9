"""The feeds floor: documents from elsewhere into the writer.

Recorded runs replayed (``_replay``), documents served from bluesky's 0MQ
proxy (``_serve``) or Kafka (``_kafka``), and suitcase's ``export`` shape
(``_export``).
"""

from ._export import export
from ._kafka import KafkaDocumentService, parse_config, read_config_file
from ._replay import BATCH_END, ReplayReport, format_summary, replay
from ._serve import DocumentService

__all__ = [
    "BATCH_END",
    "DocumentService",
    "KafkaDocumentService",
    "ReplayReport",
    "export",
    "format_summary",
    "parse_config",
    "read_config_file",
    "replay",
]
