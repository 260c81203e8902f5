"""
Private channels against a real ``twistd sockdrawer`` child process: tokens
minted with PyJWT itself (not only with sockdrawer's helper), clients from
the ``websockets`` library with their defaults.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from childnode import ChildNode
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from sockdrawer import make_token
from sockdrawer.core.tokens import TokenRefused, TokenVerifier, pattern_matches

SECRET = "s3cret-s3cret-s3cret-s3cret-s3cret!"  # 35 bytes


def token(channels: list[str], ttl: float = 60, key: str = SECRET, algorithm: str = "HS256", **claims: Any) -> str:
    now = int(time.time())
    payload = {"exp": now + ttl, "iat": now, "channels": channels, **claims}
    return jwt.encode(payload, key, algorithm=algorithm)


@pytest.fixture(scope="module")
def node(tmp_path_factory: Any) -> Iterator[ChildNode]:
    """One node with a token secret from the environment, public channels below public/, and the Guard listener."""
    workdir = tmp_path_factory.mktemp("auth")
    child = ChildNode(workdir, ["--public-channel", "public/*", "--auth-leeway", "0", "--listener",
                                "listeners:Guard"], env={"SOCKDRAWER_AUTH_SECRET": SECRET})
    child.start()
    try:
        yield child
    finally:
        child.stop()
        text = child.log_text()
        assert "Traceback" not in text, text


def refused(url: str, **kwargs: Any) -> tuple[int, bytes]:
    with pytest.raises(InvalidStatus) as e:
        connect(url, open_timeout=5, **kwargs).close()
    return e.value.response.status_code, e.value.response.body or b""


def test_refusals_at_the_handshake(node: ChildNode) -> None:
    """No token, an expired, forged, 'alg: none', malformed or audience-bound token get 401, a token for another
    channel 403, each at once and with a fixed reason."""
    none_token = jwt.encode({"exp": int(time.time()) + 60, "channels": ["*"]}, None, algorithm="none")
    cases = [
        (None, 401),
        (token(["user/42"], ttl=-10), 401),
        (token(["user/42"], key="another-secret-another-secret-xx"), 401),
        (none_token, 401),
        ("not.a.token", 401),
        (token(["user/42"], aud="elsewhere"), 401),
        (token(["user/43"]), 403),
        (token(["user/*"]) + "x", 401),  # tampered signature
    ]
    for tok, status in cases:
        url = node.url("/user/42") + (f"?token={tok}" if tok else "")
        started = time.monotonic()
        got, _ = refused(url)
        assert got == status, (tok, got)
        assert time.monotonic() - started < 2
    log = node.log_text()
    for tok, _ in cases:
        if tok:
            assert tok not in log, "a token was logged"


def test_valid_token_reads_exactly_its_channels(node: ChildNode) -> None:
    """A token for user/42 and rooms/* reads those channels (query string or Authorization header), and is refused
    on user/43 and on rooms itself."""
    tok = token(["user/42", "rooms/*"], sub="u42")
    with connect(node.url(f"/user/42?token={tok}"), open_timeout=5) as ws, \
            connect(node.url("/rooms/a/b"), additional_headers={"Authorization": f"Bearer {tok}"}) as ws2:
        node.wait_sockets(2)
        node.publish("user/42", "for 42")
        node.publish("rooms/a/b", "for the room")
        assert ws.recv(timeout=5) == "for 42"
        assert ws2.recv(timeout=5) == "for the room"
    for path in ("/user/43", "/rooms"):
        assert refused(node.url(f"{path}?token={tok}"))[0] == 403
    assert tok not in node.log_text()


def test_public_channels_need_no_token(node: ChildNode) -> None:
    """Channels matched by --public-channel open without a token."""
    with connect(node.url("/public/news"), open_timeout=5) as ws:
        node.wait_sockets(1)
        node.publish("public/news", "hello")
        assert ws.recv(timeout=5) == "hello"


def test_listener_veto_and_user(node: ChildNode) -> None:
    """A listener's authorize() refusing is a 403; otherwise handlers see the token's user in source.user."""
    assert refused(node.url(f"/guarded?token={token(['guarded'], sub='mallory')}"))[0] == 403
    with connect(node.url(f"/guarded?token={token(['guarded'], sub='alice')}"), open_timeout=5) as ws:
        ws.send("who?")
        assert ws.recv(timeout=5) == "you are alice"


def test_open_socket_closed_with_4001_at_expiry(node: ChildNode) -> None:
    """A socket whose token expires while it is open is closed with 4001 'token expired' (leeway 0 here)."""
    with connect(node.url(f"/user/7?token={token(['user/7'], ttl=2)}"), open_timeout=5) as ws:
        started = time.monotonic()
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=10)
        assert e.value.rcvd is not None
        assert (e.value.rcvd.code, e.value.rcvd.reason) == (4001, "token expired")
        assert time.monotonic() - started < 4


def test_sockdrawer_helper_tokens_verify() -> None:
    """Tokens from make_token verify with the same secret, carry user and channels, and refuse a short secret."""
    tok = make_token(SECRET, user="u1", channels=["news", "rooms/*"], ttl=60)
    grant = TokenVerifier([SECRET.encode()]).verify(tok)
    assert grant.user == "u1" and grant.allows("news") and grant.allows("rooms/1/2") and not grant.allows("rooms")
    with pytest.raises(TokenRefused) as e:
        TokenVerifier([b"x" * 32]).verify(tok)
    assert (e.value.status, e.value.reason) == (401, "bad signature")
    with pytest.raises(ValueError, match="at least 32 bytes"):
        TokenVerifier([b"short"])
    with pytest.raises(ValueError, match="bad channel pattern"):
        make_token(SECRET, channels=["a/*/b"])


