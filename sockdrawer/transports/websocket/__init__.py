"""
The WebSocket transport on Autobahn: handshake policy, frames, compression, origins,
fan-out groups, the protocol and its factory.  Imports the core only.
"""
