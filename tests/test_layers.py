"""The package's layers are true: every import between its modules (at module level or inside a
function; not those under ``TYPE_CHECKING``, which name a type only) goes to the same or a
lower layer of the table in ARCHITECTURE.md, and no imports close a circle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import floodfilling

PKG = Path(floodfilling.__file__).resolve().parent
ARCH = Path(__file__).resolve().parents[1] / "ARCHITECTURE.md"  # (the package may be installed elsewhere)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def _type_checking(tree) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports at run time."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking(tree)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                prefix = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
                targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in mods else prefix for a in node.names]
            for t in targets:
                while t not in mods and "." in t:
                    t = t.rpartition(".")[0]
                if t in mods and t != mod and t.startswith("floodfilling"):
                    graph[mod].add(t)
    return graph


def layer_table() -> dict[str, int]:
    """Module -> layer, from the table "Layers" of ARCHITECTURE.md (a row names its modules in
    backticks: ``x.py`` a module, ``pkg/`` every module of a package)."""
    rows = re.findall(r"^\| (\d+) \| ([^|]+) \|", ARCH.read_text(), flags=re.M)
    mods = modules()
    layer: dict[str, int] = {}
    for num, names in rows:
        for name in re.findall(r"`([^`]+)`", names):
            if name.endswith("/"):
                pkg = "floodfilling." + name.strip("/").replace("/", ".")
                for m in mods:
                    if m == pkg or m.startswith(pkg + "."):
                        layer[m] = int(num)
            elif name.endswith(".py"):
                m = "floodfilling." + name[:-3].replace("/", ".")
                layer[module_name(PKG / name) if name == "__init__.py" else m] = int(num)
    return layer


def test_every_module_has_a_layer():
    missing = sorted(set(modules()) - set(layer_table()))
    assert missing == [], f"modules not in the layer table of ARCHITECTURE.md: {missing}"


def test_no_import_runs_up_a_layer():
    layer = layer_table()
    up = [f"{a} (layer {layer[a]}) imports {b} (layer {layer[b]})"
          for a, targets in import_graph().items() for b in sorted(targets)
          if a in layer and b in layer and layer[b] > layer[a]]
    assert up == []


def test_no_imports_close_a_circle():
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert circles == []


def test_the_checks_can_fail(tmp_path, monkeypatch):
    """(the checker sees an upward import and a circle when there is one)"""
    global PKG
    pkg = tmp_path / "floodfilling"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("")
    (pkg / "low" / "a.py").write_text("def f():\n    from ..high import b\n")
    (pkg / "high.py").write_text("from .low import a\n")
    monkeypatch.setattr(__import__(__name__), "PKG", pkg)
    graph = import_graph()
    assert graph["floodfilling.low.a"] == {"floodfilling.high"} and graph["floodfilling.high"] == {"floodfilling.low.a"}
