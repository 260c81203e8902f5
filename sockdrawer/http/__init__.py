"""
The node's HTTP API and its Prometheus metrics, reading narrow views of the node.  Imports the core;
never a broker, a transport or the node.
"""
