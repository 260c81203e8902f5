"""
Log observers for ``twistd``.

``twistd -n sockdrawer --log-format json`` (or ``twistd -n
--logger=sockdrawer.logs.json_stdout sockdrawer``) writes one JSON object per
line to standard output, as log shippers expect: ``time`` (RFC 3339, UTC),
``level``, ``logger`` (the namespace), ``message`` (the rendered text), the
event's own fields, and ``traceback`` for a logged failure.

``worker_stdout`` is for ``--workers``: each worker writes Twisted's own
JSON events, which the supervisor reads back as events.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Any, TextIO, cast

from twisted.logger import ILogObserver, formatEvent, jsonFileLogObserver
from zope.interface import provider


def event_as_line(event: dict[str, Any]) -> str:
    """One log event as one line of JSON for log shippers."""
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0.0), UTC).isoformat(timespec="milliseconds"),
        "level": getattr(level, "name", str(level)),
        "logger": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if key.startswith("log_") or key in record or key == "format":
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif not isinstance(value, (str, int, float, bool, type(None), list, dict)):
            value = str(value)
        record[key] = value
    return json.dumps(record, ensure_ascii=False, default=str)


def json_observer(out: TextIO) -> ILogObserver:
    """An observer writing each event to ``out`` as :func:`event_as_line` and a newline."""

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        out.write(event_as_line(event) + "\n")
        out.flush()

    return cast(ILogObserver, observe)


def json_stdout() -> ILogObserver:
    """An observer writing each event as one JSON line for log shippers on standard output."""
    return json_observer(sys.stdout)


def worker_stdout() -> ILogObserver:
    """A worker's observer: Twisted's JSON events, one a line, for its supervisor to read back."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
