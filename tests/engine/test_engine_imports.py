"""engine/ is layered: no import cycles among its modules, no private names across modules."""

from __future__ import annotations

import ast
import pathlib

import llmserve.engine

ENGINE = pathlib.Path(llmserve.engine.__file__).parent


def _imports() -> dict[str, list[ast.ImportFrom | ast.Import]]:
    """Every import statement of each engine module: top level, TYPE_CHECKING and in functions."""
    found = {}
    for path in sorted(ENGINE.glob("*.py")):
        tree = ast.parse(path.read_text())
        found[path.stem] = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return found


def _engine_graph() -> dict[str, set[str]]:
    graph = {}
    for module, nodes in _imports().items():
        names = [n.module for n in nodes if isinstance(n, ast.ImportFrom) and n.module]
        names += [a.name for n in nodes if isinstance(n, ast.Import) for a in n.names]
        graph[module] = {name.split(".")[2] for name in names
                         if name.startswith("llmserve.engine.")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph`, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_engine_modules_import_each_other_without_cycles():
    graph = _engine_graph()
    assert {"async_engine", "core_client", "request_stream", "step_loop"} <= set(graph)
    assert _cycle(graph) is None


def test_no_engine_module_imports_a_private_name_of_another_module():
    private = [(module, n.module, a.name) for module, nodes in _imports().items()
               for n in nodes if isinstance(n, ast.ImportFrom) and (n.module or "").startswith(
                   "llmserve.") for a in n.names if a.name.startswith("_")]
    assert private == []
