"""`celery-obs setup elasticsearch|kibana`: flags, environment fallbacks, output, exit codes.

Flags beat environment variables. Credentials are better given through the environment
(command lines are visible to every user of the host). Exit codes: 0 done, 1 the cluster or
Kibana could not be set up (unreachable, refused, an import error), 2 a usage or local problem.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

from ..settings import Setting, SettingTable, non_negative, parse_bool
from .assets import DEFAULT_DELETE_AFTER, check_age, data_stream_name

EXIT_FAILED = 1
EXIT_USAGE = 2


def _age(text: str) -> str:
    return check_age(text)


def _connection_settings(
    product: str, port: int, env: dict[str, tuple[str, ...]], extra: tuple[Setting, ...]
) -> SettingTable:
    """--url and the credentials; `env` maps each to the variables it falls back to."""
    return SettingTable(
        (
            Setting(
                "url",
                f"{product} URL, e.g. https://host:{port}.",
                None,
                flag="--url",
                env=env["url"],
                metavar="URL",
                shown="(required)",
            ),
            Setting(
                "api_key",
                "API key (the base64 'encoded' value); from the environment it wins over a user.",
                None,
                flag="--api-key",
                env=env["api_key"],
                metavar="KEY",
                secret=True,
                exclusive="auth",
            ),
            Setting(
                "user",
                "Basic auth user.",
                None,
                flag="--user",
                env=env["user"],
                metavar="NAME",
                exclusive="auth",
            ),
            Setting(
                "password",
                "Basic auth password; prefer the environment (command lines are visible to "
                "every user of the host).",
                None,
                flag="--password",
                env=env["password"],
                metavar="PASSWORD",
                secret=True,
            ),
            Setting(
                "ca_certs",
                f"PEM file of the CA that signed {product}'s certificate.",
                None,
                flag="--ca-certs",
                env=env["ca_certs"],
                metavar="FILE",
            ),
            Setting(
                "insecure",
                "Do not verify the TLS certificate (testing only).",
                False,
                parse_bool,
                flag="--insecure",
            ),
            Setting(
                "wait",
                f"Keep retrying while {product} is unreachable or starting, up to SECONDS (for "
                "a one-shot setup container); 0 tries once.",
                0.0,
                non_negative(float),
                flag="--wait",
                metavar="SECONDS",
            ),
            Setting(
                "assets",
                "Directory holding elasticsearch/ and kibana/ (default: the ones this "
                "installation carries).",
                None,
                flag="--assets",
                env=("CELERY_OBS_ASSETS",),
                metavar="DIR",
                shown="(installed)",
            ),
            *extra,
        )
    )


#: `celery-obs setup elasticsearch`: docs/elastic-stack.md's table is its rendering.
ELASTICSEARCH_SETTINGS = _connection_settings(
    "Elasticsearch",
    9200,
    {
        "url": ("ELASTICSEARCH_URL", "ELASTICSEARCH_HOSTS"),
        "api_key": ("ELASTICSEARCH_API_KEY",),
        "user": ("ELASTICSEARCH_USERNAME",),
        "password": ("ELASTICSEARCH_PASSWORD",),
        "ca_certs": ("ELASTICSEARCH_CA_CERTS",),
    },
    (
        Setting(
            "delete_after",
            "Delete log indices this long after they roll over (daily): 30d, 12h, ...",
            DEFAULT_DELETE_AFTER,
            _age,
            flag="--delete-after",
            metavar="AGE",
        ),
    ),
)
#: `celery-obs setup kibana`: credentials default to the Elasticsearch ones.
KIBANA_SETTINGS = _connection_settings(
    "Kibana",
    5601,
    {
        "url": ("KIBANA_URL",),
        "api_key": ("KIBANA_API_KEY", "ELASTICSEARCH_API_KEY"),
        "user": ("KIBANA_USERNAME", "ELASTICSEARCH_USERNAME"),
        "password": ("KIBANA_PASSWORD", "ELASTICSEARCH_PASSWORD"),
        "ca_certs": ("KIBANA_CA_CERTS", "ELASTICSEARCH_CA_CERTS"),
    },
    (
        Setting(
            "space",
            "Kibana space to import into.",
            None,
            flag="--space",
            env=("KIBANA_SPACE",),
            metavar="ID",
            shown="(the default space)",
        ),
    ),
)


def add_setup_parser(commands: Any, environ: Mapping[str, str]) -> None:
    """Register `setup` and its two targets on the CLI's subparsers."""
    setup = commands.add_parser(
        "setup",
        help="Install the Elasticsearch templates or the Kibana objects for the worker logs.",
        description="Prepare an Elasticsearch cluster and Kibana for the workers' JSON logs. "
        "Both commands can be run again at any time: they replace what they installed.",
    )
    targets = setup.add_subparsers(dest="target", required=True, metavar="TARGET")
    es = targets.add_parser(
        "elasticsearch",
        help="Install the ILM policy, component template and index template.",
        description="Install (or update) the ILM policy celery-logs, the component template "
        "logs-celery@mappings and the index template logs-celery (pattern logs-celery-*, "
        f"priority 200), so that data streams such as {data_stream_name()} get the mappings "
        "for celery.*, event.* and labels.*. Needs the cluster privileges manage_ilm and "
        "manage_index_templates.",
    )
    ELASTICSEARCH_SETTINGS.add_arguments(es, environ)
    kibana = targets.add_parser(
        "kibana",
        help="Import the data view, saved searches and dashboard.",
        description="Import kibana/celery.ndjson (data view celery-logs on logs-celery-*, saved "
        "searches, Lens charts, the 'Celery logs' dashboard), overwriting earlier copies. "
        "Credentials default to the Elasticsearch ones.",
    )
    KIBANA_SETTINGS.add_arguments(kibana, environ)


