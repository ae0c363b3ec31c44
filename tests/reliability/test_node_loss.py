"""A lender dies in the middle of a boosted flow; the Prefect server restarts under live boosts."""

from __future__ import annotations

import threading
import time

import pytest
import ray
from prefect import flow, task

from grid_flows import BoostRayTaskRunner, boosted, list_boosts, request_boost
from grid_flows.adapters.ray import cluster as rc
from grid_flows.adapters.ray import local_cluster
from tests.conftest import controller_off
from grid_flows.core.cluster_file import parse_cluster
from grid_flows.core.models import BoostState
from grid_flows.adapters.ray.tokens import bundle

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture
def lossy_cluster(grid):
    """A cluster of its own whose workers may die; Ray notices a dead node in under a second.

    It shares the session's Prefect server, so it starts from a clean ledger (``grid``):
    records of the session cluster's boosts would otherwise look lost from this one.
    """
    from tests.conftest import TEST_CLUSTER

    rc.shutdown()  # leave the session cluster for this test
    with local_cluster.LocalCluster(parse_cluster(TEST_CLUSTER), fast_health_check=True) as cluster:
        yield cluster
    rc.connect(grid.address)


@task
def step(i: int) -> dict:
    start = time.time()
    time.sleep(1.0)
    return {"i": i, "group": ray.get_runtime_context().get_placement_group_id() or "", "start": start}


def test_a_dead_lender_loses_its_boost_and_the_flow_finishes_on_the_target(lossy_cluster):
    from grid_flows.control.boosts import reconcile

    results: dict = {}

    @boosted(cpu=2, source="gpu1", duration="10m")
    @flow(task_runner=BoostRayTaskRunner(allow_offload=False))
    def keeps_going() -> list[dict]:
        return [f.result(timeout=180) for f in step.map(range(10))]

    runner = threading.Thread(target=lambda: results.setdefault("rows", keeps_going()))
    runner.start()
    deadline = time.monotonic() + 90
    boost = None
    while time.monotonic() < deadline:
        live = list_boosts()
        if live and not rc.group_idle(live[0].placement_group_id, bundle(live[0].resources)):
            boost = live[0]
            break
        time.sleep(0.05)  # until a task runs inside the boost
    assert boost is not None, "no task ran in the boost"
    killed_at = time.time()
    lossy_cluster.stop_node("gpu1")
    runner.join(timeout=200)
    assert not runner.is_alive()

    rows = results["rows"]
    assert sorted(r["i"] for r in rows) == list(range(10))  # the task lost with gpu1 ran again
    record = next(b for b in list_boosts(include_ended=True) if b.id == boost.id)
    assert record.state is BoostState.lost
    assert "gpu1 is down" in record.reason
    assert record.ended_at.timestamp() - killed_at < 5  # health check ~0.6 s, runner refresh 1 s
    assert all(not r["group"] for r in rows if r["start"] > record.ended_at.timestamp())
    assert reconcile().changed is False  # the runner already made Ray and the record agree


@task
def offloaded_step(i: int) -> dict:
    start = time.time()
    time.sleep(1.0)
    return {"i": i, "node": ray.get_runtime_context().get_node_id(), "start": start}


def test_a_dead_lender_does_not_hang_tasks_offloaded_onto_its_share(lossy_cluster):
    # Offloaded tasks (no boost) once kept Ray's retries: a retry waits forever for a dead
    # lender's label. Now the runner re-places a task lost with its node, as for boosts.
    results: dict = {}
    gpu1 = rc.grid_nodes()["gpu1"]

    @flow(task_runner=BoostRayTaskRunner(allow_offload=True))
    def spreads() -> list[dict]:
        return [f.result(timeout=180) for f in offloaded_step.map(range(8))]

    runner = threading.Thread(target=lambda: results.setdefault("rows", spreads()))
    runner.start()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and rc.grid_nodes()["gpu1"].lendable_free.cpu >= gpu1.lendable_total.cpu:
        time.sleep(0.05)  # until a task runs on gpu1's share
    assert rc.grid_nodes()["gpu1"].lendable_free.cpu < gpu1.lendable_total.cpu, "no task was offloaded to gpu1"
    killed_at = time.time()
    lossy_cluster.stop_node("gpu1")
    runner.join(timeout=120)
    assert not runner.is_alive(), "the flow hung on a task lost with its lender"
    rows = results["rows"]
    assert sorted(r["i"] for r in rows) == list(range(8))  # the tasks lost with gpu1 ran again
    assert all(r["node"] != gpu1.node_id for r in rows if r["start"] > killed_at + 2)


def test_restarting_the_prefect_server_loses_no_boost(tmp_path, grid, monkeypatch):
    """A real `prefect server` on SQLite in tmp_path, stopped and started again under a live boost.
    Another server than the session's: the session's controller keeps its records there, so
    this process changes them itself (make e2e restarts the controller's own server)."""
    controller_off(monkeypatch)
    from grid_flows.dev.local_prefect import local_prefect_server
    from grid_flows.adapters.prefect.store import BoostStore

    home = tmp_path / "prefect"
    with local_prefect_server(home) as api_url:
        with BoostStore() as store:
            store.save_cluster(grid.spec)
        boost = request_boost("gpu-master", cpu=1, source="gpu2", duration="10m")
        port = int(api_url.rsplit(":", 1)[1].split("/")[0])
    assert boost.placement_group in rc.grid_groups()  # Ray kept the group while the server was down
    with local_prefect_server(home, port=port):
        (again,) = list_boosts()
        assert again == boost
        from grid_flows import release_boost

        assert release_boost(boost.id).state is BoostState.released
    assert rc.grid_groups() == {}


def test_a_dead_lender_ends_its_boost_lost_at_once_with_no_flow_and_no_reconcile(lossy_cluster):
    """The controller sees the lender die: ``grid.boost.lost`` follows within seconds, which an
    Automation can react to, not at the next scheduled reconcile (every 5 minutes)."""
    from tests.conftest import server_events, wait_for

    boost = request_boost("gpu-master", cpu=1, source="gpu1", duration="10m")
    killed_at = time.time()
    lossy_cluster.stop_node("gpu1")

    def record():
        return next(b for b in list_boosts(include_ended=True) if b.id == boost.id)

    ended = wait_for(record, lambda b: b.state.ended, timeout=30)
    assert ended.state is BoostState.lost and "gpu1" in ended.reason
    assert ended.ended_at.timestamp() - killed_at < 6  # health check ~0.6 s, the controller looks every 2 s
    assert "grid.boost.lost" in wait_for(lambda: server_events(boost.id), lambda names: "grid.boost.lost" in names)
