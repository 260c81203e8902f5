"""
Signed, expiring tokens that name the channels a browser may read (JWT,
through PyJWT).

Backends mint them with :func:`make_token`; sockdrawer verifies them at the
WebSocket handshake with a :class:`TokenVerifier`.  This module imports no
Twisted, so a Django or Flask backend can mint tokens without it.

Claims:

``exp``
    required: the token expires then (an open socket is closed with 4001).
``sub``
    the user, handed to listeners as :attr:`sockdrawer.Source.user`.
``channels``
    a list of patterns: an exact channel (``"user/42"``), a prefix ending in
    ``/*`` (``"rooms/*"``: any channel below ``rooms/``, at any depth), or
    ``"*"`` alone (every channel).
``nbf``, ``iat``, ``aud``, ``iss``
    checked when present (``aud`` and ``iss`` against the configured
    audience and issuer).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import jwt

from sockdrawer.core.channels import ChannelNameError, validate_channel

#: Algorithms for a shared secret (``--auth-secret-file``).
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
#: RFC 7518 3.2: an HMAC key at least as long as the hash (HS256: 32 bytes)
MIN_SECRET_LENGTH = 32
_EC_CURVES = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


class TokenRefused(Exception):
    """
    A token that does not let its bearer in.

    :ivar status: the HTTP status for the handshake: 401 (no valid token) or
        403 (a valid token that does not cover the channel).
    :ivar reason: a short, fixed text, safe to send (never the token).
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


def pattern_matches(pattern: str, channel: str) -> bool:
    """Whether channel ``channel`` is covered by ``pattern`` (exact, ``prefix/*`` or ``*``)."""
    if pattern == "*":
        return True
    if pattern.endswith("/*"):
        return channel.startswith(pattern[:-1])
    return pattern == channel


def check_pattern(pattern: str) -> str:
    """
    :raises ValueError: for a pattern that is neither an exact channel, ``prefix/*`` nor ``*``.
    """
    if not isinstance(pattern, str):
        raise ValueError("a channel pattern must be a string")
    if pattern == "*":
        return pattern
    channel = pattern[:-2] if pattern.endswith("/*") else pattern
    try:
        validate_channel(channel)
    except ChannelNameError as e:
        raise ValueError(f"bad channel pattern {pattern!r}: {e}") from None
    if "*" in channel:
        raise ValueError(f"bad channel pattern {pattern!r}: '*' only alone or as a last '/*' segment")
    return pattern


@dataclass(frozen=True)
class Grant:
    """
    What a verified token allows.

    :ivar user: the ``sub`` claim, or ``None``.
    :ivar channels: the channel patterns.
    :ivar expires: the ``exp`` claim, in seconds since the epoch.
    """

    user: str | None
    channels: tuple[str, ...]
    expires: float

    def allows(self, channel: str) -> bool:
        """Whether the token covers ``channel``."""
        return any(pattern_matches(p, channel) for p in self.channels)


def make_token(secret: str | bytes, user: str | None = None, channels: Sequence[str] = (), ttl: float = 3600,
               *, algorithm: str = "HS256", audience: str | None = None, issuer: str | None = None,
               now: float | None = None, **claims: Any) -> str:
    """
    Mint a token for a browser.

    :param secret: the shared secret (the content of ``--auth-secret-file``),
        or a PEM private key for an ``RS*``/``ES*``/``EdDSA`` ``algorithm``.
    :param user: the ``sub`` claim.
    :param channels: the channel patterns the token covers.
    :param ttl: seconds until it expires.
    :raises ValueError: for a bad pattern or a ttl that is not positive.
    :return: the token, for ``ws://host/<channel>?token=...``.
    """
    if ttl <= 0:
        raise ValueError("ttl must be positive")
    issued = time.time() if now is None else now
    payload: dict[str, Any] = {"exp": int(issued + ttl), "iat": int(issued),
                               "channels": [check_pattern(p) for p in channels]}
    if user is not None:
        payload["sub"] = str(user)
    if audience is not None:
        payload["aud"] = audience
    if issuer is not None:
        payload["iss"] = issuer
    payload.update(claims)
    token: str = jwt.encode(payload, secret, algorithm=algorithm)
    return token


