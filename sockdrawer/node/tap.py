"""
``twistd sockdrawer``: command-line options -> :class:`Settings` -> service.

The options are generated from the option table in :mod:`sockdrawer.config`.
Precedence: built-in defaults, then ``--config FILE`` (or
``$SOCKDRAWER_CONFIG``), then ``SOCKDRAWER_<NAME>`` environment variables,
then the command line.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from sockdrawer.config import (
    ENV_PREFIX,
    OPTIONS,
    OptionSpec,
    Settings,
    describe,
    from_environment,
    load_config_file,
    parse_value,
    unknown_environment,
)

CONFIG_ENV = ENV_PREFIX + "CONFIG"


def _help(spec: OptionSpec) -> str:
    if spec.repeatable or spec.default is None:
        return spec.help
    return f"{spec.help} [default: {spec.describe_default()}] (${spec.env})"


def _adder(spec: OptionSpec) -> Any:
    def add(self: Options, value: str) -> None:
        self._repeated.setdefault(spec.field, []).append(value)

    add.__doc__ = f"{spec.help} (${spec.env}, comma-separated)"
    return add


class Options(usage.Options):
    """Options of ``twistd sockdrawer``."""

    synopsis = "[options]"
    longdesc = (
        "Pushes messages published on Redis channel <name>/<channel> to every WebSocket "
        "connected to ws://host:port/<channel>, and passes frames from browsers to listener classes. "
        "Every option can also be set as an environment variable SOCKDRAWER_<OPTION> or in the --config file; "
        "the command line wins over the environment, which wins over the file."
    )
    optParameters = [
        [spec.cli, spec.short, None, _help(spec)]
        for spec in OPTIONS if spec.kind != "bool" and not spec.repeatable and spec.command_line
    ] + [["config", "c", None, f"TOML config file with the same option names (${CONFIG_ENV})"]]
    optFlags = [[spec.cli, spec.short, _help(spec)] for spec in OPTIONS if spec.kind == "bool"] + [
        ["print-config", None, "print the effective settings (secrets masked) and where each came from, then exit"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self._repeated: dict[str, list[str]] = {}
        self.environ: dict[str, str] = dict(os.environ)
        #: the arguments as given (``--workers`` passes them on to each worker)
        self.argv: list[str] = []

    def parseOptions(self, options: list[str] | None = None) -> None:
        self.argv = list(sys.argv[1:] if options is None else options)
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if getattr(self, "parent", None) is None:
                raise  # parsed by a program, not by twistd: it reports the error
            # under twistd: one line (twistd would print the whole usage first), and exit 2 as usage errors do
            print(f"twistd sockdrawer: {str(e).splitlines()[0]}\n"
                  f"Run 'twistd sockdrawer --help' for the options.", file=sys.stderr)
            raise SystemExit(2) from None

    def opt_version(self) -> None:
        """Print sockdrawer's version and those of Twisted, Autobahn and txredisapi, then exit."""
        from importlib.metadata import version

        print(f"sockdrawer {version('sockdrawer')} (Twisted {version('twisted')}, Autobahn {version('autobahn')}, "
              f"txredisapi {version('txredisapi')}, Python {sys.version.split()[0]})")
        raise SystemExit(0)

    def postOptions(self) -> None:
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        config = self["config"] or self.environ.get(CONFIG_ENV)
        try:
            if config:
                from_file = load_config_file(config)
                values.update(from_file)
                sources.update(dict.fromkeys(from_file, f"config file {config}"))
            from_env = from_environment(self.environ)
            values.update(from_env)
            sources.update({name: spec_env(name) for name in from_env})
            for spec in OPTIONS:
                if not spec.command_line:
                    continue
                if spec.repeatable:
                    if spec.field in self._repeated:
                        values[spec.field] = tuple(self._repeated[spec.field])
                        sources[spec.field] = "command line"
                    continue
                raw = self[spec.cli]
                if spec.kind == "bool":
                    if raw:
                        values[spec.field] = True
                        sources[spec.field] = "command line"
                    continue
                if raw is None:
                    continue
                values[spec.field] = parse_value(spec, raw, "--" + spec.cli)
                sources[spec.field] = "command line"
            settings = Settings(**values).validate()
        except (TypeError, ValueError) as e:
            raise usage.UsageError(_from_source(str(e).splitlines()[0], sources)) from None
        for name in unknown_environment(self.environ):
            print(f"twistd sockdrawer: warning: {name} names no option (ignored); see --help",
                  file=sys.stderr)
        from sockdrawer.node.workers import check_workers

        try:
            check_workers(settings)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        _check_endpoint(_label("port", sources), settings.port)
        if settings.api_enabled:
            assert settings.api is not None
            _check_endpoint(_label("api", sources), settings.api)
        from sockdrawer.core.listeners import ListenerLoadError, load_listener_class

        loaded: list[Any] = []
        for spec_text in settings.listeners:
            try:
                loaded.append(load_listener_class(spec_text) if isinstance(spec_text, str) else spec_text)
            except ListenerLoadError as e:
                raise usage.UsageError(str(e)) from None
        self.settings = settings.replace(listeners=tuple(loaded))
        self.sources = sources
        parent = getattr(self, "parent", None)
        if settings.log_format == "json" and parent is not None and not parent.get("logger"):
            # twistd resolves its --logger and starts logging after all
            # options are parsed
            parent["logger"] = "sockdrawer.logs.json_stdout"
        if self["print-config"]:
            for line in describe(self.settings, sources):
                print(line)
            sys.stdout.flush()
            raise SystemExit(0)


