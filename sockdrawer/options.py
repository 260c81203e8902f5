"""
How an option is declared (:func:`option`, one dataclass field) and what the
table knows of each (:class:`OptionSpec`: its kind, bounds, names in every
source, and how to parse and check a value).  :mod:`sockdrawer.config`
declares the options.  Imports only the standard library.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

#: environment variable prefix: ``SOCKDRAWER_MAX_CONNECTIONS``
ENV_PREFIX = "SOCKDRAWER_"


def option(default: Any, help: str, *, part: str, low: float | None = None, high: float | None = None,
           above: float | None = None, cli: str | None = None, short: str | None = None,
           secret: bool = False, metavar: str | None = None, command_line: bool = True) -> Any:
    """
    Declare one option (a :class:`Settings` field).

    :param default: the built-in default (finite, safe).
    :param help: one line for ``--help`` and the docs.
    :param part: the part that consumes it.
    :param low: the smallest value allowed (numbers).
    :param high: the largest value allowed (numbers).
    :param above: values must be strictly greater than this (numbers).
    :param cli: the command-line name when it is not the field name with
        ``-`` (``listener`` for ``listeners``); also the config key and the
        environment name.
    :param short: a one-letter command-line alias.
    :param secret: masked by ``--print-config``.
    :param command_line: ``False`` for secrets that must not be given on a
        command line (every user of the machine can read those): only the
        environment and the config file set them.
    """
    return dataclasses.field(default=default, metadata={
        "help": help, "part": part, "low": low, "high": high, "above": above, "cli": cli,
        "short": short, "secret": secret, "metavar": metavar, "command_line": command_line,
    })


@dataclass(frozen=True)
class OptionSpec:
    """One option, as declared on :class:`Settings`."""

    field: str
    kind: str  # "int", "float", "bool", "str", "endpoint", "list"
    optional: bool
    default: Any
    help: str
    part: str
    low: float | None
    high: float | None
    above: float | None
    cli: str
    short: str | None
    secret: bool
    command_line: bool

    @property
    def env(self) -> str:
        """The environment variable: ``SOCKDRAWER_MAX_CONNECTIONS``."""
        return ENV_PREFIX + self.cli.upper().replace("-", "_")

    @property
    def repeatable(self) -> bool:
        return self.kind == "list"

    def describe_default(self) -> str:
        """The default as the docs and ``--help`` show it."""
        if self.default is None:
            return "none"
        if self.kind == "bool":
            return "on" if self.default else "off"
        if self.kind == "list":
            return ", ".join(map(str, self.default)) or "none"
        return str(self.default)

    def check(self, value: Any) -> None:
        """Check the type and bounds of ``value``.  :raises ValueError: naming the option."""
        name = "--" + self.cli
        if value is None:
            if self.optional:
                return
            raise ValueError(f"{name} must be set")
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false")
        elif self.kind in ("int", "float"):
            numeric = (int,) if self.kind == "int" else (int, float)
            if not isinstance(value, numeric) or isinstance(value, bool) or (
                    isinstance(value, float) and not math.isfinite(value)):
                raise ValueError(f"{name} must be {self._range_text()}")
            if ((self.low is not None and value < self.low) or (self.high is not None and value > self.high)
                    or (self.above is not None and value <= self.above)):
                raise ValueError(f"{name} must be {self._range_text()}")
        elif self.kind == "endpoint":
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise ValueError(f"{name} must be an endpoint string or a port number")
        elif self.kind == "str":
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a string")
        elif self.kind == "list":
            if not isinstance(value, (tuple, list)):
                raise ValueError(f"{self.field} must be a tuple (of strings), not {type(value).__name__}")

    def _range_text(self) -> str:
        if self.kind == "int":
            text = "an integer"
            if self.low is not None:
                text += f" >= {self.low:g}"
            return text
        if self.above is not None:
            return f"a number of seconds above {self.above:g}, at most {self.high:g}"
        return f"a number of seconds from {self.low:g} to {self.high:g}"

    def parse(self, raw: str) -> Any:
        """
        A value from text (command line, environment).

        :raises ValueError: with a message that does not name the source.
        """
        if self.kind == "int":
            try:
                return int(raw.strip().replace("_", ""))
            except ValueError:
                raise ValueError(f"must be an integer, not {raw!r}") from None
        if self.kind == "float":
            try:
                return float(raw)
            except ValueError:
                raise ValueError(f"must be a number, not {raw!r}") from None
        if self.kind == "bool":
            text = raw.strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(f"must be true or false, not {raw!r}")
        if self.kind == "list":
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if self.optional and raw.strip().lower() == "none" and self.field != "api":
            return None
        return raw


def _kind(annotation: Any) -> tuple[str, bool]:
    args = typing.get_args(annotation)
    optional = type(None) in args
    concrete = {a for a in args if a is not type(None)} or {annotation}
    if typing.get_origin(annotation) is tuple or any(typing.get_origin(a) is tuple for a in concrete):
        return "list", optional
    if concrete == {str, int}:
        return "endpoint", optional
    (only,) = concrete
    return {int: "int", float: "float", bool: "bool", str: "str"}[only], optional


def build_table(cls: type) -> tuple[OptionSpec, ...]:
    """The options a dataclass declares with :func:`option`, in declaration order."""
    hints = typing.get_type_hints(cls)
    table = []
    for f in dataclasses.fields(cls):
        kind, optional = _kind(hints[f.name])
        m = f.metadata
        table.append(OptionSpec(
            field=f.name, kind=kind, optional=optional, default=f.default, help=m["help"], part=m["part"],
            low=m["low"], high=m["high"], above=m["above"], cli=m["cli"] or f.name.replace("_", "-"),
            short=m["short"], secret=m["secret"], command_line=m["command_line"],
        ))
    return tuple(table)


_BACKLOG_TYPES = ("tcp", "tcp6", "ssl", "unix")


def endpoint_string(value: str | int, backlog: int | None = None) -> str:
    """
    Turn a bare port number into a ``tcp:`` endpoint string, and give
    stream endpoints without an explicit ``backlog=`` the ``backlog``.
    """
    value = str(value).strip()
    if value.isdigit():
        value = f"tcp:{value}"
    kind = value.split(":", 1)[0].lower()
    if backlog and kind in _BACKLOG_TYPES and "backlog=" not in value:
        value = f"{value}:backlog={backlog}"
    return value
