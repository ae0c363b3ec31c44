"""Rebalance on real Ray nodes and a real Prefect server, with injected per-node metrics.

On one machine every node sees the same host, so the flows read metrics from a
StaticSource set with ``set_metrics_source``; the last test runs the real probe.
"""

from __future__ import annotations

import json
import uuid

import pytest

from grid_flows.core.units import NO_VALUE
from grid_flows import list_boosts
from grid_flows.flows.rebalance import (
    CLUSTER_ARTIFACT_KEY,
    PRESSURE_ARTIFACT_KEY,
    RECLAIMED_EVENT,
    SUMMARY_ARTIFACT_KEY,
    cluster_status_snapshot,
    rebalance,
    set_metrics_source,
)
from grid_flows.adapters.ray.metrics import RayProbeSource
from grid_flows.core.metrics import NO_GPU, StaticSource
from grid_flows.core.models import BoostState, utcnow
from grid_flows.errors import InvalidRequest
from grid_flows.adapters.prefect.store import BoostStore
from tests.conftest import server_events, sharing_settings, wait_for
from tests.grid_cli import grid_cli

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
NODES = ("gpu-master", "gpu1", "gpu2")
CALM = {"cpu_percent": 10, "memory_percent": 20, "swap_percent": 0}
BUSY = {"cpu_percent": 95, "memory_percent": 40, "swap_percent": 0}
MIDDLE = {"cpu_percent": 50, "memory_percent": 40, "swap_percent": 0}


@pytest.fixture
def metrics(grid):
    """Every node calm; tests change nodes with ``metrics.set(node, **values)``."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    source = StaticSource({name: CALM for name in NODES})
    set_metrics_source(source)
    try:
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield source
    finally:
        set_metrics_source(None)


@pytest.fixture
def run():
    """One rebalance round with a history of this test's own (the persisted one outlives runs)."""
    history = f"test-{uuid.uuid4().hex[:12]}"
    return lambda **kw: rebalance(history=history, **{"idle_samples": 2, **kw})


@pytest.fixture
def emitted(monkeypatch):
    """Events the store emits (still sent to the server)."""
    seen: list[tuple[str, str]] = []
    original = BoostStore.emit

    def spy(self, event, boost, **extra):
        seen.append((event, boost.id))
        return original(self, event, boost, **extra)

    monkeypatch.setattr(BoostStore, "emit", spy)
    return seen


def _actions(result) -> list[str]:
    return [d["action"] for d in result["decisions"]]


def _record(boost_id: str):
    with BoostStore() as store:
        return store.get(boost_id)


def _rebalance_boosts():
    return [b for b in list_boosts(target="gpu-master") if b.origin == "rebalance"]


def test_pressured_head_borrows_from_the_idle_lender_and_gives_it_back_when_calm(metrics, run):
    from prefect.artifacts import Artifact

    metrics.set("gpu-master", **BUSY)
    first = run()
    assert _actions(first) == ["none"] and _rebalance_boosts() == []  # one busy sample is noise

    second = run()
    assert _actions(second) == ["grant"], second
    assert second["decisions"][0]["outcome"].startswith("granted"), second
    [boost] = _rebalance_boosts()
    assert (boost.source, boost.target, boost.state) == ("gpu1", "gpu-master", BoostState.active)
    assert boost.resources.cpu == 1 and boost.resources.gpu == 0.5  # balanced: half of gpu1's free share

    # The pressure table of the run: one row per node, human columns, the decision and its reason.
    table = Artifact.get(PRESSURE_ARTIFACT_KEY)
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    by_node = {row["Node"]: row for row in rows}
    assert set(by_node) == set(NODES)
    assert by_node["gpu-master"]["CPU"] == "95 %"
    assert by_node["gpu-master"]["Decision"].startswith("grant 1 CPU, 0.5 GPU, 2 GiB from gpu1")
    assert "above high in the last 2 samples" in by_node["gpu-master"]["Reason"]
    assert by_node["gpu-master"]["Trend 5 min"] != NO_VALUE  # a trend ("flat" or "+0.1/min"), not the empty "—"
    assert "-" not in {cell for row in rows for cell in row.values()}  # the UI shows a lone "-" as a bullet

    snapshot = {row["Node"]: row for row in cluster_status_snapshot()}
    assert snapshot["gpu1"]["Lent"] == "1 CPU, 0.5 GPU, 2 GiB"
    assert snapshot["gpu-master"]["Borrowed"] == "1 CPU, 0.5 GPU, 2 GiB"
    assert snapshot["gpu2"]["Status"] == "alive"
    assert Artifact.get(CLUSTER_ARTIFACT_KEY) is not None

    metrics.set("gpu-master", cpu_percent=5, memory_percent=10, swap_percent=0)
    third = run()
    assert "release" not in _actions(third)  # calm once; idle_samples is 2
    assert "grant" not in _actions(third)  # one boost per borrower
    fourth = run()
    assert _actions(fourth) == ["release"], fourth
    assert _record(boost.id).state is BoostState.released
    assert _rebalance_boosts() == []