# one repeatable option method per repeatable option of the table
for _spec in OPTIONS:
    if _spec.repeatable:
        _add = _adder(_spec)
        setattr(Options, "opt_" + _spec.cli.replace("-", "_"), _add)
        if _spec.short:
            setattr(Options, "opt_" + _spec.short, _add)  # the same method: --help lists it as an alias


def _label(field: str, sources: dict[str, str]) -> str:
    """How an error names the option in ``field``: as it was given (an environment variable, a config file key,
    or the command-line option)."""
    spec = next(spec for spec in OPTIONS if spec.field == field)
    source = sources.get(field, "command line")
    if source.startswith(ENV_PREFIX):
        return source
    if source.startswith("config file "):
        return f"{source}: {spec.cli}"
    return "--" + spec.cli


def _from_source(message: str, sources: dict[str, str]) -> str:
    """A validation error that names an option (``--port ...``) named as it was given instead."""
    for spec in OPTIONS:
        own = "--" + spec.cli
        if message.startswith(own) and message[len(own):len(own) + 1] in (":", " ", ""):
            return _label(spec.field, sources) + message[len(own):]
    return message


def spec_env(field: str) -> str:
    """The environment variable of the option stored in ``field``."""
    return next(spec.env for spec in OPTIONS if spec.field == field)


def _check_endpoint(option: str, description: str | int) -> None:
    from twisted.internet import reactor

    from sockdrawer.node.service import check_endpoint

    try:
        check_endpoint(option, description, reactor)
    except ValueError as e:
        raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> IService:
    """
    Build the service ``twistd`` runs: a node; with ``--workers`` above 1,
    the supervisor of that many nodes (:mod:`sockdrawer.workers`), or one of
    those nodes when the supervisor started this process.
    """
    from sockdrawer.node.service import SockDrawerService
    from sockdrawer.node.workers import WorkerSupervisor, make_worker, worker_index

    settings = options.settings
    service: SockDrawerService
    if settings.workers > 1 and worker_index(options.environ) is None:
        parent = getattr(options, "parent", None)  # twistd's own options
        supervisor = WorkerSupervisor(settings, options.argv, options.environ,
                                      reactor_name=parent.get("reactor") if parent is not None else None)
        supervisor.exit_on_failure = True
        return supervisor
    if worker_index(options.environ) is not None:
        service = make_worker(settings, options.environ)
    else:
        service = SockDrawerService(settings)
    for listener in (service.websocket, service.api):
        if listener is not None:
            listener.exit_on_failure = True
    return service
