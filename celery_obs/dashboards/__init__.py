"""Grafana dashboards for celery-obs, as code (grafanalib), written as deterministic JSON."""

from .build import DASHBOARDS, configmap, render, write_all

__all__ = ["DASHBOARDS", "configmap", "render", "write_all"]