def test_busy_lender_reclaims_its_boost(metrics, run, emitted):
    metrics.set("gpu-master", **BUSY)
    run()
    run()
    [boost] = _rebalance_boosts()
    metrics.set("gpu-master", **MIDDLE)  # neither busy nor idle: no grant, no release
    metrics.set(boost.source, **BUSY)
    assert "reclaim" not in _actions(run())  # one busy sample of the lender is noise
    result = run()
    assert _actions(result) == ["reclaim"], result
    record = _record(boost.id)
    assert record.state is BoostState.preempted
    assert f"reclaimed by lender {boost.source}" in record.reason
    assert (RECLAIMED_EVENT, boost.id) in emitted
    # The controller emits grid.boost.* in the background: read them from the server.
    assert "grid.boost.preempted" in wait_for(lambda: server_events(boost.id),
                                              lambda ev: "grid.boost.preempted" in ev)
    assert _rebalance_boosts() == []


@pytest.mark.parametrize("change", [{"policy": "conservative"}, {"mode": "offload_only"}])
def test_conservative_policy_and_offload_only_mode_never_grant(metrics, run, grid, change):
    with sharing_settings(grid, **change):
        metrics.set("gpu-master", **BUSY)
        results = [run() for _ in range(3)]
        assert all(_actions(r) == ["none"] for r in results), results
        assert list(change.values())[0] in results[-1]["decisions"][0]["reason"]
        assert _rebalance_boosts() == []


def test_an_unreachable_node_is_reported_not_raised_and_a_quiet_run_says_so(metrics, run):
    from prefect.artifacts import Artifact

    metrics.drop("gpu2")
    result = run()
    assert result["unreachable"] == ["gpu2"]
    assert _actions(result) == ["none"]
    summary = Artifact.get(SUMMARY_ARTIFACT_KEY).data
    assert "Nothing to do" in summary and "Unreachable: gpu2" in summary
    rows = Artifact.get(PRESSURE_ARTIFACT_KEY).data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert {r["Node"]: r["Reachable"] for r in rows}["gpu2"].startswith("no: ")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"idle_samples": 0}, "idle_samples"),
        ({"probe_timeout_seconds": -1}, "probe_timeout_seconds"),
        ({"probe_timeout_seconds": float("inf")}, "probe_timeout_seconds"),
        ({"history": "Not A Name"}, "history name"),
    ],
)
def test_bad_parameters_fail_with_a_clear_message(metrics, kwargs, message):
    with pytest.raises(InvalidRequest, match=message):
        rebalance(**kwargs)




