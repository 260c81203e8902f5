"""The private state of txredisapi that sockdrawer relies on (see :mod:`sockdrawer._private`)."""

from __future__ import annotations

from typing import Any


def hiredis_reader(proto: Any) -> Any:
    """
    The ``hiredis.Reader`` of a txredisapi ``HiredisProtocol`` connection.

    Assumption: ``HiredisProtocol`` keeps it in ``_reader``, and feeds it in
    ``dataReceived``.
    """
    return proto._reader


def dispatch_reply(proto: Any, reply: Any) -> None:
    """
    Hand one parsed reply to txredisapi exactly as
    ``HiredisProtocol.dataReceived`` does for each reply.

    Assumption: it converts with ``tryConvertData``, counts ``QUEUED`` in
    ``transactions``, otherwise passes the reply through
    ``handleTransactionData`` to ``replyReceived``.
    """
    if isinstance(reply, (str, bytes, list)):
        reply = proto.tryConvertData(reply)
    if reply == "QUEUED":
        proto.transactions += 1
    else:
        reply = proto.handleTransactionData(reply)
    proto.replyReceived(reply)


class ConnectionPoolBypass:
    """
    Mixin for txredisapi factories driven by Twisted's ``ClientService``.

    Assumption: txredisapi's factory calls ``_connectionReady(conn)`` for each
    new connection to add it to its pool and to a queue of waiting callers.
    Under ``ClientService`` nobody reads them, and the pool would keep every
    dead connection after a reconnect; this hook does nothing instead.
    """

    def _connectionReady(self, conn: Any) -> None:
        pass


def configure_factory(factory: Any, password: str | None, username: str | None, timeout: float) -> None:
    """
    Set what a txredisapi ``SubscriberFactory`` or ``RedisFactory`` takes
    only as attributes: bytes in and out, the credentials, the reply timeout;
    and silence its AUTH-failure Deferred (the link logs the failure).

    Assumptions (txredisapi 1.6): ``buildProtocol`` reads ``charset``,
    ``convertNumbers``, ``password``, ``username`` and ``replyTimeout`` from
    the factory; the first AUTH failure errbacks ``factory.deferred``.
    """
    factory.noisy = False
    factory.charset = None
    factory.convertNumbers = False
    factory.password = password
    factory.username = username
    factory.replyTimeout = timeout
    factory.deferred.addErrback(lambda f: None)
