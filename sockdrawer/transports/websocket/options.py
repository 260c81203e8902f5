"""
What the WebSocket transport reads of the node's options: one frozen
object, built by the composition root from the settings (the transport never
sees them).  Defaults are the option table's (a test holds them equal).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sockdrawer.core.v1.host import SessionLimits

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class WebSocketOptions:
    """The transport's limits, timeouts and policies (see docs/configuration.rst for each)."""

    max_message_size: int = 64 * KiB
    max_handshake_size: int = 16 * KiB
    max_reply_size: int = MiB
    max_channel_length: int = 256
    send_buffer: int = MiB
    slow_timeout: float = 10.0
    compression: bool = False
    compression_threshold: int = 64
    allowed_origins: tuple[str, ...] = ("*",)
    public_channel: tuple[str, ...] = ()
    trust_x_forwarded_for: bool = False
    open_handshake_timeout: float = 5.0
    close_handshake_timeout: float = 1.0
    auto_ping_interval: float = 25.0
    auto_ping_timeout: float = 10.0
    max_connections: int = 50_000
    max_connections_per_ip: int = 1000
    max_connections_per_user: int = 0
    max_pending_handshakes: int = 1000
    max_pending_handshakes_per_ip: int = 250
    max_frames_per_second: float = 100.0
    frame_burst: int = 200
    max_fragments: int = 1000
    max_subscriptions: int = 100
    max_subscriptions_per_ip: int = 10_000
    max_presence_joins_per_second: float = 5.0
    presence_join_burst: int = 20
    no_gc_freeze: bool = False
    #: verifies browser tokens (``None``: no keys, every channel public)
    verifier: Any = None
    #: asks the app's backend about a handshake without a token: ``(request, headers) -> Deferred[Grant]``,
    #: failing with a ``status`` to refuse it (``None``: no connect proxy)
    connect_proxy: Any = None
    #: a user's open connections on the other nodes: ``user -> Deferred[int]`` (``None``: this node only)
    user_connections: Any = None
    #: told each connection and each channel's first and last connection on this node
    #: (a :class:`~sockdrawer.core.lifecycle.Lifecycle`; ``None``: no --webhook)
    lifecycle: Any = None
    #: the Pusher app (a :class:`~sockdrawer.core.pusher.PusherApp`; ``None``: no Pusher door), and how its
    #: sessions publish: ``(key, message) -> Deferred``, through the node's broker
    pusher: Any = None
    publish: Any = None
    #: told what the Pusher webhooks tell (``--pusher-webhook``; ``None``: none)
    pusher_hooks: Any = None

    def session_limits(self) -> SessionLimits:
        """What its sockdrawer.v1 sessions obey."""
        return SessionLimits(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SessionLimits)})

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The fields that are options of the same name (all but the parts the node builds)."""
        built = ("verifier", "connect_proxy", "user_connections", "lifecycle", "pusher", "publish", "pusher_hooks")
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in built)
