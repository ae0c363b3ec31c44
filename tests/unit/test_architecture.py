"""The pure core loads neither Ray nor Prefect, checked by what a fresh interpreter loads.

An AST scan of one file cannot see an import made by a package ``__init__`` or by another
module on the way; importing each core module alone in a new interpreter can.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CORE = [
    "grid_flows.models",
    "grid_flows.units",
    "grid_flows.ledger",
    "grid_flows.scheduler",
    "grid_flows.preemption",
    "grid_flows.pressure",
    "grid_flows.policy",
    "grid_flows.reconcile",
    "grid_flows.requirements",
    "grid_flows.cluster_file",
]
EDGES = ("ray", "prefect", "prefect_ray")
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


@pytest.mark.parametrize("module", CORE)
def test_a_core_module_loads_neither_ray_nor_prefect_nor_any_non_core_module(module):
    loaded = _loaded(module)
    assert sorted({m.split(".")[0] for m in loaded} & set(EDGES)) == []
    assert set(loaded) - {"grid_flows"} <= set(CORE)  # the core depends on the core only


def test_the_package_itself_loads_nothing_heavy():
    assert loaded_edges("grid_flows") == []


def test_the_probe_sees_an_edge_when_one_is_loaded():
    assert loaded_edges("grid_flows.runner") == ["prefect", "prefect_ray", "ray"]


def test_public_names_resolve_lazily():
    import grid_flows

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
