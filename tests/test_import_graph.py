"""The packages' import graph has no circles, and importing edge_llm costs no MLX.

Two graphs of the modules of edge_llm, quant and cli, built from their source with ``ast``:

- what runs at import time: module-level imports, each also importing the packages above its target
  (``import a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first). A circle here is an ImportError or a
  half-initialized module waiting to happen;
- what depends on what: every import, also those inside functions and under ``TYPE_CHECKING``. A circle
  here is two modules that cannot be understood, or moved, one without the other (a base class importing
  its own subclass lazily, a type-only import back). Its one exception is a package's ``__getattr__``,
  which imports on first attribute use, after the package is complete (``edge_llm.load``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edge_llm", "quant", "cli")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    if not level:
        return name or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - level + 1]
    return ".".join(base + ([name] if name else []))


def _nearest(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> list[tuple[str, str]]:
    """(target module, kind) of every import in ``path``; kind is "module" (runs at import time),
    "deferred" (inside a function or under TYPE_CHECKING) or "getattr" (in a module's ``__getattr__``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    kinds: dict[int, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or (
                isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)):
            kind = "getattr" if getattr(node, "name", "") == "__getattr__" else "deferred"
            for inner in ast.walk(node):
                if inner is not node:
                    kinds.setdefault(id(inner), kind)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, path.name == "__init__.py", node.level, node.module)
            # ``from package import submodule`` imports the submodule; ``from module import name`` the module
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            target = _nearest(name)
            if target is not None and target != module:
                found.append((target, kinds.get(id(node), "module")))
    return found


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    at_import = {m: set() for m in MODULES}
    depends = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for target, kind in _imports(module, path):
            if kind == "module":
                at_import[module].update(p for p in [*_parents(target), target] if p not in _parents(module))
            if kind != "getattr":
                depends[module].add(target)
    return at_import, depends


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a path around it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

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
                circles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_the_graph_sees_the_imports():
    at_import, depends = _graphs()
    assert "edge_llm.formats.checkpoint" in at_import["edge_llm.formats.folder"]
    assert "edge_llm.formats" in at_import["edge_llm.loader"]  # the package above an imported module
    assert "edge_llm.loader" in {t for t, kind in _imports("edge_llm", MODULES["edge_llm"]) if kind == "getattr"}
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles_at_import_time():
    assert _circles(_graphs()[0]) == []


def test_no_dependency_circles():
    assert _circles(_graphs()[1]) == []


def test_edge_llm_imports_no_mlx_until_a_model_is_loaded():
    code = ("import sys, edge_llm, edge_llm.errors\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'mlx', 'tokenizers', 'jinja2', 'numpy'})\n"
            "assert edge_llm.EdgeLLMError and edge_llm.CheckpointError and edge_llm.TokenizerError\n"
            "print(heavy)\n"
            "assert callable(edge_llm.load) and callable(edge_llm.load_model)\n"
            "print('mlx' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "True"]
