"""
sockdrawer: push live events from a backend to browsers over WebSockets,
with Redis as the broker.

Importing this package (and :mod:`sockdrawer.client`) does not import
Twisted; the server lives in :mod:`sockdrawer.service`.
"""

from sockdrawer.client import Client, PublishError
from sockdrawer.core.channels import ChannelNameError
from sockdrawer.core.subscriber import BROKER, SOCKET, Source, Subscriber, on
from sockdrawer.core.tokens import make_token

__version__ = "0.1.0"

__all__ = [
    "BROKER",
    "SOCKET",
    "ChannelNameError",
    "Client",
    "PublishError",
    "Source",
    "Subscriber",
    "make_token",
    "on",
    "__version__",
]
