"""
Pusher presence channels on sockdrawer's presence (:mod:`sockdrawer.core.presence`):
each Pusher connection on a ``presence-`` channel is an entry of the node's
presence store (``"user": <user_id>, "client": <socket_id>, "info": <user_info>``),
so members are shared with every node, renewed and expired like a
sockdrawer.v1 subscription's, and seen by v1 presence subscribers of the same
channel (and v1 entries with a user by Pusher clients).

A member is a user: the first entry of a user on a channel is its
``pusher_internal:member_added``, the last one gone its ``member_removed``.
The list a new subscriber gets (``subscription_succeeded``) and the events
after it line up as in :class:`sockdrawer.core.v1.presence.PresenceGroup`:
the group takes a snapshot with a marker (a nonce) published in the same
script, keeps the events until it has both, and applies only those after the
marker.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sockdrawer.core import presence as _presence
from sockdrawer.core.interfaces import Batch, IChannelHub, ISink

_log = Logger(namespace="sockdrawer.pusher")

#: seconds to wait for a snapshot's marker before taking another (a per-channel subscription on its way)
RESYNC_DELAY = 1.0


def _entries(values: Any) -> dict[str, tuple[str, Any]]:
    """client -> (user_id, user_info) of store entries that have a user."""
    out: dict[str, tuple[str, Any]] = {}
    for value in values or ():
        try:
            entry = json.loads(value)
        except (ValueError, TypeError):
            continue
        if isinstance(entry, dict) and isinstance(entry.get("client"), str) and entry.get("user") is not None:
            out[entry["client"]] = (str(entry["user"]), entry.get("info"))
    return out


@implementer(ISink)
class MemberGroup:
    """The Pusher presence subscribers of one channel on this node, on the channel's presence events."""

    def __init__(self, presence: PusherPresence, key: bytes) -> None:
        self.presence = presence
        self.key = key
        self.channel = key.decode("utf-8")
        #: local subscribers: session -> whether it got its member list
        self.sessions: dict[Any, bool] = {}
        #: client -> (user_id, info), once synced
        self.clients: dict[str, tuple[str, Any]] = {}
        self.synced = False
        self._nonce: str | None = None
        self._snapshot: dict[str, tuple[str, Any]] | None = None
        self._after_marker: list[dict[str, Any]] | None = None
        self._retry: Any = None

    receivers = 1

    def users(self) -> dict[str, Any]:
        members: dict[str, Any] = {}
        for user, info in self.clients.values():
            members.setdefault(user, info)
        return members

    def _count(self, user: str) -> int:
        return sum(1 for u, _ in self.clients.values() if u == user)

    # -- syncing

    def begin(self, nonce: str) -> None:
        """A snapshot with the marker ``nonce`` is being taken (before the script runs: its marker may come first)."""
        self._nonce = nonce
        self._snapshot = None
        self._after_marker = None

    def sync(self, joining: Deferred[Any] | None, nonce: str) -> None:
        """Wait for the snapshot ``joining`` fires with (None: ask the store) and the marker ``nonce``."""
        if joining is None:
            self.begin(nonce)
            # this node's entries first (Redis may have restarted empty): the snapshot has them
            for renewal in self.presence.store.refresh([self.key]):
                renewal.addErrback(lambda f: None)
            joining = maybeDeferred(self.presence.store.sync, self.key, nonce)
        d = joining
        d.addCallbacks(self._got_snapshot, self._failed, callbackArgs=(nonce,))
        clock = self.presence.clock
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = clock.callLater(RESYNC_DELAY, self._resync)

    def _resync(self) -> None:
        self._retry = None
        if not self.synced and self.sessions:
            self.sync(None, secrets.token_hex(6))

    def _failed(self, failure: Failure) -> None:
        _log.warn("Pusher presence of {channel!r}: cannot read its members ({error}); trying again",
                  channel=self.channel, error=failure.getErrorMessage())

    def _got_snapshot(self, values: Any, nonce: str) -> None:
        if nonce != self._nonce:
            return
        self._snapshot = _entries(values)
        self._maybe_synced()

    def _maybe_synced(self) -> None:
        if self._snapshot is None or self._after_marker is None:
            return
        self.clients = self._snapshot
        events, self._after_marker, self._snapshot, self._nonce = self._after_marker, None, None, None
        self.synced = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        for event in events:
            self._apply(event)
        for session, told in list(self.sessions.items()):
            if not told:
                self.welcome(session)

    def welcome(self, session: Any) -> None:
        """Send ``session`` its ``subscription_succeeded`` with every member (itself among them)."""
        self.sessions[session] = True
        member = session.channels.get(self.key)
        members = self.users()
        if member is not None:
            members.setdefault(member[0], member[1])
        data = {"presence": {"ids": list(members), "hash": members, "count": len(members)}}
        session.send("pusher_internal:subscription_succeeded", json.dumps(data, separators=(",", ":")), self.channel)

    # -- events

    def receive(self, batch: Batch) -> None:
        for message in batch.messages:
            nonce, event, _ = _presence.parse_event(message)
            if not self.synced:
                if self._after_marker is None:
                    if nonce and nonce == self._nonce:
                        self._after_marker = [event] if event is not None else []
                        self._maybe_synced()
                    continue
                if event is not None:
                    self._after_marker.append(event)
                continue
            if event is not None:
                self._apply(event)

    def gap(self) -> None:
        """The broker lost messages: take the members again."""
        self.synced = False
        if self.sessions:
            self.sync(None, secrets.token_hex(6))

    def _apply(self, event: dict[str, Any]) -> None:
        client = event["client"]
        if event["op"] == "join":
            if event.get("user") is None or client in self.clients:
                return
            user = str(event["user"])
            first = self._count(user) == 0
            self.clients[client] = (user, event.get("info"))
            if first:
                self._tell("pusher_internal:member_added", {"user_id": user, "user_info": event.get("info")},
                           exclude=client)
        else:
            gone = self.clients.pop(client, None)
            if gone is not None and self._count(gone[0]) == 0:
                self._tell("pusher_internal:member_removed", {"user_id": gone[0]}, exclude=client)

    def _tell(self, event: str, data: dict[str, Any], exclude: str) -> None:
        text = json.dumps(data, separators=(",", ":"))
        for session, told in self.sessions.items():
            if told and session.socket_id != exclude:
                member = session.channels.get(self.key)
                if event == "pusher_internal:member_added" and member is not None and member[0] == data["user_id"]:
                    continue  # its own user, already in its list
                session.send(event, text, self.channel)

    def close(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None


class PusherPresence:
    """
    The Pusher presence of a node, on the node's presence store.

    :param presence: the node's :class:`~sockdrawer.core.v1.presence.PresenceService`
        (its store, its node id, its renewal of this node's entries).
    :param hub: where presence events arrive.
    :param clock: the reactor.
    """

    def __init__(self, presence: Any, hub: IChannelHub, clock: Any) -> None:
        self.service = presence
        self.store = presence.store
        self.hub = hub
        self.clock = clock
        self.groups: dict[bytes, MemberGroup] = {}

    def _field(self, session: Any) -> str:
        return f"{self.service.node}/{session.socket_id}"

    def join(self, session: Any, key: bytes, channel: str, member: tuple[str, Any]) -> None:
        """``session`` joins as ``member``; it gets the members once they are known, then member events."""
        fields = json.dumps({"user": member[0], "client": session.socket_id, "info": member[1]},
                            ensure_ascii=False, separators=(",", ":"))[1:-1]
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = MemberGroup(self, key)
            self.hub.subscribe(_presence.events_key(key), group)
            group.sessions[session] = False
            nonce = secrets.token_hex(6)
            group.begin(nonce)
            group.sync(maybeDeferred(self.store.join, key, self._field(session), fields, nonce, True), nonce)
            return
        d = maybeDeferred(self.store.join, key, self._field(session), fields, "", False)
        d.addErrback(lambda f: _log.warn("Pusher presence join on {channel!r} failed: {error}", channel=channel,
                                         error=f.getErrorMessage()))
        if group.synced:
            group.welcome(session)
        else:
            group.sessions[session] = False

    def leave(self, session: Any, key: bytes, member: tuple[str, Any]) -> None:
        group = self.groups.get(key)
        if group is not None:
            group.sessions.pop(session, None)
            if not group.sessions:
                group.close()
                del self.groups[key]
                self.hub.unsubscribe(_presence.events_key(key), group)
        d = maybeDeferred(self.store.leave, key, [self._field(session)])
        d.addErrback(lambda f: None)  # the entry expires

    def members(self, key: bytes) -> Deferred[list[tuple[str, Any]]]:
        """A presence channel's members across every node: ``(user_id, user_info)``, one per user."""
        def users(values: Any) -> list[tuple[str, Any]]:
            seen: dict[str, Any] = {}
            for user, info in _entries(values).values():
                seen.setdefault(user, info)
            return list(seen.items())

        return maybeDeferred(self.store.read, key).addCallback(users)
