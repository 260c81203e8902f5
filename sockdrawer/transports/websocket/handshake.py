"""
The opening handshake's own rules, before Autobahn parses anything: the token taken out of the
request (and redacted, even from a request line Autobahn will refuse), repeated extension headers
merged, the client address of a peer string.
"""

from __future__ import annotations

import re
from urllib.parse import unquote


def _address(peer: str | None) -> str | None:
    """The client address in an Autobahn peer string (``tcp4:1.2.3.4:5678``, or a bare address)."""
    if not peer:
        return None
    if peer.startswith(("tcp4:", "tcp6:")):
        return peer[5:].rsplit(":", 1)[0]
    return peer


def merge_extension_headers(head: bytes) -> bytes:
    """
    Join repeated ``Sec-WebSocket-Extensions`` lines into one (RFC 6455 9.1
    allows several; Autobahn refuses the handshake when it sees more than
    one).
    """
    end = head.index(b"\r\n\r\n")
    lines = head[:end].split(b"\r\n")
    kept, offers = [], []
    for line in lines:
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"sec-websocket-extensions":
            offers.append(value.strip())
        else:
            kept.append(line)
    kept.append(b"Sec-WebSocket-Extensions: " + b", ".join(o for o in offers if o))
    return b"\r\n".join(kept) + head[end:]


#: a ``token=`` parameter anywhere in a request line, up to the next ``&``, space or end
_TOKEN_PARAM = re.compile(rb"([?&\s]token=)[^&\s]*")


def take_token(head: bytes) -> tuple[str | None, bytes]:
    """
    Take the token out of an opening handshake before anything parses or
    logs it: from ``?token=...`` in the request target (browsers cannot set
    headers on a WebSocket) or from ``Authorization: Bearer ...``.  Both
    places are rewritten to ``redacted``.

    :param head: the request up to and including the blank line, and
        whatever followed it.
    :return: the token (``None`` when there is none) and the rewritten bytes.
    """
    end = head.index(b"\r\n\r\n")
    lines = head[:end].split(b"\r\n")
    token: str | None = None
    parts = lines[0].split(b" ")
    if len(parts) == 3 and b"?" in parts[1]:
        path, _, query = parts[1].partition(b"?")
        params = query.split(b"&")
        for i, param in enumerate(params):
            name, eq, value = param.partition(b"=")
            if name == b"token" and eq:
                if token is None:
                    token = unquote(value.decode("latin-1"))
                params[i] = b"token=redacted"
        parts[1] = path + b"?" + b"&".join(params)
        lines[0] = b" ".join(parts)
    elif b"token=" in lines[0]:
        # not METHOD TARGET VERSION (an unencoded space, say): refused later,
        # and logged then, so every token-like parameter goes first
        lines[0] = _TOKEN_PARAM.sub(rb"\1redacted", lines[0])
    for i in range(1, len(lines)):
        name, colon, value = lines[i].partition(b":")
        if colon and name.strip().lower() == b"authorization":
            scheme, _, credentials = value.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                if token is None:
                    token = credentials.strip().decode("latin-1")
                lines[i] = b"Authorization: Bearer redacted"
    return token or None, b"\r\n".join(lines) + head[end:]
