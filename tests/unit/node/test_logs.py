"""``--log-format json``: one object a line, as log shippers read it."""

from __future__ import annotations

import io
import json
from datetime import datetime

from twisted.logger import Logger

from sockdrawer.logs import json_observer


def test_json_lines_carry_time_level_logger_message_and_fields() -> None:
    """Each event is one line of JSON with an RFC 3339 time, the level's name, the logger's namespace, the
    rendered message and the event's own fields (bytes as text); a failure adds its traceback."""
    out = io.StringIO()
    log = Logger(namespace="sockdrawer.test", observer=json_observer(out))
    log.info("publish on {channel} failed: {why}", channel=b"news", why="down")
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        log.failure("handler {name} raised", name="echo")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert datetime.fromisoformat(first.pop("time")).utcoffset() is not None
    assert first == {"level": "info", "logger": "sockdrawer.test", "message": "publish on b'news' failed: down",
                     "channel": "news", "why": "down"}
    assert second["level"] == "critical" and second["message"] == "handler echo raised"
    assert "ZeroDivisionError" in second["traceback"] and second["name"] == "echo"