def _public_key_algorithms(key: Any) -> tuple[str, ...]:
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    if isinstance(key, rsa.RSAPublicKey):
        return ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _EC_CURVES.get(key.curve.name)
        if alg is None:
            raise ValueError(f"unsupported elliptic curve {key.curve.name}")
        return (alg,)
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return ("EdDSA",)
    raise ValueError(f"unsupported public key type {type(key).__name__}")


def load_public_key(pem: bytes) -> tuple[Any, tuple[str, ...]]:
    """
    A PEM public key and the JWT algorithms it verifies.

    :raises ValueError: for anything that is not an RSA, EC (P-256/384/521)
        or Ed25519/Ed448 public key.
    """
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(pem)
    except Exception as e:
        raise ValueError(f"not a PEM public key: {e}") from None
    return key, _public_key_algorithms(key)


class TokenVerifier:
    """
    Verifies tokens against the configured keys.  The algorithms accepted
    are exactly those the keys allow (never ``none``).

    :param secrets: shared secrets (HMAC: HS256/384/512).
    :param public_keys: PEM public keys (RS*, PS*, ES*, EdDSA).
    :param audience: when set, ``aud`` must contain it.  When not set, a
        token that names an audience is refused (it was minted for a
        different service).
    :param issuer: when set, ``iss`` must be it.
    :param leeway: seconds of clock skew allowed on ``exp``, ``nbf``, ``iat``.
    :raises ValueError: without any key, or for a bad key.
    """

    def __init__(self, secrets: Iterable[bytes] = (), public_keys: Iterable[bytes] = (),
                 audience: str | None = None, issuer: str | None = None, leeway: float = 30.0) -> None:
        self._keys: list[tuple[Any, tuple[str, ...]]] = []
        for secret in secrets:
            if len(secret) < MIN_SECRET_LENGTH:
                raise ValueError(f"a token secret must be at least {MIN_SECRET_LENGTH} bytes long")
            self._keys.append((secret, HMAC_ALGORITHMS))
        for pem in public_keys:
            self._keys.append(load_public_key(pem))
        if not self._keys:
            raise ValueError("a TokenVerifier needs at least one secret or public key")
        self.algorithms = tuple(sorted({alg for _, algs in self._keys for alg in algs}))
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway

    def verify(self, token: str | None) -> Grant:
        """
        :raises TokenRefused: 401 with a fixed reason for a missing, malformed,
            forged, expired or not yet valid token, a wrong audience or issuer,
            or an algorithm the keys do not allow.
        :return: what the token allows.
        """
        if not token:
            raise TokenRefused(401, "missing token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRefused(401, "malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise TokenRefused(401, "algorithm not allowed")
        options: Any = {"require": ["exp"]}
        claims: dict[str, Any] | None = None
        last: Exception | None = None
        for key, algorithms in self._keys:
            if alg not in algorithms:
                continue
            try:
                claims = jwt.decode(token, key, algorithms=[alg], audience=self.audience, issuer=self.issuer,
                                    leeway=self.leeway, options=options)
                break
            except jwt.InvalidSignatureError as e:
                last = e  # maybe another key of the same kind
            except jwt.ExpiredSignatureError:
                raise TokenRefused(401, "token expired") from None
            except jwt.ImmatureSignatureError:
                raise TokenRefused(401, "token not yet valid") from None
            except jwt.InvalidAudienceError:
                raise TokenRefused(401, "wrong audience") from None
            except jwt.InvalidIssuerError:
                raise TokenRefused(401, "wrong issuer") from None
            except jwt.MissingRequiredClaimError:
                raise TokenRefused(401, "token has no expiry") from None
            except (jwt.PyJWTError, ValueError, TypeError):
                raise TokenRefused(401, "malformed token") from None
        if claims is None:
            raise TokenRefused(401, "bad signature") from last
        channels = claims.get("channels", [])
        if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
            raise TokenRefused(401, "malformed token")
        user = claims.get("sub")
        exp = claims["exp"]
        if not isinstance(exp, (int, float)) or isinstance(exp, bool):
            raise TokenRefused(401, "malformed token")
        try:
            expires = float(exp)
        except OverflowError:
            raise TokenRefused(401, "malformed token") from None
        return Grant(user if isinstance(user, str) else None, tuple(channels), expires)
