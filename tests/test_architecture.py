"""The layout's promises, checked on the real import graph (grimp, the library behind import-linter).

- No import cycle between any two modules of the project (TYPE_CHECKING imports excluded: they
  never run). The old layout hid a four-module cycle behind imports inside functions; grimp sees
  those too, so hiding one that way fails here.
- deliberation never imports research or simulation; modeling imports no Django app; services
  never import tasks (pyproject.toml's import-linter contracts say the same for `make lint`).
"""

from __future__ import annotations

import grimp
import pytest

PACKAGES = ("config", "accounts", "deliberation", "research", "simulation", "modeling")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True)


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return components


def test_the_import_graph_has_no_cycle(graph) -> None:
    assert _cycles(graph) == []


def test_the_cycle_check_would_catch_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for module in ("a", "a.x", "a.y"):
        graph.add_module(module)
    graph.add_import(importer="a.x", imported="a.y")
    graph.add_import(importer="a.y", imported="a.x")
    assert _cycles(graph) == [["a.x", "a.y"]]


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("deliberation", "research"),
        ("deliberation", "simulation"),
        ("modeling", "deliberation"),
        ("modeling", "research"),
        ("modeling", "config"),
        ("accounts", "deliberation"),
        ("deliberation.services", "deliberation.tasks"),
        ("research.services", "research.tasks"),
    ],
)
def test_forbidden_imports_stay_absent(graph, importer: str, imported: str) -> None:
    chain = graph.find_shortest_chain(importer=importer, imported=imported, as_packages=True)
    assert chain is None, f"{importer} reaches {imported} through {' -> '.join(chain)}"
