"""
Which browser origins may open a WebSocket.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from autobahn.util import wildcards2patterns


class OriginPolicy:
    """
    Origins allowed to connect, as ``scheme://host:port`` patterns with ``*``
    wildcards; ``*`` alone allows any origin.

    :param patterns: the allowed patterns.
    """

    def __init__(self, patterns: Sequence[str] = ("*",)) -> None:
        self.any = "*" in patterns
        self._patterns = wildcards2patterns(list(patterns))

    def allows(self, origin: str) -> bool:
        """
        Whether a browser from ``origin`` may connect: the origin, as
        ``scheme://host:port`` with the port always filled in, must match one
        of the allowed patterns.  ``null`` (file pages, sandboxes) passes only
        when any origin is allowed.
        """
        if self.any:
            return True
        try:
            parts = urlsplit(origin.strip())
            port = parts.port if parts.port is not None else {"https": 443, "http": 80}.get(parts.scheme.lower())
        except ValueError:
            return False
        if not parts.hostname or port is None:
            return False
        normalized = f"{parts.scheme.lower()}://{parts.hostname}:{port}"
        return any(p.match(normalized) for p in self._patterns)
