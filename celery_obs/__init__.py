"""celery-observability: observability for Celery clusters that already exist.

- `celery_obs.exporter`: consumes a cluster's events, serves Prometheus metrics (`celery-obs
  exporter --broker-url URL`).
- `celery_obs.log_shipping`: imported inside the workers, `log_shipping.install(app)` makes every
  log line and lifecycle step an ECS JSON record, shipped to Logstash or Elasticsearch.
- `celery_obs.dashboards`, `celery_obs.setup`, `celery_obs.assets`: Grafana dashboards,
  Elasticsearch/Kibana setup, and the rules, dashboards and pipeline files the wheel carries.

Importing this package imports nothing else: a worker that only wants JSON logs pays only for
`log_shipping`.
"""

__version__ = "0.2.0"
