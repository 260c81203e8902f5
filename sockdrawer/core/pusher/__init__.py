"""
The Pusher Channels protocol beside sockdrawer.v1: the app's signatures
(:mod:`.auth`) and a sans-I/O session per connection (:mod:`.session`), on
the same hub, broker, channels and limits as every other connection.
"""

from sockdrawer.core.pusher.auth import PusherApp
from sockdrawer.core.pusher.session import PusherHost, PusherSession

__all__ = ["PusherApp", "PusherHost", "PusherSession"]
