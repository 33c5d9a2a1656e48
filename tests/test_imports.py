"""The package's import graph has no cycles. Imports inside functions count too: a cycle hidden
behind a function-level import is still a cycle (the modules cannot be read, tested or changed
one without the other). Read with `ast`, so nothing is imported to check it."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dinocache"


def _module_names() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for __init__)."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's own modules that `module` imports, anywhere in its body."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in _executed(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from . import sampling` imports the submodule; `from . import x` of anything else
            # (like `from .manifest import OWNED`) imports the module it names
            submodules = {f"{base}.{alias.name}" for alias in node.names} & modules.keys()
            found |= submodules if len(submodules) == len(node.names) else submodules | {base}
    return {name for name in found if name in modules and name != module}


def _executed(tree: ast.AST):
    """Every node, but those under `if TYPE_CHECKING:` (annotations only: never imported)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    modules = _module_names()
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as one cycle
    through its modules so a failure names the path to break."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_one_cycle(graph, component) for component in components]


def _one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first back to it)."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    return paths[node] + [start]
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    return component


def test_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "dinocache.cli" in graph["dinocache._entry"]  # imported inside main()
    assert "dinocache.reader" in graph["dinocache"]  # imported inside __getattr__
    assert "dinocache.families" in graph["dinocache.model"]
    code = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .remote import Remote\nimport os\n"
    imported = {
        getattr(n, "module", None) or n.names[0].name
        for n in _executed(ast.parse(code))
        if "Import" in type(n).__name__
    }
    assert imported == {"typing", "os"}  # not .remote: under TYPE_CHECKING


def test_cycle_finder_names_the_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    found = [f"{' -> '.join(c)}  (all reach each other: {', '.join(_component(graph, c[0]))})" for c in _cycles(graph)]
    assert not found, "import cycles (break each by moving the shared code below both):\n" + "\n".join(found)


def _component(graph: dict[str, set[str]], start: str) -> list[str]:
    """The modules that reach `start` and are reached from it."""

    def reach(edges, node):
        seen, todo = {node}, [node]
        while todo:
            for nxt in edges[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    reverse = {name: {src for src, dsts in graph.items() if name in dsts} for name in graph}
    return sorted(reach(graph, start) & reach(reverse, start))


def test_the_cli_imports_nothing_heavy_until_a_command_runs():
    import subprocess
    import sys

    heavy = ("torch", "transformers", "fsspec", "numpy", "PIL")
    code = f"import sys, dinocache.cli; print([m for m in {heavy!r} if m in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
