"""Settings declared once: name, flag, environment variables, type, default and help.

The exporter's flags, log_shipping's settings and the setup commands' flags are each a
`SettingTable`. From it come the command-line flags (argparse, each showing its variables and
default in --help), the environment fallbacks (a flag beats the environment, which beats the
default), validation with a message naming the variable or flag, and the reference tables in
docs/ (a test keeps them equal to `markdown()`). There is one bool parser, and a typo is an
error, never a quiet "off".
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

Parse = Callable[[str], Any]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class SettingError(ValueError):
    """A value that is not valid for its setting; the message names where it came from."""


def parse_bool(text: str) -> bool:
    word = str(text).strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    # verify_certs=ture must not turn TLS checks off.
    raise ValueError(f"expected true/false, yes/no, on/off or 1/0, got {text!r}")


def positive(kind: Callable[[str], Any]) -> Parse:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"must be a number > 0, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def non_negative(kind: Callable[[str], Any]) -> Parse:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value >= 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"must be a number >= 0, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def csv(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in str(text).split(",") if item.strip())


def choice(*options: str) -> Parse:
    def parse(text: str) -> str:
        word = str(text).strip().lower()
        if word not in options:
            raise ValueError(f"must be one of {', '.join(options)}, got {text!r}")
        return word

    parse.__name__ = "choice"
    return parse


def key_value(text: str) -> tuple[str, Any]:
    """`key=value`; the value is JSON when it parses as JSON (numbers, booleans, lists)."""
    key, sep, raw = str(text).partition("=")
    if not sep or not key.strip():
        raise ValueError(f"expected key=value, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


@dataclass(frozen=True)
class Setting:
    name: str
    help: str
    default: Any = None
    parse: Parse = str
    #: The command-line flag, for settings a command line takes.
    flag: str | None = None
    #: Environment variables it is read from, the first one set wins.
    env: tuple[str, ...] = ()
    metavar: str | None = None
    #: The default as documented, when its repr is not what a reader wants.
    shown: str | None = None
    #: A bool flag as --x / --no-x.
    negatable: bool = False
    #: The flag may be given several times (and the environment lists values split by spaces).
    repeated: bool = False
    #: Never shown in --help defaults or docs (a password).
    secret: bool = False
    #: Settings of the same group exclude each other on the command line.
    exclusive: str | None = None

    def read(self, raw: str, source: str) -> Any:
        try:
            if self.repeated:
                return [self.parse(item) for item in raw.split()]
            return self.parse(raw)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise SettingError(f"{source}: {exc}") from None

    @property
    def default_text(self) -> str:
        if self.shown is not None:
            return self.shown
        if self.default is None or self.default == () or self.default == []:
            return "none"
        if isinstance(self.default, bool):
            return "on" if self.default else "off"
        if isinstance(self.default, tuple):
            return ",".join(str(d) for d in self.default)
        return str(self.default)


@dataclass(frozen=True)
class SettingTable:
    settings: tuple[Setting, ...]

    def __iter__(self) -> Iterator[Setting]:
        return iter(self.settings)

    def __getitem__(self, name: str) -> Setting:
        for setting in self.settings:
            if setting.name == name:
                return setting
        raise KeyError(name)

    def from_environ(self, environ: Mapping[str, str]) -> dict[str, Any]:
        """{name: value} for every setting one of whose variables is set (and not empty)."""
        values: dict[str, Any] = {}
        for setting in self.settings:
            for variable in setting.env:
                raw = environ.get(variable)
                if raw:
                    values[setting.name] = setting.read(raw, f"{variable}={raw!r}")
                    break
        return values

    def add_arguments(
        self, parser: argparse.ArgumentParser, environ: Mapping[str, str], **defaults: Any
    ) -> None:
        """A flag for every setting that has one; its default comes from the environment,
        else `defaults`, else the table. A bad environment value is a usage error."""
        try:
            from_env = self.from_environ(environ)
        except SettingError as exc:
            parser.error(f"environment variable {exc}")
        groups: dict[str, Any] = {}
        for setting in self.settings:
            if setting.flag is None:
                continue
            target: Any = parser
            if setting.exclusive is not None:
                if setting.exclusive not in groups:
                    groups[setting.exclusive] = parser.add_mutually_exclusive_group()
                target = groups[setting.exclusive]
            default = from_env.get(setting.name, defaults.get(setting.name, setting.default))
            parts = []
            if setting.env:
                spaced = ", space separated" if setting.repeated else ""
                parts.append(f"env {' or '.join(setting.env)}{spaced}")
            if not setting.secret:
                parts.append(f"default {setting.default_text}")
            note = f" [{'; '.join(parts)}]" if parts else ""

            def parse(text: str, setting: Setting = setting) -> Any:
                try:
                    return setting.parse(text)
                except ValueError as exc:
                    raise argparse.ArgumentTypeError(str(exc)) from None

            parse.__name__ = getattr(setting.parse, "__name__", "value")
            if setting.negatable:
                target.add_argument(
                    setting.flag,
                    dest=setting.name,
                    action=argparse.BooleanOptionalAction,
                    default=default,
                    help=setting.help + note,
                )
            elif setting.parse is parse_bool and setting.default is False and not setting.env:
                target.add_argument(
                    setting.flag, dest=setting.name, action="store_true", help=setting.help + note
                )
            elif setting.repeated:
                target.add_argument(
                    setting.flag,
                    dest=setting.name,
                    action="append",
                    type=parse,
                    default=list(default or []),
                    metavar=setting.metavar,
                    help=setting.help + note,
                )
            else:
                target.add_argument(
                    setting.flag,
                    dest=setting.name,
                    type=parse,
                    default=default,
                    metavar=setting.metavar,
                    help=setting.help + note,
                )

    def markdown(
        self, columns: tuple[str, ...] = ("flag", "environment", "default", "meaning")
    ) -> str:
        """The reference table for docs/. Columns: flag, name, environment, default, meaning."""
        rows = [
            "| " + " | ".join(columns) + " |",
            "|" + "---|" * len(columns),
        ]
        for setting in self.settings:
            if "flag" in columns and setting.flag is None:
                continue
            cells = {
                "flag": f"`{setting.flag}`"
                + (f" / `--no-{setting.flag[2:]}`" if setting.negatable and setting.flag else ""),
                "name": f"`{setting.name}`",
                "environment": ", ".join(f"`{v}`" for v in setting.env) or "—",
                "default": "—" if setting.secret else f"`{setting.default_text}`",
                "meaning": setting.help.replace("|", "\\|"),
            }
            rows.append("| " + " | ".join(cells[column] for column in columns) + " |")
        return "\n".join(rows) + "\n"
