"""
``.. sockdrawer-options::``: the option reference, generated from the option
table in :mod:`sockdrawer.config` (name, environment variable, default,
what it does), so the docs cannot disagree with the code.
"""

from __future__ import annotations

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective


def option_rows() -> list[str]:
    """The reference as reStructuredText: one definition per option, grouped by the part that reads it."""
    from sockdrawer.config import OPTIONS

    lines: list[str] = []
    for spec in OPTIONS:
        flag = f"--{spec.cli}" + ("" if spec.kind == "bool" else " VALUE")
        if spec.short:
            flag += f", -{spec.short}"
        lines.append(f"``{flag}``")
        text = (spec.help[0].upper() + spec.help[1:] + ".").replace("\\", "\\\\").replace("*", "\\*")
        lines.append(f"   {text}")
        lines.append("")
        details = [f"environment ``{spec.env}``", f"config key ``{spec.cli}``"]
        if not spec.repeatable:
            details.insert(0, f"default ``{spec.describe_default()}``")
        else:
            details[0] += " (comma-separated)"
        if spec.secret:
            details.append("masked by ``--print-config``")
        details.append(f"read by: {spec.part}")
        lines.append("   " + "; ".join(details) + ".")
        lines.append("")
    return lines


class SockDrawerOptions(SphinxDirective):
    has_content = False

    def run(self) -> list[nodes.Node]:
        container = nodes.container()
        self.state.nested_parse(StringList(option_rows(), source="sockdrawer.config"), self.content_offset,
                                container)
        return container.children


def setup(app: object) -> dict[str, object]:
    app.add_directive("sockdrawer-options", SockDrawerOptions)  # type: ignore[attr-defined]
    return {"parallel_read_safe": True}
