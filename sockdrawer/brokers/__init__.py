"""
Brokers: the Redis link, Redis Cluster and Sentinel (and the slot helpers the synchronous Client
shares).  Imports the core and txredisapi; never a transport, the HTTP API or the node.
"""
