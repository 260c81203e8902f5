"""
The transport-neutral core: channel names, the hub and its fan-out lists, history and presence
models, listeners, tokens and the sockdrawer.v1 session.  Imports the standard library, zope.interface,
Twisted and PyJWT; never a broker, a transport, the HTTP API or the node.
"""
