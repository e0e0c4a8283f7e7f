# The celery-obs image: the `celery-obs` CLI (exporter, setup), the log_shipping package for
# workers, the Elasticsearch/Kibana assets `celery-obs setup` installs, and the compose demo.
#
#   docker build -t celery-observability .
#   docker run --rm celery-observability exporter --broker-url redis://redis.internal:6379/0
FROM python:3.12-slim

LABEL org.opencontainers.image.title="celery-observability" \
      org.opencontainers.image.description="Prometheus exporter, JSON worker logs, dashboards and alerts for Celery" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/celery-observability/celery-observability"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Build the wheel from a scratch copy and delete it, so the only importable copy of the package
# is the installed one. The wheel carries the rules, dashboards, pipeline and templates.
COPY pyproject.toml setup.py MANIFEST.in README.md CHANGELOG.md /tmp/src/
COPY celery_obs/ /tmp/src/celery_obs/
COPY prometheus/ /tmp/src/prometheus/
COPY grafana/ /tmp/src/grafana/
COPY logstash/ /tmp/src/logstash/
COPY elasticsearch/ /tmp/src/elasticsearch/
COPY kibana/ /tmp/src/kibana/
RUN pip install "/tmp/src[elasticsearch]" && rm -rf /tmp/src

# A fixed uid so volumes and bind mounts can be given to it; the spool directory exists in the
# image so that a named volume mounted there starts out owned by this user, not root.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/celery-obs celery-obs \
    && mkdir -p /var/spool/celery-obs \
    && chown celery-obs:celery-obs /var/spool/celery-obs

WORKDIR /app
COPY compose/ /app/compose/

# By number: Kubernetes' runAsNonRoot cannot tell that a user *name* is not root.
USER 10001:10001

# One check for every role the image runs: the exporter's /livez (alive, even while its broker
# is away) when it runs the exporter; workers and setup jobs are healthy while they run.
# docker-compose.yml gives its services checks of their own, which replace this one.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "celery_obs.healthcheck"]
EXPOSE 9808
ENTRYPOINT ["celery-obs"]
CMD ["exporter", "--help"]
