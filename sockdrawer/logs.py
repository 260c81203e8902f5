"""
Log observers for ``twistd``.

``twistd -n sockdrawer --log-format json`` (or ``twistd -n
--logger=sockdrawer.logs.json_stdout sockdrawer``) writes one JSON object per
line to standard output: twisted.logger's JSON observer, without its RFC 7464
record separators, for log shippers.
"""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


def json_stdout() -> ILogObserver:
    """An observer writing each event as one JSON line on standard output."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
