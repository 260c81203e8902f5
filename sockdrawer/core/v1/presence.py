"""
Presence for sockdrawer.v1 subscriptions on this node: the groups of each
channel (snapshot and events lined up, churn gathered per period) and the
service that keeps this node's entries in the store.
"""

from __future__ import annotations

import secrets
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sockdrawer.core import presence as _presence
from sockdrawer.core.channels import printable
from sockdrawer.core.interfaces import Batch, IChannelHub, ISink
from sockdrawer.core.v1.messages import control
from sockdrawer.core.v1.session import Subscription, V1Session

_log = Logger(namespace="sockdrawer.v1")

#: seconds a presence group waits for the marker of its snapshot before it
#: asks for another (a per-channel Redis subscription may still be on its
#: way), doubling up to the second number
RESYNC_DELAY = (0.05, 1.0)
#: events a presence group keeps while it waits for a snapshot
MAX_BUFFERED = 10_000
#: seconds over which a channel's join and leave events are gathered before they go out: a client that joins
#: and leaves (or leaves and comes back) within it costs the others nothing, and each client costs each member
#: at most one event per period, whatever its rate
PRESENCE_PERIOD = 0.1

_Store = _presence.MemoryPresence | _presence.RedisPresence


@implementer(ISink)
class PresenceGroup:
    """
    The presence subscriptions of one channel on this node, subscribed to the
    channel's presence events (:func:`sockdrawer.presence.events_key`).

    It keeps the channel's list of entries (:attr:`view`) from one snapshot
    and the events after it (see :mod:`sockdrawer.presence` for the markers
    that line them up).  A new subscription waits for the marker of its own
    join: then it is sent the list (itself in it) and, from there on, every
    event.  After a broker gap the group takes a new snapshot and sends every
    subscription the list again.
    """

    def __init__(self, service: PresenceService, key: bytes) -> None:
        self.service = service
        self.key = key
        self.channel = key.decode("utf-8")
        #: client id -> user, as of the last event applied
        self.view: dict[str, Any] = {}
        self.synced = False
        self.closed = False
        #: subscriptions that get every event
        self.live: dict[Subscription, None] = {}
        #: nonce of its join -> a subscription waiting for that marker
        self.pending: dict[str, Subscription] = {}
        #: live before a gap: they get the list again once synced
        self._stale: dict[Subscription, None] = {}
        self._buffer: list[tuple[str, dict[str, Any] | None, bytes]] = []
        self._snapshots: dict[str, list[Any]] = {}
        self._retry: IDelayedCall | None = None
        self._delay = RESYNC_DELAY[0]
        #: a failure was logged since the group last had its list (retries are not)
        self._warned = False
        #: snapshots asked for and not answered yet
        self._asking = 0
        #: client id -> nonce, of :attr:`pending`
        self._pending_clients: dict[str, str] = {}
        #: the events for the live subscriptions not sent yet, by client: (the last event's body, whether the
        #: client was in the view and as which user when the period began)
        self._out: dict[str, tuple[bytes, bool, Any]] = {}
        self._flush_call: IDelayedCall | None = None

    @property
    def receivers(self) -> int:
        return len(self.live) + len(self.pending) + len(self._stale)

    def add(self, sub: Subscription) -> None:
        nonce = secrets.token_hex(8)
        self.pending[nonce] = sub
        session = sub.session
        self._pending_clients[session.client] = nonce
        fields = _presence.entry_fields(session.peer.user, session.client)
        # one snapshot at a time is enough: a join after it is an event after its marker (a crowd joining at
        # once costs one O(n) read, not n of them)
        snapshot = not self.synced and not self._asking
        d = maybeDeferred(self.service.store.join, self.key, self.service.field(session), fields, nonce, snapshot)
        if snapshot:
            self._asking += 1
            d.addCallbacks(self._snapshot, self._snapshot_failed, callbackArgs=(nonce,))
        else:
            d.addErrback(self._failed)

    def remove(self, sub: Subscription) -> None:
        self.live.pop(sub, None)
        self._stale.pop(sub, None)
        nonce = self._pending_clients.pop(sub.session.client, None)
        if nonce is not None:
            self.pending.pop(nonce, None)

    def close(self) -> None:
        self.closed = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        self._out.clear()

    # -- snapshots

    def _snapshot(self, values: Any, nonce: str) -> None:
        self._asking -= 1
        if self.closed or self.synced:
            return
        self._snapshots[nonce] = list(values or ())
        for i, (marker, _, _) in enumerate(self._buffer):
            if marker == nonce:
                self._sync_at(i)
                return
        self._schedule_resync()

    def _snapshot_failed(self, failure: Failure) -> None:
        self._asking -= 1
        self._failed(failure)

    def _failed(self, failure: Failure) -> None:
        if self.closed:
            return
        if not self._warned:
            self._warned = True
            _log.warn("presence of {channel!r} unavailable ({error}); retrying", channel=printable(self.channel),
                      error=failure.getErrorMessage() or type(failure.value).__name__)
        if not self.synced:
            self._schedule_resync()

    def _schedule_resync(self) -> None:
        if self._retry is None or not self._retry.active():
            self._retry = self.service.clock.callLater(self._delay, self.resync)
            self._delay = min(RESYNC_DELAY[1], self._delay * 2)

    def resync(self) -> None:
        """Ask for a snapshot (and its marker) again."""
        self._retry = None
        if self.closed or self.synced:
            return
        nonce = secrets.token_hex(8)
        self._asking += 1
        # this node's entries first (Redis may have restarted empty, and a renewal asked at the gap may have
        # failed with the connection still down): the same connection runs both in order, so the snapshot
        # has them
        for renewal in self.service.store.refresh([self.key]):
            renewal.addErrback(lambda f: None)  # the snapshot's failure is reported
        d = maybeDeferred(self.service.store.sync, self.key, nonce)
        d.addCallbacks(self._snapshot, self._snapshot_failed, callbackArgs=(nonce,))

    def gap(self) -> None:
        """
        The broker may have lost events (and Redis its entries, if it
        restarted): take a new snapshot, this node's entries put back first
        (see :meth:`resync`).
        """
        if self.closed:
            return
        self.synced = False
        self._stale.update(self.live)
        self.live.clear()
        self._buffer = []
        self._snapshots = {}
        # the period's gathered events are measured against a view the new list replaces
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        self._out.clear()
        self.resync()

    def _sync_at(self, index: int) -> None:
        marker = self._buffer[index][0]
        values = self._snapshots[marker]
        before = {nonce for nonce, _, _ in self._buffer[: index + 1] if nonce}
        rest = self._buffer[index + 1:]
        self._buffer = []
        self._snapshots = {}
        self.synced = True
        self._delay = RESYNC_DELAY[0]
        self._warned = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self.view = {entry["client"]: entry["user"] for entry in _presence.parse_entries(values)}
        starting = list(self._stale)
        self._stale.clear()
        for nonce, sub in list(self.pending.items()):
            # its join is in the snapshot: its marker came before, or was lost
            if nonce in before or sub.session.client in self.view:
                del self.pending[nonce]
                self._pending_clients.pop(sub.session.client, None)
                starting.append(sub)
        for sub in starting:
            self.live[sub] = None
            self._send_list(sub)
        for nonce, event, body in rest:
            self._apply(nonce, event, body)

    # -- events

    def receive(self, batch: Batch) -> None:
        for message in batch.messages:
            nonce, event, body = _presence.parse_event(message)
            if self.synced:
                self._apply(nonce, event, body)
                continue
            if len(self._buffer) >= MAX_BUFFERED:
                self._buffer = []
                self._snapshots = {}
            self._buffer.append((nonce, event, body))
            if nonce and nonce in self._snapshots:
                self._sync_at(len(self._buffer) - 1)

    def _flush_later(self) -> None:
        self._flush_call = None
        self._flush()

    def _flush(self) -> None:
        """Send the period's events, one per client whose presence changed, in one write to each socket."""
        out = self._out
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if not out:
            return
        view = self.view
        payloads = [body for client, (body, was_in, user) in out.items()
                    if (client in view) != was_in or (was_in and view[client] != user)]
        out.clear()
        if not payloads:
            return
        frames: dict[Any, bytes] = {}
        for sub in tuple(self.live):
            sub.session.send_shared(payloads, frames)

    def _apply(self, nonce: str, event: dict[str, Any] | None, body: bytes) -> None:
        client: str | None = None
        if event is not None:
            client = event["client"]
            out = self._out
            if self.live and client not in out:
                out[client] = (body, client in self.view, self.view.get(client))
            if event["op"] == "join":
                self.view[client] = event.get("user")
            else:
                self.view.pop(client, None)
            if self.live:
                out[client] = (body, *out[client][1:])
                if self._flush_call is None:
                    self._flush_call = self.service.clock.callLater(PRESENCE_PERIOD, self._flush_later)
            if event["op"] != "join":
                client = None
        # its own marker, or its entry came back by a refresh (its join failed)
        waiting = self.pending.pop(nonce, None) if nonce else None
        if waiting is None and client is not None:
            marker = self._pending_clients.get(client)
            waiting = self.pending.pop(marker, None) if marker is not None else None
        if waiting is not None:
            self._pending_clients.pop(waiting.session.client, None)
            self._flush()  # the events so far are in the list it gets, not after it
            self.live[waiting] = None
            self._send_list(waiting)

    def _send_list(self, sub: Subscription) -> None:
        clients = [{"user": user, "client": client} for client, user in self.view.items()]
        sub.session.send_text(control("presence", channel=self.channel, self=sub.session.client, clients=clients))


