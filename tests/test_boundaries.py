"""Module boundaries of the package: no import circles, no private names used across modules.

Read from the source with ``ast`` (nothing is imported), counting imports inside functions too: a
lazy import still ties the two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import clipdeploy

SRC = Path(clipdeploy.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = ["clipdeploy", *path.relative_to(SRC).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name) for every clipdeploy import; name is None for ``import x`` and modules."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None) for a in node.names if a.name.startswith("clipdeploy")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("clipdeploy"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out += [(node.lineno, sub, None) if sub in MODULES else (node.lineno, node.module, alias.name)]
    return out


def _graph() -> dict[str, set[str]]:
    return {
        name: {mod for _, mod, _ in _imports(path) if mod in MODULES and mod != name}
        for name, path in MODULES.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_sees_a_circle():
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_no_import_circles():
    assert _cycles(_graph()) == []


def test_no_private_names_across_modules():
    """A name starting with ``_`` is the module's own; one that another module needs is made public."""
    bad = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = set()
        for line, mod, imported in _imports(path):
            if imported is not None and imported.startswith("_") and not imported.startswith("__"):
                bad.append(f"{name}:{line} imports {mod}.{imported}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("clipdeploy"):
                modules |= {a.asname or a.name for a in node.names if f"{node.module}.{a.name}" in MODULES}
            elif isinstance(node, ast.Import):
                modules |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("clipdeploy")}
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in modules
            ):
                bad.append(f"{name}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert bad == []


REASON = "# here, not at the top:"


def test_own_imports_at_the_top_unless_a_comment_says_why():
    """An import of a clipdeploy module inside a function must carry the reason on the line above it."""
    bad = []
    for name, path in MODULES.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                module = node.module if isinstance(node, ast.ImportFrom) and node.level == 0 else None
                if isinstance(node, ast.Import):
                    module = next((a.name for a in node.names if a.name.startswith("clipdeploy")), None)
                if not (module or "").startswith("clipdeploy"):
                    continue
                if REASON not in lines[node.lineno - 2]:
                    bad.append(f"{name}:{node.lineno} imports {module} inside {fn.name}()")
    assert bad == []
