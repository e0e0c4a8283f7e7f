"""Prometheus rules generated from code: the shipped alert and recording rules (`alerts`), and
per-cluster dead-man's switches for periodic tasks (`periodic`). `celery-obs rules` (`cli`)
writes either; the files under prometheus/rules/ are its output with the default settings."""
