"""Grafana dashboards for celery-obs, as code (grafanalib), written as deterministic JSON."""

from .build import DASHBOARDS, render, write_all

__all__ = ["DASHBOARDS", "render", "write_all"]
