"""
The node: the composition root (SockDrawerService), the twistd plugin's options, workers and log
observers.  Imports every layer; nothing imports it but the package's public shims.
"""