def test_cluster_and_sharing_status_commands(metrics, run, capsys):
    metrics.set("gpu-master", **BUSY)
    history = f"test-{uuid.uuid4().hex[:12]}"
    rebalance(history=history)
    rebalance(history=history)

    code, out, err = grid_cli(capsys, "cluster", "status", "--history", history, "--json")
    assert code == 0, err
    nodes = {n["node"]: n for n in json.loads(out)}
    assert nodes["gpu-master"]["role"] == "head" and nodes["gpu1"]["status"] == "alive"
    assert nodes["gpu-master"]["pressure"] == pytest.approx(0.675)
    assert nodes["gpu1"]["lent"]["cpu"] == 1
    code, out, err = grid_cli(capsys, "cluster", "status", "--history", history)
    assert code == 0 and "gpu-master" in out and "0.68" in out

    code, out, err = grid_cli(capsys, "resource-sharing", "status", "--json")
    assert code == 0, err
    sharing = json.loads(out)
    assert (sharing["policy"], sharing["mode"]) == ("balanced", "share_and_offload")
    assert [l["node"] for l in sharing["lenders"]] == ["gpu1", "gpu2"]
    assert sharing["borrowers"][0]["node"] == "gpu-master" and sharing["borrowers"][0]["by_rebalance"] == 1
    code, out, err = grid_cli(capsys, "resource-sharing", "status")
    assert code == 0 and "policy balanced" in out and "borrowers" in out

    code, out, err = grid_cli(capsys, "cluster", "status", "--history", "Bad Name")
    assert code == 2 and "history name" in err and "Traceback" not in err


def test_the_real_probe_samples_every_node(grid):
    readings = RayProbeSource(timeout_seconds=60).read([*NODES, "gpu9"], utcnow())
    for name in NODES:
        assert readings[name].reachable, readings[name].error
        assert readings[name].gpu.startswith(NO_GPU)
        assert 0 <= readings[name].sample.cpu_percent <= 100
    assert not readings["gpu9"].reachable and "not running" in readings["gpu9"].error


def test_the_probe_runs_on_a_node_whose_cpus_are_all_reserved(grid):
    from ray.util import placement_group, remove_placement_group

    from grid_flows.adapters.ray.cluster import NODE_LABEL

    group = placement_group([{"CPU": 2}], name=f"grid-boost-test-{uuid.uuid4().hex[:8]}",
                            bundle_label_selector=[{NODE_LABEL: "gpu2"}])
    try:
        assert group.wait(timeout_seconds=30)
        reading = RayProbeSource(timeout_seconds=60).read(["gpu2"], utcnow())["gpu2"]
        assert reading.reachable, reading.error
    finally:
        remove_placement_group(group)


def test_a_round_that_samples_no_node_fails_and_says_why(grid, metrics, run):
    for name in NODES:
        metrics.drop(name)
    state = run(return_state=True)
    assert state.is_failed(), state
    assert "could sample no node" in state.message and "gpu1" in state.message
    assert list_boosts() == []


PROBE_IN_A_NEW_PROCESS = """
import json, sys, time
from grid_flows.adapters.ray.metrics import RayProbeSource
from grid_flows.core.models import utcnow
nodes = sys.argv[1:]
source = RayProbeSource(timeout_seconds=5)
from grid_flows.adapters.ray import cluster as rc
rc.connect()
started = time.monotonic()
readings = source.read(nodes, utcnow())
print(json.dumps({"seconds": time.monotonic() - started,
                  "errors": {n: r.error for n, r in readings.items() if not r.reachable}}))
"""


def test_a_new_process_samples_every_node_within_the_probe_timeout(grid):
    # Each scheduled rebalance run is a new process; the probe actors it finds are warm.
    import subprocess
    import sys

    import ray

    from grid_flows.adapters.prefect.settings import RAY_NAMESPACE
    from grid_flows.adapters.ray.metrics import PROBE_ACTOR_PREFIX

    warm = RayProbeSource(timeout_seconds=90).read(list(NODES), utcnow())  # the first read may start them
    assert all(r.reachable for r in warm.values()), {n: r.error for n, r in warm.items()}
    for name in NODES:
        assert ray.get_actor(f"{PROBE_ACTOR_PREFIX}{name}", namespace=RAY_NAMESPACE) is not None
    out = subprocess.run([sys.executable, "-c", PROBE_IN_A_NEW_PROCESS, *NODES], env=grid.env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["errors"] == {} and result["seconds"] < 5
