"""
The import path embedders use: :class:`SockDrawerService` lives in
:mod:`sockdrawer.node.service` (the composition root); this module keeps
``from sockdrawer.service import SockDrawerService`` working.
"""

from sockdrawer.node.service import SockDrawerService

__all__ = ["SockDrawerService"]
