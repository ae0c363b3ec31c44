"""The maintenance deployments' schedules (built locally; no Prefect server is contacted)."""

from __future__ import annotations

import pytest

from grid_flows.core.cluster_file import parse_cluster
from grid_flows.flows.maintenance import SCHEDULES, maintenance_deployments

pytestmark = pytest.mark.timeout(60)


def _intervals(deployments) -> dict[str, float]:
    return {d.name: d.schedules[0].schedule.interval.total_seconds() for d in deployments}


def test_rebalance_runs_on_the_clusters_interval_and_the_rest_on_their_own():
    spec = parse_cluster({"nodes": [{"name": "head", "role": "head"}],
                          "resource_sharing": {"rebalance_interval_seconds": 45}})
    intervals = _intervals(maintenance_deployments(spec=spec))
    assert intervals == {**{name: float(s) for name, (_, s) in SCHEDULES.items()}, "grid-rebalance": 45.0}
    assert _intervals(maintenance_deployments(0.1, spec=spec))["grid-rebalance"] == pytest.approx(4.5)
    assert all(d.concurrency_limit == 1 for d in maintenance_deployments(spec=spec))


def test_the_work_pool_file_declares_exactly_the_maintenance_schedules():
    # SCHEDULES is the one source; deployments/prefect.yaml must say the same (it is static
    # YAML for `prefect deploy`), and blocks/cluster.yaml's rebalance interval too.
    from pathlib import Path

    import yaml

    from grid_flows.core.cluster_file import load_cluster_file
    from grid_flows.flows.maintenance import SCHEDULES, triggers

    root = Path(__file__).resolve().parents[2]
    declared = yaml.safe_load((root / "deployments" / "prefect.yaml").read_text())["deployments"]
    maintenance = {d["name"]: d for d in declared if "maintenance" in d.get("tags", [])}
    assert set(maintenance) == set(SCHEDULES)
    for name, (flow_fn, seconds) in SCHEDULES.items():
        entry = maintenance[name]
        assert entry["schedules"] == [{"interval": seconds}], name
        path, func = entry["entrypoint"].split(":")
        assert func == flow_fn.fn.__name__ and (root / path).resolve() == Path(flow_fn.fn.__code__.co_filename).resolve()
        assert entry.get("triggers", []) == triggers(name), name
        assert "grid-cluster:default" in entry["tags"], name
    spec = load_cluster_file(root / "blocks" / "cluster.yaml")
    assert spec.resource_sharing.rebalance_interval_seconds == SCHEDULES["grid-rebalance"][1]


def test_a_lost_boost_runs_reconcile_through_an_automation():
    from grid_flows.flows.maintenance import maintenance_deployments

    from grid_flows.core.models import ClusterSpec

    spec = ClusterSpec.model_validate({"nodes": [{"name": "head", "role": "head", "cpu_count": 1, "memory_gb": 1}]})
    reconcile = next(d for d in maintenance_deployments(spec=spec) if d.name == "grid-reconcile")
    (trigger,) = reconcile.triggers
    assert trigger.expect == {"grid.boost.lost"}
    assert trigger.match.root == {"prefect.resource.id": "grid.boost.*", "grid.cluster": "default"}
    assert trigger.enabled and trigger.posture.value == "Reactive" and trigger.threshold == 1
    assert all(not d.triggers for d in maintenance_deployments(spec=spec) if d.name != "grid-reconcile")


def test_another_clusters_deployments_and_automation_are_its_own(monkeypatch):
    # Two clusters serving maintenance on one server: their deployments must not replace each
    # other's, and one's Automation must not run on the other's lost boosts.
    from grid_flows.core.models import ClusterSpec
    from grid_flows.errors import InvalidRequest

    spec = ClusterSpec.model_validate({"name": "lab", "nodes": [{"name": "head", "role": "head"}]})
    with pytest.raises(InvalidRequest, match="named 'lab' but this process is set to cluster 'default'"):
        maintenance_deployments(spec=spec)  # the flow runs would judge default's boosts
    monkeypatch.setenv("PREFECT_INTEGRATIONS_GRID_CLUSTER_BLOCK", "lab")
    deployments = maintenance_deployments(spec=spec)
    assert {d.name for d in deployments} == {f"{name}-lab" for name in SCHEDULES}
    assert all("grid-cluster:lab" in d.tags for d in deployments)
    (trigger,) = next(d for d in deployments if d.name == "grid-reconcile-lab").triggers
    assert trigger.match.root == {"prefect.resource.id": "grid.boost.*", "grid.cluster": "lab"}
    assert trigger.name == "grid-reconcile-lab on grid.boost.lost"
