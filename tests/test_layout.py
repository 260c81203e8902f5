"""
The package's layout holds (docs/architecture.rst): layers import only the
layers below them, no import circle anywhere in ``sockdrawer/`` (imports
inside functions and under ``TYPE_CHECKING`` count), at most ten modules
directly in ``sockdrawer/``, and no module grows past 600 lines (the few
still over it may only shrink).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "sockdrawer"

#: what each layer may import from sockdrawer (besides itself and the standard library)
ALLOWED = {
    "core": set(),
    "brokers": {"core", "_private"},
    "transports": {"core", "_private"},
    "http": {"core", "_private"},
    "node": {"core", "brokers", "transports", "http", "_private", "config", "logs"},
}
#: the modules that may import ``Settings``: the option table, the composition root, the publisher
SETTINGS_READERS = ("sockdrawer.config", "sockdrawer.node.", "sockdrawer.client")


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(path: Path, name: str) -> set[str]:
    """Every sockdrawer module ``path`` imports, at any depth of its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    known = modules()
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("sockdrawer"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not module.startswith("sockdrawer"):
                continue
            for alias in node.names:
                # from sockdrawer.x import submodule: that module; from sockdrawer.x import name: x
                sub = f"{module}.{alias.name}"
                out.add(sub if sub in known else module)
    return {m for m in out if m in known}


def test_layers_import_only_what_they_may() -> None:
    """A module of a layer imports sockdrawer modules of its own layer and of the layers it may import only."""
    wrong = []
    for name, path in modules().items():
        parts = name.split(".")
        if len(parts) < 2 or parts[1] not in ALLOWED:
            continue
        layer = parts[1]
        for target in imports(path, name):
            tparts = target.split(".")
            top = tparts[1] if len(tparts) > 1 else "__init__"
            if top != layer and top not in ALLOWED[layer]:
                wrong.append(f"{name} imports {target}")
    assert wrong == []


def test_no_import_circle() -> None:
    """No module reaches itself through sockdrawer's imports (packages' __init__ re-exports included)."""
    graph = {name: imports(path, name) - {name} for name, path in modules().items()}
    # a module importing a package's name goes through its __init__, which is itself a node
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + "."):
                continue  # a package's __init__ re-exporting its own modules
            if state.get(nxt) == 1:
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert circles == []


def test_at_most_ten_modules_at_the_top() -> None:
    """sockdrawer/ holds at most ten modules of its own; the rest live in the layer packages."""
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(top) <= 10, top


def test_modules_stay_under_600_lines() -> None:
    """No module is over 600 lines."""
    over = {}
    for path in ROOT.rglob("*.py"):
        lines = len(path.read_text().splitlines())
        if lines > 600:
            over[str(path.relative_to(ROOT.parent))] = lines
    assert over == {}


def _imported_names(path: Path) -> set[str]:
    """Every module and name ``path`` imports (``from a import b`` gives ``a`` and ``a.b``), at any depth."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_settings_travel_one_way() -> None:
    """Only the option table, the composition root (node/) and the publisher import ``Settings``: every other
    part gets the few values it reads."""
    readers = sorted(name for name, path in modules().items()
                     if "sockdrawer.config.Settings" in _imported_names(path))
    assert [r for r in readers if not r.startswith(SETTINGS_READERS)] == []


def test_the_core_imports_no_transport_and_no_reactor() -> None:
    """The core (the v1 session included) imports neither Autobahn nor txredisapi, and never the global
    reactor: its clock and its way out are handed in."""
    wrong = []
    for name, path in modules().items():
        if not name.startswith("sockdrawer.core"):
            continue
        for imported in _imported_names(path):
            if imported.startswith(("autobahn", "txredisapi")) or imported == "twisted.internet.reactor":
                wrong.append(f"{name} imports {imported}")
    assert wrong == []
