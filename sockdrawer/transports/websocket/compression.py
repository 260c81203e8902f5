"""
permessage-deflate (RFC 7692) negotiation: which offers a server accepts,
and what it answers.

The server always answers ``server_no_context_takeover``: each message it
sends is compressed on its own, so the same compressed frame is valid on
every socket that negotiated the same window, and a batch is deflated once
per channel instead of once per socket (see :mod:`sockdrawer.frames`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept

EXTENSION = PerMessageDeflateOffer.EXTENSION_NAME  # "permessage-deflate"


class SharedDeflateAccept(PerMessageDeflateOfferAccept):
    """
    Accepts a permessage-deflate offer with ``server_no_context_takeover``
    (which RFC 7692 7.1.1.1 lets a server answer whether or not the client
    asked for it) and, when the client limited it, the window it asked for.
    """

    def __init__(self, offer: PerMessageDeflateOffer) -> None:
        window = offer.request_max_window_bits or None
        super().__init__(offer, no_context_takeover=True, window_bits=window)

    def get_extension_string(self) -> str:
        answer = f"{EXTENSION}; server_no_context_takeover"
        if self.window_bits is not None:
            answer += f"; server_max_window_bits={self.window_bits}"
        return answer


def accept_deflate(offers: Sequence[Any]) -> SharedDeflateAccept | None:
    """
    The answer to a client's permessage-compress offers, in its order of
    preference: the first permessage-deflate offer, or ``None`` to decline.
    (Autobahn's ``perMessageCompressionAccept`` option.)
    """
    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return SharedDeflateAccept(offer)
    return None


def acceptable_offers(extensions: Sequence[tuple[str, Any]], compression: bool) -> list[tuple[str, Any]]:
    """
    The extension offers of a handshake that Autobahn should see: with
    compression on, the permessage-deflate offers that are valid; none
    otherwise.  An offer with unknown or bad parameters is declined (RFC 7692
    5.1), never a reason to refuse the handshake; unknown extensions are
    ignored (RFC 6455 9.1).

    :param extensions: ``(name, params)`` pairs as Autobahn parsed them.
    """
    if not compression:
        return []
    kept = []
    for name, params in extensions:
        if name != EXTENSION:
            continue
        try:
            PerMessageDeflateOffer.parse(params)
        except Exception:
            continue
        kept.append((name, params))
    return kept
