"""WebSockets over TLS (an ssl: endpoint): frames must go through the TLS layer."""

from __future__ import annotations

import datetime
from typing import Any

import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor, ssl
from twisted.internet.endpoints import SSL4ClientEndpoint
from wsclient import WSClient, _Factory


def self_signed(tmp_path: Any) -> tuple[str, str, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = tmp_path / "key.pem", tmp_path / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path.write_bytes(cert_pem)
    return str(key_path), str(cert_path), cert_pem


@pytest_twisted.ensureDeferred
async def test_tls_endpoint_delivers_through_tls(run_service: Any, tmp_path: Any) -> None:
    """On an ssl: endpoint, a verified TLS client gets published messages intact (no plaintext shortcut)."""
    key, cert, cert_pem = self_signed(tmp_path)
    svc = await run_service(port=f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
    options = ssl.optionsForClientTLS("localhost", trustRoot=ssl.Certificate.loadPEM(cert_pem))
    client = WSClient(f"wss://localhost:{svc.ws_port}/secure")
    await SSL4ClientEndpoint(reactor, "127.0.0.1", svc.ws_port, options).connect(_Factory(client))
    await client.opened
    for i in range(50):
        svc.hub.deliver(b"secure", b"m%d" % i)
    got = [await client.next_text() for _ in range(50)]
    assert got == [f"m{i}" for i in range(50)]
    await svc.publish("x" * 100_000, "secure")
    assert await client.next_text() == "x" * 100_000
