"""The ``twistd sockdrawer`` plugin: a pointer to :mod:`sockdrawer.tap`."""

from twisted.application.service import ServiceMaker

sockdrawer = ServiceMaker(
    "sockdrawer",
    "sockdrawer.node.tap",
    "Push Redis pub/sub messages to browsers over WebSockets",
    "sockdrawer",
)
