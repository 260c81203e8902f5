"""
The sockdrawer.v1 subprotocol, transport-neutral: messages, the session of
one socket and its subscriptions, and presence.  Imports the core only.
"""

from sockdrawer.core.v1.host import Outbox, Peer, SessionHost, SessionLimits
from sockdrawer.core.v1.messages import MAX_ID_LENGTH, SUBPROTOCOL, control, envelope
from sockdrawer.core.v1.presence import MAX_BUFFERED, PRESENCE_PERIOD, RESYNC_DELAY, PresenceGroup, PresenceService
from sockdrawer.core.v1.session import State, Subscription, V1Session

__all__ = [
    "MAX_BUFFERED",
    "MAX_ID_LENGTH",
    "PRESENCE_PERIOD",
    "RESYNC_DELAY",
    "SUBPROTOCOL",
    "PresenceGroup",
    "PresenceService",
    "Outbox",
    "Peer",
    "SessionHost",
    "SessionLimits",
    "State",
    "Subscription",
    "V1Session",
    "control",
    "envelope",
]