def test_public_key_tokens() -> None:
    """With a public key configured, tokens signed by its private key verify; HMAC tokens made with the public
    key's text as secret (the classic algorithm confusion) are refused."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    for private in (ec.generate_private_key(ec.SECP256R1()), ed25519.Ed25519PrivateKey.generate()):
        pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        verifier = TokenVerifier(public_keys=[pem])
        alg = "ES256" if isinstance(private, ec.EllipticCurvePrivateKey) else "EdDSA"
        assert verifier.algorithms == (alg,)
        good = jwt.encode({"exp": int(time.time()) + 60, "channels": ["a"]}, private, algorithm=alg)
        assert verifier.verify(good).allows("a")
        with pytest.raises(TokenRefused, match="algorithm not allowed"):
            verifier.verify(jwt.encode({"exp": int(time.time()) + 60, "channels": ["a"]}, "k" * 32,
                                       algorithm="HS256"))


def test_patterns() -> None:
    """'*' covers everything, 'p/*' every channel below p at any depth (not p), anything else itself only."""
    assert pattern_matches("*", "") and pattern_matches("*", "a/b")
    assert pattern_matches("a/*", "a/b") and pattern_matches("a/*", "a/b/c")
    assert not pattern_matches("a/*", "a") and not pattern_matches("a/*", "ab/c")
    assert pattern_matches("a", "a") and not pattern_matches("a", "a/b")


def test_token_command() -> None:
    """`python -m sockdrawer token` prints a token that verifies, and refuses to run without a secret."""
    import os

    env = {**os.environ, "SOCKDRAWER_AUTH_SECRET": SECRET}
    out = subprocess.run([sys.executable, "-m", "sockdrawer", "token", "--channel", "news", "--user", "u",
                          "--ttl", "60"], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    grant = TokenVerifier([SECRET.encode()]).verify(out.stdout.strip())
    assert grant.user == "u" and grant.channels == ("news",)
    env.pop("SOCKDRAWER_AUTH_SECRET")
    out = subprocess.run([sys.executable, "-m", "sockdrawer", "token", "--channel", "news"],
                         capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 2 and "SOCKDRAWER_AUTH_SECRET" in out.stderr


def test_secret_is_not_a_command_line_option() -> None:
    """The token secret itself cannot be given on the command line (only its file, or the environment)."""
    from twisted.python.usage import UsageError

    from sockdrawer.node.tap import Options

    with pytest.raises(UsageError):
        Options().parseOptions(["--auth-secret", SECRET])


def test_a_v1_socket_refreshes_its_token_in_band(node: ChildNode) -> None:
    """A sockdrawer.v1 socket sends {"op": "refresh"} with a fresh token for the same user before its token
    expires: answered "refreshed" with the new expiry, it stays open past the old one and keeps receiving; a
    token for another user is refused with an error and changes nothing."""
    old = make_token(SECRET, user="u7", channels=["user/7"], ttl=2)
    with connect(node.url(f"/?token={old}"), subprotocols=["sockdrawer.v1"], open_timeout=5) as ws:
        ws.send('{"op": "subscribe", "channel": "user/7"}')
        assert '"subscribed"' in str(ws.recv(timeout=5))
        other = make_token(SECRET, user="u8", channels=["user/7"], ttl=60)
        ws.send(f'{{"op": "refresh", "token": "{other}"}}')
        assert '"the token is for another user"' in str(ws.recv(timeout=5))
        fresh = make_token(SECRET, user="u7", channels=["user/7"], ttl=60)
        ws.send(f'{{"op": "refresh", "token": "{fresh}"}}')
        refreshed = str(ws.recv(timeout=5))
        assert '"op":"refreshed"' in refreshed.replace(" ", "")
        deadline = time.monotonic() + 3  # past the old token's expiry (2 s, leeway 0)
        while time.monotonic() < deadline:
            node.publish("user/7", "tick")
            assert '"tick"' in str(ws.recv(timeout=5))
            time.sleep(0.2)