class PresenceService(Service):
    """
    Presence on this node: the :class:`PresenceGroup` of each channel with
    presence subscriptions, and the store of entries (in memory, or Redis
    with :meth:`refresh` every third of ``timeout``).  When it stops, it
    removes this node's entries at once (other nodes see them leave).

    :param store: a :class:`~sockdrawer.presence.MemoryPresence` or
        :class:`~sockdrawer.presence.RedisPresence`.
    :param hub: where presence events arrive.
    :param clock: the reactor.
    :param timeout: the ``presence_timeout`` setting.
    """

    def __init__(self, store: _Store, hub: IChannelHub, clock: Any, timeout: float) -> None:
        self.store = store
        self.hub = hub
        self.clock = clock
        self.timeout = timeout
        #: this process's id in presence fields (``<node>/<client>``)
        self.node = secrets.token_hex(6)
        self.groups: dict[bytes, PresenceGroup] = {}
        self._refresh = LoopingCall(self.refresh)
        self._refresh.clock = clock
        self._stopped = False
        #: the last renewal failed (logged once, until one works again)
        self.refresh_failing = False

    def field(self, session: V1Session) -> str:
        return f"{self.node}/{session.client}"

    def startService(self) -> None:
        super().startService()
        self._stopped = False
        if self.store.expires:
            self._refresh.start(self.timeout / 3, now=False)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._refresh.running:
            self._refresh.stop()
        self._stopped = True
        calls: list[Deferred[Any]] = []
        for call in self.store.leave_all():
            # the link may be down or stopping: then the entries expire
            calls.append(call.addErrback(lambda f: None))
        groups, self.groups = self.groups, {}
        for key, group in groups.items():
            group.close()
            self.hub.unsubscribe(_presence.events_key(key), group)
        return DeferredList(calls)

    def join(self, sub: Subscription) -> None:
        """Add ``sub``'s entry; it gets the list, then joins and leaves."""
        if self._stopped:
            return
        group = self.groups.get(sub.key)
        if group is None:
            group = self.groups[sub.key] = PresenceGroup(self, sub.key)
            self.hub.subscribe(_presence.events_key(sub.key), group)
        group.add(sub)

    def leave(self, sub: Subscription) -> None:
        """Remove ``sub``'s entry (its socket unsubscribed or closed); the others see it leave."""
        group = self.groups.get(sub.key)
        if group is not None:
            group.remove(sub)
            if not group.receivers:
                group.close()
                del self.groups[sub.key]
                self.hub.unsubscribe(_presence.events_key(sub.key), group)
        if self._stopped:
            return
        d = maybeDeferred(self.store.leave, sub.key, [self.field(sub.session)])
        d.addErrback(self._leave_failed, sub.channel)

    def _leave_failed(self, failure: Failure, channel: str) -> None:
        _log.warn("presence leave on {channel!r} failed ({error}); the entry expires", channel=printable(channel),
                  error=failure.getErrorMessage() or type(failure.value).__name__)

    def entries(self, key: bytes) -> Deferred[list[dict[str, Any]]]:
        """Fires with the live entries of ``key`` (``{"user", "client"}`` each)."""
        d = maybeDeferred(self.store.read, key)
        d.addCallback(_presence.parse_entries)
        return d

    def refresh(self) -> Deferred[None]:
        """
        Renew this node's entries (and remove the expired ones of every
        channel it has entries on); a failing renewal is logged once, until
        one works again.
        """
        calls = self.store.refresh()
        failures: list[Failure] = []
        for d in calls:
            d.addErrback(failures.append)
        done: Deferred[Any] = DeferredList(calls)

        def report(_: object) -> None:
            if failures and not self.refresh_failing:
                self.refresh_failing = True
                _log.warn("presence entries of {count} channel(s) not renewed ({error}); they expire in "
                          "{timeout} s unless a renewal works", count=len(failures), timeout=self.timeout,
                          error=failures[0].getErrorMessage() or type(failures[0].value).__name__)
            elif not failures and calls and self.refresh_failing:
                self.refresh_failing = False
                _log.info("presence entries renewed again")

        done.addCallback(report)
        return done
