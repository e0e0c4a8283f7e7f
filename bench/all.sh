#!/usr/bin/env bash
# Every benchmark behind the README's performance table, one after the other (about 12 min).
# Needs: pip install -e '.[dev]', redis-server on PATH (a private one is started per run),
# RabbitMQ at 127.0.0.1:5672 for the amqp lines.
set -uo pipefail
cd "$(dirname "$0")/.."
run() { echo "### bench/run.py $*"; timeout 1200 python bench/run.py "$@" 2>&1 | tail -8; }
run drain --tasks 50000
run drain --tasks 50000 --batch 24
run drain --tasks 50000 --names 2000
run drain --tasks 50000 --subjects exporter --exporter-arg=--max-backlog-mb=8
run burst --tasks 50000 --batch 24
run restart --tasks 50000 --rate 4000 --subjects exporter
run live --broker amqp --tasks 50000 --rate 5500
run drain --broker amqp --tasks 50000
echo "### bench/memory.py --ids 1000000"
(cd bench && timeout 900 python memory.py --ids 1000000)
