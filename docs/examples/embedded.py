"""
Embedding sockdrawer in an existing Twisted application.

The host application here is a tiny "clock" that publishes the time on
channel ``clock`` every second, in-process, through the sockdrawer service it
embeds.  Run it with::

    python docs/examples/embedded.py              # embedded broker
    python docs/examples/embedded.py --redis redis://localhost:6379/0

and open ``ws://localhost:8020/clock`` in a browser (or
``python -m websockets ws://localhost:8020/clock``).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet import defer, task
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver

from sockdrawer.service import SockDrawerService

_log = Logger(namespace="clock")


def make_service(port: str = "tcp:8020", redis: str | None = None, reactor: Any = None) -> MultiService:
    """
    The host application's service tree: sockdrawer plus the host's own clock.

    :return: the top service; ``top.sockdrawer`` is the sockdrawer service.
    """
    top = MultiService()
    sockdrawer = SockDrawerService(port=port, redis=redis, api=None, reactor=reactor)
    sockdrawer.setServiceParent(top)

    def tick() -> None:
        # publish through the broker: with Redis, every node's sockets get it; a publish
        # fails while Redis is unreachable (and when the link closes at shutdown)
        d = sockdrawer.publish(time.strftime("%H:%M:%S"), channel="clock")
        d.addErrback(lambda failure: _log.warn("no tick: {why}", why=failure.getErrorMessage()))

    TimerService(1.0, tick).setServiceParent(top)
    top.sockdrawer = sockdrawer  # type: ignore[attr-defined]
    return top


# In a .tac file for twistd, the same tree goes under the Application:
#     application = service.Application("clock")
#     make_service().setServiceParent(application)


def main(reactor: Any, *argv: str) -> defer.Deferred[None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", default="tcp:8020")
    parser.add_argument("--redis", default=None)
    args = parser.parse_args(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    top = make_service(args.port, args.redis, reactor)
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    return defer.Deferred()  # run until interrupted


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
