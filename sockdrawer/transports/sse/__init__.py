"""
Server-Sent Events, the second transport of the same core: on the WebSocket
port, a ``GET`` that asks for ``text/event-stream`` instead of an upgrade gets
a stream of events (``stream``), framed as the SSE format says (``events``).
Imports the core and the WebSocket transport's shared parts; never the node.
"""
