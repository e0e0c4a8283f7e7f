# The celery-obs image: the `celery-obs` CLI (exporter, setup), the log_shipping package for
# workers, the Elasticsearch/Kibana assets `celery-obs setup` installs, and the compose demo.
#
#   docker build -t celery-observability .
#   docker run --rm celery-observability exporter --broker-url redis://redis.internal:6379/0
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# An 8.x Python client talks to Elasticsearch 8 and 9; a 9.x client sends `compatible-with=9`,
# which an 8.x server (docker-compose.yml runs 8.x) rejects. log_shipping's direct
# elasticsearch+https output uses the client as installed, so the image keeps it at 8.x.
ARG ELASTICSEARCH_CLIENT="elasticsearch>=8.13,<9"

# Build from a scratch copy and delete it, so the only importable copy of the packages is the
# installed one (a /app/exporter source tree would shadow it for anything run from /app).
COPY pyproject.toml README.md /tmp/src/
COPY exporter/ /tmp/src/exporter/
COPY dashboards/ /tmp/src/dashboards/
COPY log_shipping/ /tmp/src/log_shipping/
COPY stack_setup/ /tmp/src/stack_setup/
RUN pip install /tmp/src "$ELASTICSEARCH_CLIENT" && rm -rf /tmp/src

# A fixed uid so volumes and bind mounts can be given to it; the spool directory exists in the
# image so that a named volume mounted there starts out owned by this user, not root.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/celery-obs celery-obs \
    && mkdir -p /var/spool/celery-obs \
    && chown celery-obs:celery-obs /var/spool/celery-obs

WORKDIR /app
COPY elasticsearch/ /app/elasticsearch/
COPY kibana/ /app/kibana/
COPY compose/ /app/compose/
ENV CELERY_OBS_ASSETS=/app

USER celery-obs

# No HEALTHCHECK here: the image runs the exporter, workers and one-shot setup jobs, which are
# healthy in different ways; docker-compose.yml gives each service its own check.
EXPOSE 9808
ENTRYPOINT ["celery-obs"]
CMD ["exporter", "--help"]
