"""Unit tests for the command-line options and settings."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from typing import Any

import pytest
from twisted.python.usage import UsageError

from sockdrawer.config import Settings, load_config_file
from sockdrawer.node.tap import Options

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def parse(*argv: str) -> Settings:
    options = Options()
    options.parseOptions(list(argv))
    return options.settings


def test_defaults_are_safe_and_finite() -> None:
    """With no options: port 8020, embedded broker, loopback API, and every limit finite and nonzero."""
    s = parse()
    assert s.port == "tcp:8020"
    assert s.redis is None
    assert s.name == "sock-drawer"
    assert s.api == "tcp:8021:interface=127.0.0.1"
    assert s.max_message_size == 65536
    for name in ("max_publish_size", "max_channel_length", "max_handshake_size", "max_connections",
                 "open_handshake_timeout", "close_handshake_timeout", "auto_ping_interval",
                 "auto_ping_timeout", "send_buffer", "slow_timeout", "redis_timeout", "shutdown_timeout"):
        value = getattr(s, name)
        assert 0 < value < 10**9, name


def test_options_reach_settings() -> None:
    """Options land in their Settings fields: strings as given, numbers converted, repeatable options
    collected in order, listeners loaded as classes, and --api none turning the API off."""
    s = parse("--port", "9000", "--redis", "redis://h:1/2", "--name", "app", "--api", "none",
              "--max-message-size", "100", "--auto-ping-interval", "0", "--allowed-origin",
              "https://a.example:443", "--allowed-origin", "https://b.example:443",
              "--listener", "listeners:Echo", "-l", "listeners:Shout", "--api-key", "k")
    assert s.port == "9000" and s.redis == "redis://h:1/2" and s.name == "app"
    assert not s.api_enabled
    assert s.max_message_size == 100 and s.auto_ping_interval == 0
    assert s.allowed_origins == ("https://a.example:443", "https://b.example:443")
    assert [cls.__name__ for cls in s.listeners] == ["Echo", "Shout"]
    assert s.api_key == "k"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "nonsense:1"], "--port: bad endpoint"),
        (["--port", "tcp:notaport"], "--port: bad endpoint"),
        (["--api", "tcp:x"], "--api: bad endpoint"),
        (["--redis", "http://h"], "--redis: Redis URL must start with"),
        (["--max-message-size", "big"], "--max-message-size must be an integer"),
        (["--max-message-size", "0"], "--max-message-size must be an integer >= 1"),
        (["--auto-ping-interval", "-1"], "--auto-ping-interval must be a number"),
        (["--name", "a/b"], "--name: namespace must be"),
        (["--listener", "nomodule_xyz:Foo"], "cannot import listener module 'nomodule_xyz'"),
        (["--listener", "listeners:Missing"], "has no 'Missing'"),
        (["--listener", "listeners:NotAListener"], "not a subclass of sockdrawer.Subscriber"),
        (["--listener", "justamodule"], "must look like 'package.module:ClassName'"),
        (["--api-key", ""], "--api-key must not be empty"),
        (["--config", "/nonexistent/sd.toml"], "cannot read config file"),
    ],
)
def test_bad_values_are_one_line_usage_errors(argv: list[str], message: str) -> None:
    """A bad option value raises UsageError with a one-line message naming the problem."""
    with pytest.raises(UsageError) as e:
        parse(*argv)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_config_file_with_command_line_override(tmp_path: pytest.TempPathFactory) -> None:
    """Values come from --config, and the command line wins over the file."""
    path = tmp_path / "sd.toml"  # type: ignore[operator]
    path.write_text(
        '[sockdrawer]\nport = 9100\nname = "fromfile"\nmax-message-size = 1234\n'
        'listener = "listeners:Echo"\nallowed_origins = ["https://x.example:443"]\n'
    )
    s = parse("--config", str(path), "--name", "fromcli")
    assert s.port == "9100"
    assert s.name == "fromcli"
    assert s.max_message_size == 1234
    assert [c.__name__ for c in s.listeners] == ["Echo"]
    assert s.allowed_origins == ("https://x.example:443",)


def test_config_file_unknown_key(tmp_path: pytest.TempPathFactory) -> None:
    """An unknown key in the config file is a usage error naming the key."""
    path = tmp_path / "sd.toml"  # type: ignore[operator]
    path.write_text('prot = 1\n')
    with pytest.raises(ValueError, match="unknown option 'prot'"):
        load_config_file(str(path))


def test_settings_validate_rejects_bad_types() -> None:
    """Settings built in code are validated too (embedding gets the same checks as the CLI)."""
    with pytest.raises(ValueError, match="--send-buffer"):
        Settings(send_buffer=-5).validate()
    with pytest.raises(ValueError, match="--redis-timeout"):
        Settings(redis_timeout=0).validate()


def test_twistd_usage_error_is_not_a_traceback() -> None:
    """`twistd sockdrawer` with a bad value exits non-zero with a usage error line and no traceback."""
    result = subprocess.run(
        [*TWISTD, "-n", "--pidfile=", "sockdrawer",
         "--max-message-size", "huge"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    # one line and where to find --help: not the whole usage before it
    assert result.stderr.splitlines() == ["twistd sockdrawer: --max-message-size must be an integer, not 'huge'",
                                          "Run 'twistd sockdrawer --help' for the options."]
    assert result.stdout == ""


@pytest.mark.parametrize(("env", "config", "expected"), [
    ({"SOCKDRAWER_PORT": "x:1"}, None, "twistd sockdrawer: SOCKDRAWER_PORT: bad endpoint 'x:1'"),
    ({}, 'port = "x:1"\n', "twistd sockdrawer: config file {path}: port: bad endpoint 'x:1'"),
    ({"SOCKDRAWER_DRAIN_CLOSE_CODE": "1005"}, None,
     "twistd sockdrawer: SOCKDRAWER_DRAIN_CLOSE_CODE must be 1001 or 1012"),
])
def test_errors_name_where_the_value_came_from(tmp_path: Any, env: dict[str, str], config: str | None,
                                               expected: str) -> None:
    """An error about a value from the environment or a config file names the variable or the file and key
    it came from, not the command-line option."""
    args = []
    path = tmp_path / "sd.toml"
    if config is not None:
        path.write_text(config)
        args = ["--config", str(path)]
    result = subprocess.run([*TWISTD, "-n", "--pidfile=", "sockdrawer", *args], capture_output=True, text=True,
                            timeout=60, env={**os.environ, **env})
    assert result.returncode == 2
    assert result.stderr.splitlines()[0].startswith(expected.format(path=path)), result.stderr


def test_unknown_sockdrawer_variables_are_warned_about() -> None:
    """A SOCKDRAWER_* variable that names no option (a typo) is warned about on stderr, naming it."""
    result = subprocess.run([*TWISTD, "sockdrawer", "--print-config"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "SOCKDRAWER_MAX_CONECTIONS": "5", "SOCKDRAWER_URL": "http://x"})
    assert result.returncode == 0
    assert result.stderr.splitlines() == [
        "twistd sockdrawer: warning: SOCKDRAWER_MAX_CONECTIONS names no option (ignored); see --help"]


def test_version_names_sockdrawer_and_its_stack() -> None:
    """`twistd sockdrawer --version` prints sockdrawer's version and those of Twisted, Autobahn, txredisapi."""
    import sockdrawer

    result = subprocess.run([*TWISTD, "sockdrawer", "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.startswith(f"sockdrawer {sockdrawer.__version__} (Twisted ")
    assert "Autobahn " in result.stdout and "txredisapi " in result.stdout


def test_twistd_help_documents_every_option() -> None:
    """`twistd sockdrawer --help` lists every Settings field as an option."""
    result = subprocess.run(
        [*TWISTD, "sockdrawer", "--help"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0
    from dataclasses import fields

    for f in fields(Settings):
        option = {"listeners": "listener", "allowed_origins": "allowed-origin"}.get(f.name, f.name)
        assert "--" + option.replace("_", "-") in result.stdout, option


def test_endpoint_strings_get_port_and_backlog() -> None:
    """Bare ports become tcp: endpoints, and stream endpoints get the backlog unless they set one."""
    from sockdrawer.config import endpoint_string

    assert endpoint_string("8020") == "tcp:8020"
    assert endpoint_string("8020", 1024) == "tcp:8020:backlog=1024"
    assert endpoint_string("tcp:8020:interface=127.0.0.1", 64) == "tcp:8020:interface=127.0.0.1:backlog=64"
    assert endpoint_string("tcp:8020:backlog=10", 1024) == "tcp:8020:backlog=10"
    assert endpoint_string("unix:/run/sd.sock", 8) == "unix:/run/sd.sock:backlog=8"
    assert endpoint_string("systemd:domain=INET:index=0", 8) == "systemd:domain=INET:index=0"


def test_service_listens_with_backlog() -> None:
    """The WebSocket port listens with --backlog (default 1024), the API on loopback port 8021."""
    from twisted.internet.testing import MemoryReactorClock

    from sockdrawer.service import SockDrawerService

    reactor = MemoryReactorClock()
    svc = SockDrawerService(reactor=reactor)
    svc.startService()
    servers = {port: (backlog, interface) for port, _, backlog, interface in reactor.tcpServers}
    (ws_backlog, ws_interface), (_, api_interface) = servers[8020], servers[8021]
    ws_port, api_port = 8020, 8021
    assert (ws_port, ws_backlog, ws_interface) == (8020, 1024, "")
    assert (api_port, api_interface) == (8021, "127.0.0.1")
    svc.stopService()


# -- one table: environment, precedence, --print-config -------------------------


def parse_env(env: dict[str, str], *argv: str) -> Options:
    options = Options()
    options.environ = env
    options.parseOptions(list(argv))
    return options


def test_every_option_has_an_environment_variable() -> None:
    """Every option of the table can be set as SOCKDRAWER_<NAME>, and arrives typed in its Settings field."""
    from sockdrawer.config import OPTIONS

    samples = {"int": ("7", 7), "float": ("2.5", 2.5), "bool": ("true", True)}
    for spec in OPTIONS:
        if spec.kind not in samples:
            continue
        raw, value = samples[spec.kind]
        if spec.kind == "int" and spec.low is not None and spec.low > 7:
            raw, value = str(int(spec.low)), int(spec.low)
        # --workers above 1 needs a Redis URL
        env = {spec.env: raw, "SOCKDRAWER_REDIS": "redis://h:1/0"}
        settings = parse_env(env).settings
        assert getattr(settings, spec.field) == value, spec.env
    s = parse_env({"SOCKDRAWER_REDIS": "redis://h:1/0", "SOCKDRAWER_PORT": "9001", "SOCKDRAWER_NAME": "app",
                   "SOCKDRAWER_ALLOWED_ORIGIN": "https://a.example:443, https://b.example:443",
                   "SOCKDRAWER_LISTENER": "listeners:Echo", "SOCKDRAWER_API": "none",
                   "SOCKDRAWER_API_KEY": "k"}).settings
    assert (s.redis, s.port, s.name, s.api_enabled, s.api_key) == ("redis://h:1/0", "9001", "app", False, "k")
    assert s.allowed_origins == ("https://a.example:443", "https://b.example:443")
    assert [c.__name__ for c in s.listeners] == ["Echo"]


def test_precedence_defaults_file_environment_command_line(tmp_path: Any) -> None:
    """Defaults < config file < environment < command line, option by option."""
    path = tmp_path / "sd.toml"
    path.write_text('max-message-size = 1000\nmax-connections = 2000\nslow-timeout = 3\nname = "file"\n')
    env = {"SOCKDRAWER_CONFIG": str(path), "SOCKDRAWER_MAX_CONNECTIONS": "3000", "SOCKDRAWER_SLOW_TIMEOUT": "4",
           "SOCKDRAWER_NAME": "env"}
    options = parse_env(env, "--slow-timeout", "5")
    s = options.settings
    assert s.max_message_size == 1000  # file
    assert s.max_connections == 3000  # environment over file
    assert s.slow_timeout == 5.0  # command line over environment
    assert s.name == "env"
    assert s.send_buffer == Settings().send_buffer  # default
    assert options.sources["slow_timeout"] == "command line"
    assert options.sources["max_connections"] == "SOCKDRAWER_MAX_CONNECTIONS"
    assert options.sources["max_message_size"] == f"config file {path}"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SOCKDRAWER_MAX_CONNECTIONS": "lots"}, "SOCKDRAWER_MAX_CONNECTIONS must be an integer, not 'lots'"),
        ({"SOCKDRAWER_MAX_CONNECTIONS": "0"}, "SOCKDRAWER_MAX_CONNECTIONS must be an integer >= 1"),
        ({"SOCKDRAWER_COMPRESSION": "maybe"}, "SOCKDRAWER_COMPRESSION must be true or false"),
        ({"SOCKDRAWER_REDIS_TIMEOUT": "0"}, "SOCKDRAWER_REDIS_TIMEOUT must be a number of seconds above 0"),
    ],
)
def test_bad_environment_values_name_their_variable(env: dict[str, str], message: str) -> None:
    """A bad value from the environment is a one-line usage error that names the variable."""
    with pytest.raises(UsageError) as e:
        parse_env(env)
    assert message in str(e.value)


def test_bad_config_values_name_the_file_and_key(tmp_path: Any) -> None:
    """A value of the wrong type in the config file names the file and the key."""
    path = tmp_path / "sd.toml"
    path.write_text('max-connections = "many"\n')
    with pytest.raises(UsageError, match=f"config file {path}: max-connections must be an integer"):
        parse("--config", str(path))


def test_print_config_masks_secrets() -> None:
    """`twistd sockdrawer --print-config` prints every option with its source, masks secrets, and exits 0."""
    result = subprocess.run(
        [*TWISTD, "sockdrawer", "--print-config", "--redis", "redis://:hunter2@h:1/0", "--api-key", "s3cret"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "SOCKDRAWER_MAX_CONNECTIONS": "77"},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "hunter2" not in out and "s3cret" not in out
    assert "redis://:***@h:1/0  (command line)" in out
    assert re.search(r"^redis-cluster +none  \(default\)$", out, re.M)  # nothing set: nothing masked
    assert "api-key" in out and "***" in out
    assert re.search(r"^max-connections +77  \(SOCKDRAWER_MAX_CONNECTIONS\)$", out, re.M), out
    from sockdrawer.config import OPTIONS

    for spec in OPTIONS:
        assert spec.cli in out, spec.cli


def test_options_reference_is_generated_from_the_table() -> None:
    """The docs' option reference lists every option of the table with its environment variable and default."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "_ext",
                        "sockdrawer_options.py")
    spec = importlib.util.spec_from_file_location("sockdrawer_options", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = "\n".join(module.option_rows())
    from sockdrawer.config import OPTIONS

    for option in OPTIONS:
        assert f"--{option.cli}" in text and option.env in text
        if not option.repeatable:
            assert f"default ``{option.describe_default()}``" in text


def test_embedding_gets_the_command_lines_errors() -> None:
    """SockDrawerService raises ValueError at construction with the command line's one-line message, for bad
    endpoints and unknown keyword arguments too."""
    from twisted.internet.testing import MemoryReactorClock

    from sockdrawer.service import SockDrawerService

    for kwargs, message in (({"port": "tcp:nope"}, "--port: bad endpoint 'tcp:nope'"),
                            ({"api": "zz:1"}, "--api: bad endpoint 'zz:1'"),
                            ({"config": "x.toml"}, "unknown option 'config'"),
                            ({"max_message_size": 0}, "--max-message-size must be an integer >= 1")):
        with pytest.raises(ValueError) as e:
            SockDrawerService(reactor=MemoryReactorClock(), **kwargs)
        assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UsageError, match="--port: bad endpoint 'tcp:nope'"):
        parse("--port", "tcp:nope")


def test_a_port_in_use_is_one_line_of_ours_and_exit_status_1() -> None:
    """A WebSocket port already taken stops the node with exit status 1 and one sockdrawer line naming the
    endpoint and the reason, not a line of "stderr"."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([*TWISTD, "-n", "--pidfile=", "sockdrawer", "--api", "none", "--port",
                                 f"tcp:{port}:interface=127.0.0.1"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "cannot listen" in line]
    assert len(lines) == 1 and "[sockdrawer#error] cannot listen on tcp:" in lines[0], result.stdout
    assert "Address already in use" in lines[0] and "stderr" not in result.stdout
