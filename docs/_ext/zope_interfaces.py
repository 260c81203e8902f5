"""
``.. autointerface:: dotted.name``: document a zope.interface ``Interface``.

autodoc does not know interfaces (they are not classes), so this renders one
as a ``py:class`` with its methods and attributes, in definition order, from
the interface's own docstrings.
"""

from __future__ import annotations

import importlib
import inspect

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from zope.interface.interface import Method


def _import(dotted: str) -> object:
    module_name, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def _indent(text: str, prefix: str) -> list[str]:
    return [prefix + line if line else "" for line in inspect.cleandoc(text or "").splitlines()]


class AutoInterface(SphinxDirective):
    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        dotted = self.arguments[0]
        iface = _import(dotted)
        module_name, _, name = dotted.rpartition(".")
        lines = [f".. py:class:: {name}", f"   :module: {module_name}", "", "   *Interface.*", ""]
        lines += _indent(iface.__doc__ or "", "   ")
        for member, desc in iface.namesAndDescriptions(all=False):
            lines.append("")
            if isinstance(desc, Method):
                lines.append(f"   .. py:method:: {member}{desc.getSignatureString()}")
            else:
                lines.append(f"   .. py:attribute:: {member}")
            lines.append("")
            lines += _indent(desc.getDoc() or "", "      ")
        node = nodes.section()
        node.document = self.state.document
        self.state.nested_parse(StringList(lines, source=dotted), self.content_offset, node)
        return node.children


def setup(app):  # type: ignore[no-untyped-def]
    app.add_directive("autointerface", AutoInterface)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
