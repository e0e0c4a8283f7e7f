"""`celery-obs`: the command line. Parses flags and environment at the edge, then runs a command.

    celery-obs exporter --broker-url redis://host:6379/0    watch a cluster, serve /metrics
    celery-obs demo                                          embedded cluster + exporter
    celery-obs dashboards                                    write the Grafana dashboards
    celery-obs setup elasticsearch|kibana --url URL          templates / saved objects for logs
    celery-obs assets export DIR                             rules, dashboards, pipeline, ...
    celery-obs rules alerts --selector MATCHERS --out DIR    the alerts for your scrape labels
    celery-obs rules periodic reports.nightly=26h            dead-man's switches for beat tasks

It only dispatches: each command lives in its package (exporter, setup, dashboards, assets,
rules), and none of those imports this module.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import __version__, assets
from .exporter import commands as exporter_commands
from .rules import cli as rules
from .setup.cli import add_setup_parser
from .setup.cli import run as run_setup

#: What to install for a command whose optional dependencies are missing. From a checkout (the
#: package is not on an index yet): `pip install '.[dashboards]'`.
INSTALL_HINT = (
    "pip install 'celery-observability[{extra}]' (from a checkout: pip install '.[{extra}]')"
)


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="celery-obs",
        description="Observability for existing Celery clusters: attach by broker URL.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    exporter_commands.add_commands(commands, environ)

    dashboards = commands.add_parser(
        "dashboards",
        help="Write the Grafana dashboards as JSON.",
        description="Write the Grafana dashboards (grafanalib) as deterministic JSON files.",
    )
    dashboards.add_argument(
        "--out",
        default="grafana/dashboards",
        metavar="DIR",
        help="Directory to write into [default grafana/dashboards]",
    )
    dashboards.add_argument(
        "--kibana-url",
        default="http://localhost:5601",
        metavar="URL",
        help="Kibana base URL for the task log links (also a dashboard variable) "
        "[default http://localhost:5601]",
    )
    dashboards.add_argument(
        "--configmap",
        metavar="FILE",
        help="Also write them as one ConfigMap for the Grafana sidecar (Kubernetes), e.g. "
        "deploy/kubernetes/components/grafana-dashboards/configmap.yaml",
    )
    add_setup_parser(commands, environ)

    assets_parser = commands.add_parser(
        "assets",
        help="Write out the rules, dashboards, Logstash pipeline and templates it carries.",
        description="Copy the files this installation carries (Prometheus rules and their "
        "promtool tests, Grafana dashboards and provisioning, the Logstash pipeline, "
        "Elasticsearch templates, Kibana objects) into a directory, laid out as in the "
        "repository, for deploying them elsewhere.",
    )
    actions = assets_parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = actions.add_parser("export", help="Copy every asset into DIR.")
    export.add_argument("directory", metavar="DIR", type=Path, help="Where to write them.")
    actions.add_parser("list", help="List the assets and where they are read from.")
    rules.add_rules_parser(commands)
    return parser


def write_dashboards(out: Path, kibana_url: str, configmap: Path | None = None) -> int:
    try:
        from .dashboards import configmap as dashboards_configmap
        from .dashboards import write_all
    except ImportError as exc:  # grafanalib is an optional extra
        print(
            f"celery-obs: dashboards need grafanalib ({exc}); "
            + INSTALL_HINT.format(extra="dashboards"),
            file=sys.stderr,
        )
        return 2
    for path in write_all(out, kibana_url):
        print(f"wrote {path}")
    if configmap is not None:
        try:
            configmap.write_text(dashboards_configmap(kibana_url))
        except OSError as exc:
            print(f"celery-obs: cannot write {configmap}: {exc.strerror}", file=sys.stderr)
            return 1
        print(f"wrote {configmap}")
    return 0


def run_assets(args: argparse.Namespace) -> int:
    try:
        if args.action == "list":
            base = assets.root()
            print(f"# {base}")
            for relative in assets.listing(base):
                print(relative)
            return 0
        written = assets.export(args.directory)
    except (assets.AssetsNotFound, OSError) as exc:
        print(f"celery-obs: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(written)} files under {args.directory}")
    return 0


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    if args.command == "dashboards":
        configmap = Path(args.configmap) if args.configmap else None
        return write_dashboards(Path(args.out), args.kibana_url, configmap)
    if args.command == "setup":
        return run_setup(args, environ)
    if args.command == "assets":
        return run_assets(args)
    if args.command == "rules":
        return rules.run(args)
    return exporter_commands.run(args, parser)


if __name__ == "__main__":
    sys.exit(main())
