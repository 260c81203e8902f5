"""
A Pusher Channels connection (protocol 7), sans-I/O: frames in
(:meth:`PusherSession.received`), frames out through the transport's outbox
(the same :class:`~sockdrawer.core.v1.host.Outbox` a sockdrawer.v1 session
writes to).

One channel space: the Pusher channel ``news`` is the hub key ``news``, so
messages published by any sockdrawer publisher arrive as the event
:data:`MESSAGE_EVENT`, and events triggered through the Pusher API or sent by
clients (``client-*``) travel as named events (:mod:`sockdrawer.core.events`)
whose data raw and v1 sockets get as a plain message.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from sockdrawer.core.channels import ChannelNameError, validate_channel
from sockdrawer.core.events import wrap
from sockdrawer.core.interfaces import Batch, IChannelHub, ISink
from sockdrawer.core.members import Members
from sockdrawer.core.pusher.auth import CHANNEL_NAME, PusherApp

_log = Logger(namespace="sockdrawer.pusher")

#: the event name of a message published by sockdrawer (Client.pub, the API, redis-cli PUBLISH, listeners)
MESSAGE_EVENT = "message"
#: the protocol versions the SDKs speak that this server answers
PROTOCOLS = range(5, 8)
#: seconds of silence after which a client pings (told at connection_established)
ACTIVITY_TIMEOUT = 120
#: the channel of a signed-in user's own events (the HTTP API's send-to-user)
USER_CHANNEL = "#server-to-user-"
#: the most bytes of a presence channel's channel_data
MAX_CHANNEL_DATA = 2048

# Pusher's close and error codes
APP_UNKNOWN = 4001
NO_PROTOCOL = 4008
BAD_PROTOCOL = 4007
UNAUTHORIZED = 4009


class PusherHost:
    """
    What the Pusher sessions of a node share: the app, the hub and its fan-out
    groups, how to publish (through the broker, to every node), the limits.

    :param publish: ``(key, message) -> Deferred``: the node's publish (through the broker).
    :param stats: counts ``deliveries`` and ``bytes_sent`` (the transport's fan-out stats).
    :param public: whether a public channel may be read without a sockdrawer token
        (``--public-channel``; every channel when the node has no token keys).
    """

    def __init__(self, app: PusherApp, hub: IChannelHub, publish: Callable[[bytes, bytes], Any], stats: Any,
                 max_subscriptions: int, max_channel_length: int, public: Callable[[str], bool]) -> None:
        self.app = app
        self.hub = hub
        self.publish = publish
        self.stats = stats
        self.max_subscriptions = max_subscriptions
        self.max_channel_length = max_channel_length
        self.public = public
        self.groups: dict[bytes, PusherGroup] = {}
        #: open sessions by socket id
        self.sessions: dict[str, PusherSession] = {}
        #: presence members (set by the node): see :class:`~sockdrawer.core.pusher.presence.PusherPresence`
        self.presence: Any = None
        #: told of each channel's first and last connection on this node (--webhook; set by the transport)
        self.lifecycle: Any = None
        #: told what Pusher's webhooks tell (a :class:`~sockdrawer.core.lifecycle.PusherLifecycle`;
        #: --pusher-webhook, set by the transport)
        self.hooks: Any = None

    def new_socket_id(self) -> str:
        while True:
            socket_id = f"{secrets.randbelow(10**9)}.{secrets.randbelow(10**9)}"
            if socket_id not in self.sessions:
                return socket_id

    def join(self, session: PusherSession, key: bytes) -> None:
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = PusherGroup(self, key)
            self.hub.subscribe(key, group)
        group.members[session] = None
        if self.lifecycle is not None:
            self.lifecycle.joined(key)
        if self.hooks is not None:
            self.hooks.joined(key)

    def leave(self, session: PusherSession, key: bytes) -> None:
        group = self.groups.get(key)
        if group is None or group.members.pop(session, 0) is not None:
            return
        if self.lifecycle is not None:
            self.lifecycle.left(key)
        if self.hooks is not None:
            self.hooks.left(key)
        if not group.members:
            del self.groups[key]
            self.hub.unsubscribe(key, group)

    def subscriptions(self, key: bytes) -> int:
        """This node's Pusher connections on channel ``key``."""
        group = self.groups.get(key)
        return len(group.members) if group is not None else 0


@implementer(ISink)
class PusherGroup:
    """The Pusher connections on one channel: each message goes out as a Pusher event, framed once."""

    def __init__(self, host: PusherHost, key: bytes) -> None:
        self.host = host
        self.key = key
        self.channel = key.decode("utf-8")
        self.members: Members[PusherSession] = Members()

    @property
    def receivers(self) -> int:
        return len(self.members)

    def receive(self, batch: Batch) -> None:
        metas = batch.meta
        stats = self.host.stats
        for i, data in enumerate(batch.messages):
            event, exclude, extra = MESSAGE_EVENT, None, None
            meta = metas[i] if metas is not None else None
            if meta is not None:
                try:
                    fields = json.loads(meta)
                    event = str(fields.get("event", MESSAGE_EVENT))
                    exclude = fields.get("socket_id")
                    extra = fields.get("user_id")
                except (ValueError, AttributeError):
                    pass
            out: dict[str, Any] = {"event": event, "channel": self.channel,
                                   "data": data.decode("utf-8", "replace")}
            if extra is not None:
                out["user_id"] = extra
            payload = json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            frames: dict[int, bytes] = {}
            for session in tuple(self.members):  # a slow reader cut off leaves the group meanwhile
                outbox = session.outbox
                if session.socket_id == exclude or not outbox.can_send:
                    continue
                encoding = outbox.encoding
                frame = frames.get(encoding)
                if frame is None:
                    frame = frames[encoding] = outbox.frame(payload)
                outbox.write(frame)
                stats.deliveries += 1
                stats.bytes_sent += len(frame)


class PusherSession:
    """
    One Pusher connection.

    :param host: the node's :class:`PusherHost`.
    :param outbox: where frames go; ``end(code, reason)`` closes the connection.
    :param peer: who is connected (address, user).
    """

    def __init__(self, host: PusherHost, outbox: Any, peer: Any) -> None:
        self.host = host
        self.outbox = outbox
        self.peer = peer
        self.socket_id = host.new_socket_id()
        #: channel key -> the presence member (user_id, user_info) it joined as, or None
        self.channels: dict[bytes, tuple[str, Any] | None] = {}
        self.closed = False

    # what the control API reads of a session (as of a sockdrawer.v1 one): its id, its channels

    @property
    def _client(self) -> str:
        return self.socket_id

    @property
    def subscriptions(self) -> dict[bytes, Any]:
        return self.channels

    def send_control(self, op: str, **fields: Any) -> None:
        """The Pusher protocol has no word for a server-side unsubscribe: the client is not told."""

    # -- out

    def send(self, event: str, data: Any, channel: str | None = None) -> None:
        if not self.outbox.can_send:
            return
        message: dict[str, Any] = {"event": event}
        if channel is not None:
            message["channel"] = channel
        message["data"] = data
        payload = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        self.outbox.write(self.outbox.frame(payload))

    def error(self, code: int | None, message: str) -> None:
        self.send("pusher:error", {"code": code, "message": message})

    def refuse(self, code: int, message: str) -> None:
        """``pusher:error`` with ``code``, then the close with it (as Pusher does for 4000-4099)."""
        self.error(code, message)
        self.outbox.end(code, message[:120])

    # -- in

    def open(self, app_key: str, protocol: str | None) -> None:
        """The connection opened on ``/app/<app_key>?protocol=...``."""
        if app_key != self.host.app.key:
            self.refuse(APP_UNKNOWN, f"App key {app_key[:64]} not in this cluster")
            return
        if protocol is None:
            self.refuse(NO_PROTOCOL, "No protocol version supplied")
            return
        if not protocol.isdigit() or int(protocol) not in PROTOCOLS:
            self.refuse(BAD_PROTOCOL, f"Unsupported protocol version {protocol[:16]}")
            return
        self.host.sessions[self.socket_id] = self
        self.send("pusher:connection_established",
                  json.dumps({"socket_id": self.socket_id, "activity_timeout": ACTIVITY_TIMEOUT}))

    def received(self, payload: bytes, is_binary: bool) -> None:
        if self.closed or self.socket_id not in self.host.sessions:
            return
        try:
            message = json.loads(payload)
        except ValueError:
            self.error(None, "frame is not JSON")
            return
        if not isinstance(message, dict) or not isinstance(message.get("event"), str):
            self.error(None, "frame is not a Pusher event (a JSON object with an event name)")
            return
        event = message["event"]
        data = message.get("data")
        if isinstance(data, str) and event.startswith("pusher:"):
            try:
                data = json.loads(data)  # some SDKs send the data of pusher: events as a JSON string
            except ValueError:
                pass
        if event == "pusher:ping":
            self.send("pusher:pong", {})
        elif event == "pusher:pong":
            pass
        elif event == "pusher:subscribe":
            self.subscribe(data if isinstance(data, dict) else {})
        elif event == "pusher:unsubscribe":
            channel = data.get("channel") if isinstance(data, dict) else None
            if isinstance(channel, str):
                self.unsubscribe(channel.encode("utf-8"))
        elif event == "pusher:signin":
            self.sign_in(data if isinstance(data, dict) else {})
        elif event.startswith("client-"):
            self.client_event(event, message.get("channel"), message.get("data"))
        # other pusher: events (and unknown ones) are ignored, as Pusher does

    def subscribe(self, data: dict[str, Any]) -> None:
        channel = data.get("channel")
        if isinstance(channel, str) and channel.startswith(USER_CHANNEL):
            self.user_channel(channel)
            return
        if not isinstance(channel, str) or not CHANNEL_NAME.fullmatch(channel):
            self.error(None, "Invalid channel name")
            return
        try:
            key = validate_channel(channel, self.host.max_channel_length)
        except ChannelNameError as e:
            self.subscription_error(channel, 400, str(e))
            return
        if key in self.channels:
            return
        if len(self.channels) >= self.host.max_subscriptions:
            self.subscription_error(channel, 429, f"at most {self.host.max_subscriptions} channels a connection")
            return
        app = self.host.app
        member: tuple[str, Any] | None = None
        if channel.startswith("presence-"):
            channel_data = data.get("channel_data")
            if not isinstance(channel_data, str):
                self.subscription_error(channel, 400, "presence channels need channel_data")
                return
            if len(channel_data.encode("utf-8")) > MAX_CHANNEL_DATA:
                self.subscription_error(channel, 413, f"channel_data over {MAX_CHANNEL_DATA} bytes")
                return
            if not app.channel_auth_ok(self.socket_id, channel, data.get("auth"), channel_data):
                self.subscription_error(channel, 401, "Invalid signature")
                return
            try:
                fields = json.loads(channel_data)
                user_id = fields["user_id"]
                if isinstance(user_id, bool) or not isinstance(user_id, (str, int)):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                self.subscription_error(channel, 400, "channel_data must be a JSON object with a user_id")
                return
            member = (str(user_id), fields.get("user_info"))
        elif channel.startswith("private-"):
            if not app.channel_auth_ok(self.socket_id, channel, data.get("auth")):
                self.subscription_error(channel, 401, "Invalid signature")
                return
        elif not self.host.public(channel):
            self.subscription_error(channel, 403, "this channel needs a sockdrawer token: use a private- channel")
            return
        self.channels[key] = member
        self.host.join(self, key)
        if member is not None and self.host.hooks is not None:
            self.host.hooks.member_joined(key, member[0])
        if member is not None and self.host.presence is not None:
            self.host.presence.join(self, key, channel, member)
            return
        self.send("pusher_internal:subscription_succeeded", "{}", channel)

    def user_channel(self, channel: str) -> None:
        """``#server-to-user-<id>``: what the API's send-to-user reaches; the signed-in user's own only."""
        if self.peer.user is None or channel != USER_CHANNEL + self.peer.user:
            self.subscription_error(channel, 403, "only the signed-in user's own channel")
            return
        key = channel.encode("utf-8")
        if key not in self.channels:
            self.channels[key] = None
            self.host.join(self, key)
        self.send("pusher_internal:subscription_succeeded", "{}", channel)

    def subscription_error(self, channel: str, status: int, message: str) -> None:
        kind = "AuthError" if status in (401, 403) else "LimitReached" if status == 429 else "SubscriptionError"
        self.send("pusher:subscription_error", {"type": kind, "error": message, "status": status}, channel)

    def unsubscribe(self, key: bytes) -> None:
        if key not in self.channels:
            return
        member = self.channels.pop(key)
        if member is not None and self.host.hooks is not None:
            self.host.hooks.member_left(key, member[0])
        self.host.leave(self, key)
        if member is not None and self.host.presence is not None:
            self.host.presence.leave(self, key, member)

    def sign_in(self, data: dict[str, Any]) -> None:
        user_data = data.get("user_data")
        if not isinstance(user_data, str) or not self.host.app.user_auth_ok(self.socket_id, user_data,
                                                                             data.get("auth")):
            self.refuse(UNAUTHORIZED, "Invalid signature for the user sign-in")
            return
        try:
            user = json.loads(user_data)["id"]
        except (ValueError, KeyError, TypeError):
            self.refuse(UNAUTHORIZED, "user_data must be a JSON object with an id")
            return
        self.peer = dataclasses.replace(self.peer, user=str(user))  # the control API's user from now on
        self.send("pusher:signin_success", {"user_data": user_data})

    def client_event(self, event: str, channel: Any, data: Any) -> None:
        if not isinstance(channel, str) or not channel.startswith(("private-", "presence-")):
            self.error(None, "Client event rejected - only supported on private and presence channels")
            return
        key = channel.encode("utf-8")
        if key not in self.channels:
            self.error(None, f"Client event rejected - not subscribed to {channel[:164]}")
            return
        member = self.channels[key]
        meta: dict[str, Any] = {"event": event, "socket_id": self.socket_id}
        if member is not None:
            meta["user_id"] = member[0]
        body = data.encode("utf-8") if isinstance(data, str) else json.dumps(data, separators=(",", ":")).encode()
        if self.host.hooks is not None:
            self.host.hooks.client_event(key, event, body.decode("utf-8"), self.socket_id, meta.get("user_id"))
        d = self.host.publish(key, wrap(meta, body))
        d.addErrback(lambda f: self.error(None, f"Client event rejected - {f.getErrorMessage()[:200]}"))

    def close(self) -> None:
        """The connection is gone: out of every channel (presence members leave)."""
        if self.closed:
            return
        self.closed = True
        for key in list(self.channels):
            self.unsubscribe(key)
        if self.host.sessions.get(self.socket_id) is self:
            del self.host.sessions[self.socket_id]
