"""`celery-obs rules alerts|prometheus-rule|periodic`: write Prometheus rule files for your
cluster."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import alerts, periodic
from .promql import DEFAULT_GRAFANA, DEFAULT_RUNBOOKS, DEFAULT_SELECTOR, Links, RulesError


def _add_links(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runbook-url",
        default=DEFAULT_RUNBOOKS,
        metavar="URL",
        help="Where docs/runbooks.md is published; each alert's runbook_url is URL#<alert> "
        "[default %(default)s]",
    )
    parser.add_argument(
        "--grafana-url",
        default=DEFAULT_GRAFANA,
        metavar="URL",
        help="Grafana's base URL, for each alert's dashboard_url [default %(default)s]",
    )


def add_rules_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "rules",
        help="Generate Prometheus rules for your cluster (scrape selector, periodic tasks).",
        description="Generate Prometheus rules that depend on your cluster.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    shipped = actions.add_parser(
        "alerts",
        help="Write the alert and recording rules for your scrape selector.",
        description=(
            "Write celery-recording.yml and celery-alerts.yml (the rules shipped in "
            "prometheus/rules/) for the label selector that picks your exporter's targets. "
            "Under the Prometheus Operator the job label is the Service's name. Example: "
            'celery-obs rules alerts --selector \'namespace="celery",job="celery-exporter"\' '
            "--out ./rules"
        ),
    )
    shipped.add_argument(
        "--selector",
        default=DEFAULT_SELECTOR,
        metavar="MATCHERS",
        help="Label matchers that select the exporter's series and its `up` [default %(default)s]",
    )
    _add_links(shipped)
    shipped.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="Directory to write the files to."
    )

    operator = actions.add_parser(
        "prometheus-rule",
        help="Write the same rules as one Prometheus Operator PrometheusRule.",
        description=(
            "Write the recording and alert rules as a PrometheusRule object (the "
            "deploy/kubernetes prometheus-rule component is its default output)."
        ),
    )
    operator.add_argument(
        "--selector",
        default=DEFAULT_SELECTOR,
        metavar="MATCHERS",
        help="Label matchers that select the exporter's series and its `up` [default "
        "%(default)s: the ServiceMonitor's job for the Service named celery-exporter]",
    )
    operator.add_argument(
        "--name", default="celery-exporter", help="The object's name [default %(default)s]"
    )
    _add_links(operator)
    operator.add_argument(
        "--out", type=Path, metavar="FILE", help="Write here instead of to standard output."
    )

    beat = actions.add_parser(
        "periodic",
        help="Alert when a periodic task has not succeeded for a while.",
        description=(
            "Write alert rules that fire when a task has not succeeded for the given duration "
            "(CeleryPeriodicTaskNotSucceeded) or its latest run failed "
            "(CeleryPeriodicTaskLastRunFailed). Give tasks as NAME=DURATION, or @FILE with one "
            "per line. Example: celery-obs rules periodic reports.nightly=26h "
            "billing.sync=20m --out prometheus/rules/celery-periodic.yml"
        ),
        fromfile_prefix_chars="@",
    )
    beat.add_argument(
        "tasks",
        nargs="+",
        metavar="NAME=DURATION",
        help="A task name as Celery registers it, and how long it may go without a success "
        "(a Prometheus duration: 26h, 90m, 1d12h). Allow for its schedule and its run time.",
    )
    beat.add_argument(
        "--selector",
        default="",
        metavar="MATCHERS",
        help='Label matchers added to every series, e.g. job="celery-exporter" when several '
        "clusters share a Prometheus [default none]",
    )
    beat.add_argument(
        "--severity",
        default="warning",
        choices=("critical", "warning", "info"),
        help="The alerts' severity label [default warning]",
    )
    _add_links(beat)
    beat.add_argument(
        "--out", type=Path, metavar="FILE", help="Write here instead of to standard output."
    )


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as exc:
        raise RulesError(f"cannot write {path}: {exc.strerror}") from None


def _alerts(args: argparse.Namespace, links: Links) -> int:
    files = alerts.rule_files(args.selector, links)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RulesError(f"cannot create {args.out}: {exc.strerror}") from None
    for name, text in files.items():
        _write(args.out / name, text)
        print(f"wrote {args.out / name}")
    return 0


def _periodic(args: argparse.Namespace, links: Links) -> int:
    # From an @FILE: blank lines and # comments are not tasks.
    specs = [spec for spec in args.tasks if spec.strip() and not spec.lstrip().startswith("#")]
    if not specs:
        raise RulesError("no tasks given")
    tasks = [periodic.parse_periodic(spec) for spec in specs]
    text = periodic.periodic_rules(tasks, args.selector, args.severity, links)
    return _output(text, args.out, f": {2 * len(tasks)} rules for {len(tasks)} periodic tasks")


def _prometheus_rule(args: argparse.Namespace, links: Links) -> int:
    return _output(alerts.prometheus_rule(args.selector, links, args.name), args.out)


def _output(text: str, out: Path | None, what: str = "") -> int:
    """To `out` (saying so), or to standard output without one."""
    if out is None:
        sys.stdout.write(text)
        return 0
    _write(out, text)
    print(f"wrote {out}{what}")
    return 0


def run(args: argparse.Namespace) -> int:
    links = Links(args.runbook_url, args.grafana_url)
    actions = {"alerts": _alerts, "periodic": _periodic, "prometheus-rule": _prometheus_rule}
    try:
        return actions[args.action](args, links)
    except RulesError as exc:
        print(f"celery-obs rules: {exc}", file=sys.stderr)
        return 1 if str(exc).startswith("cannot ") else 2
