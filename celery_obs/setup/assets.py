"""The files `celery-obs setup` installs, where to find them, and the names they agree on.

The Elasticsearch templates and the Kibana saved objects live at the top of the repository
(`elasticsearch/`, `kibana/`) so that users attaching to an existing cluster can read or copy
them without Python; the wheel carries a copy (`celery_obs.assets`). They are looked up in
`--assets DIR`, else `$CELERY_OBS_ASSETS`, else in this installation.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import assets as package_assets

ASSETS_ENV = "CELERY_OBS_ASSETS"

# Data stream naming: logs-<dataset>-<namespace>. Logstash's output, log_shipping's direct
# Elasticsearch sink, the index template and the Kibana data view all use these.
DATA_STREAM_TYPE = "logs"
DATASET = "celery"
DEFAULT_NAMESPACE = "default"
INDEX_PATTERN = f"{DATA_STREAM_TYPE}-{DATASET}-*"

ILM_POLICY = "celery-logs"
COMPONENT_TEMPLATE = "logs-celery@mappings"
INDEX_TEMPLATE = "logs-celery"
DATA_VIEW_ID = "celery-logs"

#: Ports of the inputs in logstash/pipeline/celery.conf.
LOGSTASH_PORTS = {"http": 8080, "tcp": 5000, "beats": 5044}

DEFAULT_DELETE_AFTER = "30d"
#: Where ilm-policy.json says how long to keep logs; replaced by the --delete-after value.
DELETE_AFTER_PLACEHOLDER = "{{delete_after}}"
# Elasticsearch's time units, as ILM's min_age takes them.
_AGE = re.compile(r"^[1-9][0-9]*(d|h|m|s|ms|micros|nanos)$")


class AssetsError(Exception):
    """The assets directory is missing or a file in it is unusable; the message says which."""


def data_stream_name(namespace: str = DEFAULT_NAMESPACE) -> str:
    return f"{DATA_STREAM_TYPE}-{DATASET}-{namespace}"


def _has_assets(directory: Path) -> bool:
    return (directory / "elasticsearch").is_dir() and (directory / "kibana").is_dir()


def find_assets(given: str | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """The directory holding elasticsearch/ and kibana/: the flag, the environment, the checkout."""
    environ = os.environ if environ is None else environ
    for source, value in (("--assets", given), (ASSETS_ENV, environ.get(ASSETS_ENV))):
        if value:
            directory = Path(value).expanduser()
            if not _has_assets(directory):
                raise AssetsError(
                    f"{source} {directory}: expected the directories elasticsearch/ and kibana/ "
                    "in it (the root of a celery-observability checkout)"
                )
            return directory
    try:
        return package_assets.root()  # the wheel's packed copy, or the source checkout
    except package_assets.AssetsNotFound as exc:
        raise AssetsError(
            f"cannot find the Elasticsearch templates and Kibana objects: {exc}. Or pass "
            "--assets DIR / set CELERY_OBS_ASSETS to a directory holding elasticsearch/ and "
            "kibana/ (celery-obs assets export DIR writes one)."
        ) from None


def check_age(text: str) -> str:
    """An ILM age such as 30d or 12h; raises ValueError otherwise."""
    if not _AGE.match(text):
        raise ValueError(f"an age must be a whole number and a unit (30d, 12h, 90m), got {text!r}")
    return text


def _substitute(value: Any, placeholder: str, replacement: str) -> Any:
    if isinstance(value, dict):
        return {k: _substitute(v, placeholder, replacement) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, placeholder, replacement) for v in value]
    return replacement if value == placeholder else value


@dataclass(frozen=True)
class Assets:
    root: Path

    def _json(self, relative: str) -> dict[str, Any]:
        path = self.root / relative
        try:
            with path.open(encoding="utf-8") as handle:
                data = json.load(handle)
        except OSError as exc:
            raise AssetsError(f"cannot read {path}: {exc.strerror or exc}") from None
        except json.JSONDecodeError as exc:
            raise AssetsError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise AssetsError(f"{path}: expected a JSON object")
        return data

    def ilm_policy(self, delete_after: str = DEFAULT_DELETE_AFTER) -> dict[str, Any]:
        """The ILM policy body with the delete phase's age filled in."""
        return _substitute(
            self._json("elasticsearch/ilm-policy.json"),
            DELETE_AFTER_PLACEHOLDER,
            check_age(delete_after),
        )

    def component_template(self) -> dict[str, Any]:
        return self._json("elasticsearch/component-template-celery.json")

    def index_template(self) -> dict[str, Any]:
        return self._json("elasticsearch/index-template-celery.json")

    @property
    def kibana_objects(self) -> Path:
        return self.root / "kibana" / "celery.ndjson"
