"""
How the Redis Cluster link follows the cluster's slot map: it reads
``CLUSTER SLOTS`` on its control connection (at start, on ``MOVED``, when
Redis drops channels or a master's connection, and on every tick), starts
and retires a shard per master, and reads again, backing off, until every
slot is covered and every master is back.  A mixin of
:class:`~sockdrawer.brokers.cluster.ClusterLink`, which provides the
connections and the shards.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from sockdrawer.brokers import slots as _slots
from sockdrawer.brokers.linkparts import Backoff
from sockdrawer.brokers.shards import parse_slots
from sockdrawer.brokers.url import RedisURL

_log = Logger(namespace="sockdrawer.redis")

Address = tuple[str, int]

#: slot map reads that may find the map unchanged after Redis dropped
#: channels, before the link takes the map as it is
_STALE_READS = 8


class FollowsSlotMap:
    """The slot map part of the cluster link (its state is set up by the link)."""

    running: int
    seeds: tuple[RedisURL, ...]
    timeout: float
    shards: dict[Address, Any]
    map_changes: int
    _clock: IReactorTime
    _control: Any
    _control_endpoint: Any
    _nodes: list[Address]
    _slots: list[Any] | None
    _covered: int
    _refresh_backoff: Backoff
    _refresh_call: Any
    _refreshing: bool
    _refresh_again: bool
    _refresh_waiters: list[Deferred[None]]
    _reading_for: list[Deferred[None]]
    _moved: bool
    _unchanged_reads: int
    _later: list[tuple[bytes, Deferred[None]]]

    def _new_shard(self, address: Address) -> Any:
        raise NotImplementedError

    def _lose(self) -> None:
        raise NotImplementedError

    def _resync(self) -> int:
        raise NotImplementedError

    def _release_later(self) -> None:
        raise NotImplementedError

    def _check_whole(self) -> None:
        raise NotImplementedError

    def _node_url(self, address: Address) -> RedisURL:
        return replace(self.seeds[0], host=address[0], port=address[1])

    def _candidates(self) -> list[Address]:
        """Where the control connection may go: the nodes of the last slot map, then the seeds."""
        seen: dict[Address, None] = dict.fromkeys(self._nodes)
        for seed in self.seeds:
            seen[(seed.host, seed.port)] = None
        return list(seen)

    def refresh(self) -> Deferred[None]:
        """Read the slot map again now; fires once a read started after this call has finished (whatever it found)."""
        if not self.running:
            return fail(ConnectionError("the Redis Cluster link is not running"))
        d: Deferred[None] = Deferred()
        self._refresh_waiters.append(d)
        self._schedule_refresh(0)
        return d

    def _schedule_refresh(self, delay: float) -> None:
        if not self.running:
            return
        if self._refreshing:
            self._refresh_again = True
            return
        call = self._refresh_call
        if call is not None and call.active():
            if delay == 0:
                call.reset(0)
            return
        self._refresh_call = self._clock.callLater(delay, self._read_slots)

    def _read_slots(self) -> None:
        self._refresh_call = None
        self._refreshing = True
        self._refresh_again = False
        self._reading_for, self._refresh_waiters = self._refresh_waiters, []
        # channels Redis dropped before this read: the map it returns should differ
        moved, self._moved = self._moved, False
        d: Deferred[Any] = self._control.whenConnected(failAfterFailures=1)
        d.addCallback(lambda p: p.whenConnected())
        d.addCallback(lambda p: p.execute_command("CLUSTER", "SLOTS"))
        d.addTimeout(self.timeout, self._clock)
        d.addCallbacks(self._slots_read, self._slots_failed, callbackArgs=(moved,), errbackArgs=(moved,))
        d.addErrback(lambda f: _log.failure("reading the Redis Cluster slot map failed", f))
        d.addBoth(self._refreshed)

    def _address(self, host: Any, port: Any) -> Address:
        text = host.decode("utf-8", "replace") if isinstance(host, bytes) else str(host)
        if not text or text == "?":
            # Redis knows no address to give: the one the control connection used
            text = self._control_endpoint.address[0] if self._control_endpoint.address else self.seeds[0].host
        return text, int(port)

    def _slots_read(self, reply: Any, moved: bool) -> None:
        ranges = [(first, last, self._address(host, port)) for first, last, host, port in parse_slots(reply)]
        masters = dict.fromkeys(address for _, _, address in ranges)
        nodes = dict.fromkeys(self._address(node[0], node[1]) for entry in reply for node in entry[2:])
        for address in list(self.shards):
            if address not in masters:
                shard = self.shards.pop(address)
                shard.retired = True
                if shard.following is not None:
                    if shard.following.subscribed:
                        # its channels move to their new owners: messages may fall in between
                        self._lose()
                    # whatever it still sends until it is closed is stale
                    shard.following.subscribed.clear()
                    shard.following = None
                shard.disownServiceParent()
        new = []
        for address in masters:
            if address not in self.shards:
                shard = self.shards[address] = self._new_shard(address)
                new.append(shard)
                shard.setServiceParent(self)
        table: list[Any] = [None] * _slots.SLOTS
        for first, last, address in ranges:
            table[first:last + 1] = [self.shards[address]] * (last + 1 - first)
        old = self._slots
        changed = old is None or any(a is not b for a, b in zip(old, table, strict=True))
        self._nodes = list(nodes)
        self._slots = table
        covered = self._covered = _slots.SLOTS - table.count(None)
        if changed:
            self.map_changes += 1
            self._unchanged_reads = 0
            _log.info("Redis Cluster slot map: {count} master(s) ({masters}), {covered} of {total} slots covered",
                      count=len(self.shards), masters=", ".join(s.node for s in self.shards.values()),
                      covered=covered, total=_slots.SLOTS)
        else:
            self._unchanged_reads += 1
        moved_here = self._resync()
        if moved_here and old is not None:
            # subscriptions moved to their new owners: messages may have fallen in between
            self._lose()
        down = any(s.following is None and s not in new for s in self.shards.values())
        stale = moved and not changed and self._unchanged_reads <= _STALE_READS
        if covered == _slots.SLOTS and not down and not stale:
            self._refresh_backoff.reset()
            return
        # a master is down (its replica not promoted yet), slots are not
        # covered, or Redis dropped channels and this node's map has not
        # changed yet: read it again soon
        self._moved = self._moved or stale
        self._refresh_again = True

    def _slots_failed(self, failure: Failure, moved: bool) -> None:
        # the next read still has to find the map changed
        self._moved = self._moved or moved
        _log.warn("cannot read the Redis Cluster slot map from {node}: {error}",
                  node=":".join(map(str, self._control_endpoint.address or ("?",))),
                  error=failure.getErrorMessage() or type(failure.value).__name__)
        self._refresh_again = True

    def _refreshed(self, _: object) -> None:
        self._refreshing = False
        waiters, self._reading_for = self._reading_for, []
        for w in waiters:
            w.callback(None)
        if self._refresh_again:
            self._refresh_again = False
            self._schedule_refresh(self._refresh_backoff())
        if self._later:
            self._release_later()
        self._check_whole()
