"""The packages are layered: no import cycles among a package's modules, and no module imports
another module's private (leading-underscore) names."""

from __future__ import annotations

import ast
import pathlib

import pytest

import llmserve

ROOT = pathlib.Path(llmserve.__file__).parent
PACKAGES = ("engine", "routing", "observability", "batch", "server/openai", "server/grpc",
            "server/openai/tool_parsers", "structured", "models", "kernels")


def _imports(package: str) -> dict[str, list[ast.ImportFrom | ast.Import]]:
    """Every import statement of each module: top level, TYPE_CHECKING and in functions."""
    found = {}
    for path in sorted((ROOT / package).glob("*.py")):
        tree = ast.parse(path.read_text())
        found[path.stem] = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return found


def _graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports."""
    prefix = f"llmserve.{package.replace('/', '.')}."
    graph = {}
    for module, nodes in _imports(package).items():
        names = [n.module for n in nodes if isinstance(n, ast.ImportFrom) and n.module]
        names += [a.name for n in nodes if isinstance(n, ast.Import) for a in n.names]
        # `from llmserve.routing import x` imports the module x as well
        names += [f"{prefix}{a.name}" for n in nodes if isinstance(n, ast.ImportFrom)
                  and n.module == prefix[:-1] for a in n.names]
        graph[module] = {name[len(prefix):].split(".")[0] for name in names
                         if name.startswith(prefix)}
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


def test_the_graph_sees_type_checking_and_function_level_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "pkgx"
    pkg.mkdir()
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from llmserve.pkgx.b import B\n")
    (pkg / "b.py").write_text("def f():\n    from llmserve.pkgx import a\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert _graph("pkgx") == {"a": {"b"}, "b": {"a"}}
    assert _cycle(_graph("pkgx")) == ["a", "b", "a"]


@pytest.mark.parametrize("package", PACKAGES)
def test_package_modules_import_each_other_without_cycles(package):
    graph = _graph(package)
    assert len(graph) > 3  # the package was found
    assert _cycle(graph) is None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_imports_a_private_name_of_another_module(package):
    private = [(module, n.module, a.name) for module, nodes in _imports(package).items()
               for n in nodes if isinstance(n, ast.ImportFrom) and (n.module or "").startswith(
                   "llmserve") for a in n.names if _private(a.name)]
    assert private == []


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_private_means_a_leading_underscore_but_not_a_dunder():
    assert _private("_finish") and not _private("__version__") and not _private("Router")
