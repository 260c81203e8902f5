"""
Redis Cluster hash slots, for sharded pub/sub and history on a cluster.

A key (or a sharded channel) lives in slot ``CRC16(key) mod 16384``, or of
its ``{hash tag}``: redis-py's :func:`redis.crc.key_slot` computes it.  A
channel's history keys get a hash tag that puts them in the slot of the
channel that carries its messages, so that one script on the owning master
can append to the stream and ``SPUBLISH`` the message; a channel's presence
hash, likewise, gets the hash tag of its events channel.

This module imports only the standard library, redis-py's CRC,
:mod:`sockdrawer.history` and :mod:`sockdrawer.presence`: the synchronous :class:`~sockdrawer.Client` uses
it too.
"""

from __future__ import annotations

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from sockdrawer.core.history import PUBLISH_SCRIPT, history_channel
from sockdrawer.core.presence import events_channel

#: slots in a Redis Cluster
SLOTS = REDIS_CLUSTER_HASH_SLOTS

_PUBLISH = "redis.call('PUBLISH',"
_sharded: dict[str, str] = {}


def sharded_script(script: str) -> str:
    """
    A Lua script of sockdrawer's with each ``redis.call('PUBLISH', ...)``
    made ``SPUBLISH``: on a cluster the message goes out on the shard that
    owns the channel (which the script's keys must share a slot with).
    """
    sharded = _sharded.get(script)
    if sharded is None:
        sharded = _sharded[script] = script.replace(_PUBLISH, "redis.call('SPUBLISH',")
    return sharded


#: :data:`sockdrawer.history.PUBLISH_SCRIPT` with ``SPUBLISH``
SHARDED_PUBLISH_SCRIPT = sharded_script(PUBLISH_SCRIPT)
if SHARDED_PUBLISH_SCRIPT.count("SPUBLISH") != 1:  # pragma: no cover - history.py changed its script
    raise RuntimeError("sockdrawer.history.PUBLISH_SCRIPT no longer has exactly one redis.call('PUBLISH', ...)")

_tags: dict[int, bytes] = {}


def slot(name: bytes) -> int:
    """The hash slot of a key or sharded channel, as Redis computes it."""
    return key_slot(name)


def hash_tag(name: bytes) -> bytes:
    """
    A ``{hash tag}`` that puts any key starting with it in the slot of
    ``name``: ``name``'s own tag when it has one, else ``{name}``, else (a
    name with a ``}`` but no tag, which ``{name}`` would cut short) a short
    tag found for that slot.
    """
    start = name.find(b"{")
    if start > -1:
        end = name.find(b"}", start + 1)
        if end > -1 and end != start + 1:
            return name[start:end + 1]
    if b"}" not in name:
        return b"{" + name + b"}"
    return b"{" + slot_tag(key_slot(name)) + b"}"


def slot_tag(wanted: int) -> bytes:
    """The smallest decimal number whose text hashes to slot ``wanted`` (kept once found)."""
    tag = _tags.get(wanted)
    if tag is None:
        n = 0
        while key_slot(b"%d" % n) != wanted:
            n += 1
        tag = _tags[wanted] = b"%d" % n
    return tag


def history_keys(namespace: str, channel: bytes) -> tuple[bytes, bytes]:
    """
    The stream and epoch keys of ``channel``'s history on a cluster:
    ``{<name>#/<channel>}:history`` and ``{<name>#/<channel>}:epoch``, in the
    slot of the history channel ``<name>#/<channel>``.
    """
    tag = hash_tag(history_channel(namespace, channel))
    return tag + b":history", tag + b":epoch"


def presence_key(namespace: str, key: bytes) -> bytes:
    """
    The hash of channel ``key``'s presence entries on a cluster:
    ``{<name>//presence/<channel>}:presence``, in the slot of the channel its
    events are published on.
    """
    return hash_tag(events_channel(namespace, key)) + b":presence"
