"""
The Pusher app's secrets and the signatures made with them, as the Pusher
server libraries and client SDKs compute them:

- a private channel's ``auth``: ``<key>:<hex HMAC-SHA256 of "socket_id:channel">``;
  a presence channel's signs ``"socket_id:channel:channel_data"``;
- a user's sign-in: ``"socket_id::user::user_data"``;
- an HTTP API request: ``auth_signature`` is the HMAC-SHA256 of
  ``"METHOD\\n/path\\n<query without auth_signature, keys sorted, k=v joined with &>"``,
  with ``body_md5`` in the query for a request with a body, and
  ``auth_timestamp`` within :data:`API_WINDOW` seconds of now.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass

#: seconds an API request's auth_timestamp may be away from now
API_WINDOW = 600.0
#: what Pusher allows in a channel name, and how long it may be
CHANNEL_NAME = re.compile(r"[-a-zA-Z0-9_=@,.;]{1,164}")
#: the Pusher socket id: two integers
SOCKET_ID = re.compile(r"\d{1,20}\.\d{1,20}")


@dataclass(frozen=True)
class PusherApp:
    """One Pusher app: its id, its key (public, in the SDKs' config) and its secret."""

    app_id: str
    key: str
    secret: bytes

    def sign(self, text: str) -> str:
        return hmac.new(self.secret, text.encode("utf-8"), hashlib.sha256).hexdigest()

    def _auth_is(self, auth: object, text: str) -> bool:
        if not isinstance(auth, str):
            return False
        key, _, signature = auth.partition(":")
        return hmac.compare_digest(key, self.key) & hmac.compare_digest(signature, self.sign(text))

    def channel_auth_ok(self, socket_id: str, channel: str, auth: object, channel_data: str | None = None) -> bool:
        """Whether ``auth`` is the app's signature of this socket subscribing to ``channel``."""
        text = f"{socket_id}:{channel}" if channel_data is None else f"{socket_id}:{channel}:{channel_data}"
        return self._auth_is(auth, text)

    def user_auth_ok(self, socket_id: str, user_data: str, auth: object) -> bool:
        """Whether ``auth`` is the app's signature of this socket signing in as ``user_data``."""
        return self._auth_is(auth, f"{socket_id}::user::{user_data}")

    def check_request(self, method: str, path: str, query: Mapping[str, str], body: bytes, now: float) -> str | None:
        """What is wrong with an HTTP API request's signature (``None``: nothing)."""
        params = {k.lower(): v for k, v in query.items()}
        signature = params.pop("auth_signature", None)
        if params.get("auth_key") != self.key:
            return "unknown auth_key"
        if params.get("auth_version", "1.0") != "1.0":
            return "auth_version must be 1.0"
        try:
            stamp = float(params.get("auth_timestamp", ""))
        except ValueError:
            return "auth_timestamp missing"
        if abs(now - stamp) > API_WINDOW:
            return f"auth_timestamp more than {int(API_WINDOW)} s from the server's time"
        if body and params.get("body_md5") != hashlib.md5(body).hexdigest():  # noqa: S324 (Pusher's scheme)
            return "body_md5 does not match the body"
        text = "\n".join([method.upper(), path, "&".join(f"{k}={params[k]}" for k in sorted(params))])
        if not isinstance(signature, str) or not hmac.compare_digest(signature, self.sign(text)):
            return "invalid signature"
        return None
