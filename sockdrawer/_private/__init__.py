"""
Every place where sockdrawer relies on private state of Twisted, Autobahn or
txredisapi, and nothing else: one module per library (``of_twisted``,
``of_autobahn``, ``of_txredisapi``), all of it named here.

Each function below names one assumption about a library's internals; each
has a test in ``tests/test_private.py`` that fails, naming the assumption,
when a new release breaks it.  No other module reads or writes a private
attribute of these libraries.  The pins in ``pyproject.toml`` and the CI run
against the lowest and the highest allowed versions keep the list honest.

Public mechanisms were preferred where they exist: the direct send path
finds the socket with ``getHandle()`` and detects TLS with
``ISSLTransport``.  Twisted's producer API tells a streaming producer only
when the write buffer crosses ``bufferSize`` and when it has drained, while
the fan-out needs to know whether *any* byte is queued (a direct write past
it would reorder the stream) and how many (the slow-reader limits): those two
reads stay here.
"""

from __future__ import annotations

from sockdrawer._private.of_autobahn import (
    COMPACT_DEFAULTS,
    FRAME_STATE,
    HANDSHAKE_STATE,
    LAZY_LOG_MODULES,
    LAZY_STATE,
    GuardedServerProtocol,
    bound_inflation,
    break_close_cycle,
    compact,
    fail_connection,
    feed,
    install_compact_defaults,
    make_log_arguments_lazy,
    negotiated_deflate,
    options_as_class,
    raw_request_target,
    set_connection_timer,
    set_extension_offers,
    settle,
)
from sockdrawer._private.of_twisted import (
    QuietClientService,
    compact_transport,
    handling_request,
    has_write_backlog,
    restart_pending,
    running_processes,
    tcp_connection,
    watch_process_end,
    write_backlog,
)
from sockdrawer._private.of_txredisapi import (
    ConnectionPoolBypass,
    configure_factory,
    dispatch_reply,
    hiredis_reader,
)

__all__ = [
    "QuietClientService",
    "COMPACT_DEFAULTS",
    "FRAME_STATE",
    "LAZY_STATE",
    "GuardedServerProtocol",
    "restart_pending",
    "running_processes",
    "watch_process_end",
    "handling_request",
    "compact_transport",
    "has_write_backlog",
    "tcp_connection",
    "write_backlog",
    "HANDSHAKE_STATE",
    "LAZY_LOG_MODULES",
    "bound_inflation",
    "break_close_cycle",
    "compact",
    "settle",
    "fail_connection",
    "feed",
    "install_compact_defaults",
    "make_log_arguments_lazy",
    "negotiated_deflate",
    "options_as_class",
    "raw_request_target",
    "set_connection_timer",
    "set_extension_offers",
    "ConnectionPoolBypass",
    "configure_factory",
    "dispatch_reply",
    "hiredis_reader",
]
