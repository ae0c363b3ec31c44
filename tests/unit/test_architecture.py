"""The package's folders are its layers; this checks they hold, the way Python sees them.

- The core loads neither Ray nor Prefect: each core module is imported alone in a fresh
  interpreter, which sees what an AST scan of one file cannot (imports made by a package
  ``__init__`` or by another module on the way).
- Each layer imports only the layers below it, including imports inside functions.
- No import cycle between packages.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import grid_flows

PACKAGE_DIR = Path(grid_flows.__file__).parent
MODULES = sorted(m.name for m in pkgutil.walk_packages(grid_flows.__path__, "grid_flows."))
CORE = [m for m in MODULES if m == "grid_flows.core" or m.startswith("grid_flows.core.")]
EDGES = ("ray", "prefect", "prefect_ray")

# The layers from the bottom up, and what each may import (besides itself).
LAYERS = ["errors", "core", "adapters.prefect", "adapters.host", "adapters.ray", "control", "runner", "flows",
          "api", "cli", "dev"]
ALLOWED = {layer: set(LAYERS[: i + 1]) for i, layer in enumerate(LAYERS)}
ALLOWED["adapters"] = {"errors", "core"}  # the folder's __init__
ALLOWED["api"] -= {"flows"}  # the Python API does not start flows; it shares their operations (control)

_PROBE = (
    "import importlib, json, sys; importlib.import_module(sys.argv[1]); "
    "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {'grid_flows', *sys.argv[2:]})))"
)


def _loaded(module: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _PROBE, module, *EDGES], capture_output=True, text=True,
                         timeout=60, check=True)
    return json.loads(out.stdout)


def loaded_edges(module: str) -> list[str]:
    """Which of EDGES a fresh interpreter has loaded after importing ``module`` alone."""
    return sorted({m.split(".")[0] for m in _loaded(module)} & set(EDGES))


def layer_of(module: str) -> str:
    """``grid_flows.adapters.ray.cluster`` -> ``adapters.ray``; ``grid_flows.core.ledger`` -> ``core``."""
    parts = module.split(".")[1:]
    if not parts:
        return "grid_flows"
    if parts[0] == "adapters" and len(parts) > 1:
        return "adapters." + parts[1]
    return parts[0]


def imports_of(module: str) -> set[str]:
    """Every grid_flows module ``module`` imports, at the top or inside a function."""
    path = PACKAGE_DIR.joinpath(*module.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    public = grid_flows._EXPORTS
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("grid_flows"):
            if node.module == "grid_flows":  # a public name or a subpackage
                found |= {public.get(a.name, f"grid_flows.{a.name}") for a in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("grid_flows.")}
    return found


def layer_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        if module == "grid_flows":
            continue
        graph.setdefault(layer_of(module), set()).update(layer_of(t) for t in imports_of(module))
    return {layer: targets - {layer} for layer, targets in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` as a path that ends where it starts, or [] when there is none."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node], _ = "open", path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node], _ = "done", path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


@pytest.mark.parametrize("module", CORE)
def test_a_core_module_loads_neither_ray_nor_prefect_nor_any_non_core_module(module):
    loaded = _loaded(module)
    assert sorted({m.split(".")[0] for m in loaded} & set(EDGES)) == []
    assert set(loaded) - {"grid_flows", "grid_flows.errors"} <= set(CORE)  # the core depends on the core only


def test_the_core_is_found_where_the_layout_says():
    assert {"grid_flows.core.placement", "grid_flows.core.ledger", "grid_flows.core.reconcile",
            "grid_flows.core.preemption", "grid_flows.core.policy", "grid_flows.core.pressure"} <= set(CORE)


def test_the_package_itself_loads_nothing_heavy():
    assert loaded_edges("grid_flows") == []
    assert loaded_edges("grid_flows.errors") == []


def test_the_probe_sees_an_edge_when_one_is_loaded():
    assert loaded_edges("grid_flows.runner.task_runner") == ["prefect", "prefect_ray", "ray"]


@pytest.mark.parametrize("module", [m for m in MODULES if m != "grid_flows"])
def test_each_module_imports_only_its_own_layer_and_the_layers_below(module):
    layer = layer_of(module)
    assert layer in ALLOWED, f"{module}: folder {layer!r} is not a known layer; add it to LAYERS"
    wrong = sorted(t for t in imports_of(module) if layer_of(t) not in ALLOWED[layer] | {layer})
    assert wrong == [], f"{module} ({layer}) may not import {wrong}"


def test_no_import_cycle_between_packages():
    assert find_cycle(layer_graph()) == []


@pytest.mark.parametrize(
    ("graph", "cycle"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),
    ],
)
def test_find_cycle(graph, cycle):
    assert find_cycle(graph) == cycle


def test_public_names_resolve_lazily():
    for name in grid_flows.__all__:
        assert getattr(grid_flows, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        grid_flows.nope  # noqa: B018


def test_the_collections_entry_point_registers_every_block_type():
    from importlib.metadata import entry_points

    from prefect.blocks.core import Block

    (entry,) = [e for e in entry_points(group="prefect.collections") if e.name == "grid_flows"]
    module = entry.load()
    slugs = {v.get_block_type_slug() for v in vars(module).values()
             if isinstance(v, type) and issubclass(v, Block) and v.__module__.startswith("grid_flows")}
    assert slugs == {"grid-cluster", "grid-boost", "grid-boost-history", "grid-metrics-history"}


def test_the_demo_finds_the_repositorys_cluster_file():
    from grid_flows.dev.demo import REPO

    assert (REPO / "blocks" / "cluster.yaml").is_file() and (REPO / "pyproject.toml").is_file()


@pytest.mark.parametrize("module", CORE)
def test_the_docstring_examples_of_the_core_hold(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
