"""Installs the Elasticsearch templates and Kibana objects the log pipeline needs.

`celery-obs setup elasticsearch` puts the ILM policy, component template and index template for
the logs-celery-* data streams into a cluster; `celery-obs setup kibana` imports the data view,
saved searches and dashboard. Both are idempotent. The files themselves live in the repository's
elasticsearch/ and kibana/ directories (see `assets`).
"""

from .assets import (
    COMPONENT_TEMPLATE,
    DATA_VIEW_ID,
    ILM_POLICY,
    INDEX_PATTERN,
    INDEX_TEMPLATE,
    Assets,
    AssetsError,
    data_stream_name,
    find_assets,
)
from .cli import add_setup_parser, run

__all__ = [
    "COMPONENT_TEMPLATE",
    "DATA_VIEW_ID",
    "ILM_POLICY",
    "INDEX_PATTERN",
    "INDEX_TEMPLATE",
    "Assets",
    "AssetsError",
    "add_setup_parser",
    "data_stream_name",
    "find_assets",
    "run",
]