def _fail(target: str, message: str, code: int = EXIT_FAILED) -> int:
    print(f"celery-obs setup {target}: error: {message}", file=sys.stderr)
    return code


def _check_auth(args: argparse.Namespace) -> str | None:
    if not args.url:
        env = "ELASTICSEARCH_URL" if args.target == "elasticsearch" else "KIBANA_URL"
        return f"--url (or {env}) is required"
    if args.user and args.api_key:
        # Both came from the environment (the flags exclude each other): the key wins.
        args.user = None
    if args.user and not args.password:
        return "--user needs --password (or its environment variable)"
    return None


def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Run `setup <target>`; returns the exit code."""
    from .assets import Assets, AssetsError, find_assets
    from .errors import SetupError

    target = args.target
    problem = _check_auth(args)
    if problem:
        return _fail(target, problem, EXIT_USAGE)
    if args.url and " " in args.url.strip():  # ELASTICSEARCH_HOSTS may list several
        args.url = args.url.split()[0]
    try:
        assets = Assets(find_assets(args.assets, environ))
        if target == "elasticsearch":
            return _setup_elasticsearch(args, assets)
        return _setup_kibana(args, assets)
    except AssetsError as exc:
        return _fail(target, str(exc), EXIT_USAGE)
    except SetupError as exc:
        return _fail(target, str(exc))


def _setup_elasticsearch(args: argparse.Namespace, assets: Any) -> int:
    try:
        from .elasticsearch import Connection, install
    except ImportError as exc:  # the client is the [elasticsearch] extra
        return _fail(
            "elasticsearch",
            f"needs the Elasticsearch client ({exc}): pip install "
            "'celery-observability[elasticsearch]' "
            "(from a checkout: pip install '.[elasticsearch]')",
            EXIT_USAGE,
        )

    connection = Connection(
        url=args.url,
        api_key=args.api_key,
        username=args.user,
        password=args.password,
        ca_certs=args.ca_certs,
        insecure=args.insecure,
    )
    report = install(connection, assets, args.delete_after, wait=args.wait)
    cluster = f", cluster {report.cluster}" if report.cluster else ""
    print(f"Elasticsearch {report.version} at {connection.safe_url}{cluster}")
    for item in report.installed:
        print(f"  {item.kind:<18} {item.name:<22} {item.action:<8} {item.detail}".rstrip())
    for note in report.notes:
        print(f"  note: {note}")
    print(
        f"Logs go to data streams {data_stream_name('<namespace>')} "
        f"(Logstash's default: {data_stream_name()})."
    )
    return 0


def _setup_kibana(args: argparse.Namespace, assets: Any) -> int:
    from .kibana import KibanaConnection, import_objects
    from .kibana_objects import DASHBOARD_ID

    connection = KibanaConnection(
        url=args.url,
        api_key=args.api_key,
        username=args.user,
        password=args.password,
        ca_certs=args.ca_certs,
        insecure=args.insecure,
        space=args.space,
    )
    report = import_objects(connection, assets.kibana_objects, wait=args.wait)
    counts = ", ".join(f"{n} {kind}" for kind, n in sorted(report.imported.items()))
    where = f" into space {connection.space}" if connection.space else ""
    print(f"Kibana at {connection.url}: imported {report.count} objects{where} ({counts or '-'})")
    for error in report.errors:
        print(f"  error: {error}", file=sys.stderr)
    if not report.success:
        return _fail("kibana", f"{len(report.errors)} object(s) could not be imported")
    print(f"Dashboard: {connection.base}/app/dashboards#/view/{DASHBOARD_ID}")
    return 0
