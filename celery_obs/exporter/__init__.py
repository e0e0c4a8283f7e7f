"""Event-consuming Prometheus exporter for Celery clusters: attach by broker URL.

Stages: `consumer` (broker I/O) -> `tracker` (pure event logic) -> `collector` (render at scrape
time, names from the `metrics` catalogue) -> `http` (serve). `service.Exporter` wires them.
"""

from .config import ExporterConfig, Limits
from .metrics import CATALOGUE, MetricSpec
from .service import Exporter
from .tracker import Tracker, TrackerView

__all__ = [
    "CATALOGUE",
    "Exporter",
    "ExporterConfig",
    "Limits",
    "MetricSpec",
    "Tracker",
    "TrackerView",
]
