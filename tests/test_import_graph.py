"""The package's import graph: what `lint-imports` (the contracts in pyproject.toml) cannot say.

- no import cycle between any two dmd_dar modules (import-linter checks layers and forbidden imports, not cycles);
- ``dmd_dar.routing`` imports no third-party package but torch and triton (the fused kernel's language, which
  ships with torch's CUDA builds; a forbidden contract can only list packages, so a new dependency would slip
  past it);
- an import of the project's own modules inside a function says why it is lazy (``# lazy: <reason>`` on the line
  or the line above): module-level imports keep the graph visible.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import grimp

import dmd_dar

PACKAGE_DIR = Path(dmd_dar.__file__).resolve().parent


def import_cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.find_modules_directly_imported_by(v) & modules):
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
                cycles.append(sorted(component))

    for m in sorted(modules):
        if m not in index:
            visit(m)
    return sorted(cycles)


def function_level_project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, source line) of each ``import dmd_dar...`` / ``from dmd_dar... import`` inside a function body."""
    source = path.read_text()
    lines = source.splitlines()
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(fn):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if any(n == "dmd_dar" or n.startswith("dmd_dar.") for n in names):
                found.append((node.lineno, lines[node.lineno - 1].strip()))
    return found


def has_lazy_reason(lines: list[str], lineno: int) -> bool:
    here, above = lines[lineno - 1], lines[lineno - 2] if lineno >= 2 else ""
    return "# lazy:" in here or above.strip().startswith("# lazy:")


def test_import_cycles_are_found_and_the_package_has_none():
    graph = grimp.ImportGraph()
    for a, b in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d"), ("p.d", "p.e")):
        graph.add_import(importer=a, imported=b)
    assert import_cycles(graph, set(graph.modules)) == [["p.a", "p.b", "p.c"]]
    graph.remove_import(importer="p.c", imported="p.a")
    assert import_cycles(graph, set(graph.modules)) == []

    graph = grimp.build_graph("dmd_dar", cache_dir=None)
    assert import_cycles(graph, set(graph.modules)) == []


def test_routing_imports_torch_triton_and_the_standard_library_only():
    graph = grimp.build_graph("dmd_dar", include_external_packages=True, cache_dir=None)
    routing = {"dmd_dar.routing"} | graph.find_descendants("dmd_dar.routing")
    imported = set().union(*(graph.find_modules_directly_imported_by(m) for m in routing))
    third_party = {m for m in imported if not m.startswith("dmd_dar")} - set(sys.stdlib_module_names)
    assert third_party == {"torch", "triton"}
    assert {m for m in imported if m.startswith("dmd_dar")} - routing <= {"dmd_dar.errors"}


def test_function_level_imports_of_the_project_say_why_they_are_lazy(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import torch\n\n\ndef f():\n    from dmd_dar.models import build_model\n\n\n"
                     "def g():\n    # lazy: backbones imports diffusers\n    import dmd_dar.backbones\n")
    found = function_level_project_imports(probe)
    assert [n for n, _ in found] == [5, 10]
    lines = probe.read_text().splitlines()
    assert [has_lazy_reason(lines, n) for n, _ in found] == [False, True]

    unexplained = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        lines = path.read_text().splitlines()
        unexplained += [f"{path.relative_to(PACKAGE_DIR.parent)}:{n}: {text}"
                        for n, text in function_level_project_imports(path) if not has_lazy_reason(lines, n)]
    assert unexplained == [], "move these to module top, or give each a '# lazy: <reason>' comment:\n" + \
        "\n".join(unexplained)
