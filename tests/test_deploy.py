"""
The deployment snippets of docs/operations.rst (docs/deploy/), each checked
by the tool that runs it: systemd-analyze for the unit, nginx -t, caddy
validate, the kernel for the sysctl names, sockdrawer for the environment
file.  The tools come from Debian's packages (.ci/run installs them).
"""

from __future__ import annotations

import datetime
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from childnode import ROOT

from sockdrawer.config import Settings, from_environment

DEPLOY = Path(ROOT) / "docs" / "deploy"
HINT = "install it with 'apt-get install systemd nginx-light caddy'"


def tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if path is None:
        pytest.fail(f"{name} is missing: {HINT}", pytrace=False)
    return path


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit, with no warning, once ExecStart points at a real twistd."""
    twistd = Path(sys.executable).parent / "twistd"
    unit = (DEPLOY / "sockdrawer.service").read_text()
    assert "/opt/sockdrawer/bin/twistd" in unit and "EnvironmentFile=" in unit and "LimitNOFILE=" in unit
    assert "Restart=" in unit
    local = tmp_path / "sockdrawer.service"
    local.write_text(unit.replace("/opt/sockdrawer/bin/twistd", str(twistd))
                     .replace("User=sockdrawer", "User=root").replace("Group=sockdrawer", "Group=root"))
    result = subprocess.run([tool("systemd-analyze"), "verify", str(local)], capture_output=True, text=True,
                            timeout=60, env={"SYSTEMD_LOG_LEVEL": "warning", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "events.example.com")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_nginx_snippet_passes_nginx_t(tmp_path: Path) -> None:
    """`nginx -t` accepts the reverse-proxy snippet (inside a minimal main config, with a test certificate), and
    it forwards the WebSocket upgrade."""
    cert, key = _self_signed(tmp_path)
    snippet = (DEPLOY / "nginx.conf").read_text()
    assert "proxy_set_header Upgrade $http_upgrade" in snippet and "proxy_http_version 1.1" in snippet
    local = tmp_path / "sockdrawer.conf"
    local.write_text(snippet.replace("/etc/ssl/certs/events.example.com.pem", str(cert))
                     .replace("/etc/ssl/private/events.example.com.key", str(key)))
    main = tmp_path / "nginx.conf"
    main.write_text(f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
                    f"http {{ access_log off; client_body_temp_path {tmp_path}; proxy_temp_path {tmp_path}; "
                    f"fastcgi_temp_path {tmp_path}; uwsgi_temp_path {tmp_path}; scgi_temp_path {tmp_path}; "
                    f"include {local}; }}\n")
    result = subprocess.run([tool("nginx"), "-t", "-q", "-p", str(tmp_path), "-c", str(main)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_caddyfile_validates() -> None:
    """`caddy validate` accepts the Caddyfile."""
    result = subprocess.run([tool("caddy"), "validate", "--config", str(DEPLOY / "Caddyfile"), "--adapter",
                             "caddyfile"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "Valid configuration" in result.stdout + result.stderr, result.stderr


def test_sysctl_names_exist() -> None:
    """Every setting of the sysctl file names a real kernel parameter."""
    for line in (DEPLOY / "sysctl.conf").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name = line.split("=", 1)[0].strip()
            assert Path("/proc/sys", *name.split(".")).exists(), name


def test_environment_file_is_valid_settings(monkeypatch: Any) -> None:
    """The example environment file sets real options with valid values (secret long enough included)."""
    env = {}
    for line in (DEPLOY / "sockdrawer.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name] = value
    values = from_environment(env)
    assert len(values) == len(env), set(env) - {f"SOCKDRAWER_{k.upper()}" for k in values}
    settings = Settings(**values).validate()
    assert settings.auth_enabled and settings.redis
