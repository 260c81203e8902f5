"""
Transports: how browsers reach the core.  Imports the core; never a broker, the HTTP API or
the node.
"""
