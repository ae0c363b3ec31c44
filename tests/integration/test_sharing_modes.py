"""The runner's use of lent capacity in each sharing mode, on real Ray nodes and a real Prefect server.

The test cluster: gpu-master (1 CPU, the flows' target), gpu1 lends 2 CPU, gpu2 lends 1 CPU.
The only fake is the node metrics of the dynamic_balancing test (one machine has one load).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import ray
from prefect import flow, task

from grid_flows import BoostRayTaskRunner, list_boosts, request_boost, requires
from grid_flows.control import boosts as boost_ops
from grid_flows.adapters.ray import cluster as rc
from grid_flows.adapters.prefect.metrics_store import BlockHistoryStore
from grid_flows.core.metrics import history_to_data
from grid_flows.core.models import BoostState, utcnow
from grid_flows.errors import InvalidRequest
from grid_flows.core.pressure import MetricsHistory, NodeSample
from grid_flows.adapters.prefect.store import BoostStore
from tests.conftest import placements_artifact, sharing_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)  # polling a file condition, bounded by the deadline
    return True


@task
def where(i: int, seconds: float = 0.0, started: str = "", meet: str = "", party: int = 0,
          hold_until: str = "", mark_grouped: str = "") -> dict:
    """Where this task ran. Files coordinate it with the test and its siblings:
    ``started`` is touched on start; with ``meet``, it waits until ``party`` tasks are running at
    once; a task in a placement group touches ``mark_grouped``; task 0, when outside a group,
    waits until ``hold_until`` exists. Every wait gives up after 60 s and says so in the result."""
    ctx = ray.get_runtime_context()
    group = ctx.get_placement_group_id() or ""
    start = time.time()
    if started:
        Path(started).touch()
    if mark_grouped and group:
        Path(mark_grouped).touch()
    met = True
    if meet:
        Path(meet, str(i)).touch()
        met = _wait_for(lambda: len(list(Path(meet).iterdir())) >= party, 60)
    if hold_until and i == 0 and not group:
        met = _wait_for(Path(hold_until).exists, 60) and met
    time.sleep(seconds)
    return {"i": i, "node_id": ctx.get_node_id(), "group": group, "start": start, "end": time.time(), "met": met}


def _names() -> dict[str, str]:
    return {info.node_id: name for name, info in rc.grid_nodes().items()}


@contextlib.contextmanager
def metrics_history(busy_node: str):
    """The persisted history the runner reads: ``busy_node`` at 95% CPU in its last two samples."""
    now = utcnow()
    history = MetricsHistory()
    for age in (12, 2):
        for node in ("gpu-master", "gpu1", "gpu2"):
            cpu = 95 if node == busy_node else 10
            history.add(NodeSample(node, now - timedelta(seconds=age), cpu, 20, 0))
    store = BlockHistoryStore()
    store.save(history_to_data(history))
    try:
        yield
    finally:
        store.save({})


def test_share_and_offload_routes_queued_tasks_into_a_boost_granted_to_the_node_mid_flow(grid, tmp_path):
    started, grouped = tmp_path / "started", tmp_path / "a-task-ran-in-a-group"
    results: dict = {}

    @flow(task_runner=BoostRayTaskRunner(allow_offload=False))
    def eight_on_a_one_cpu_head() -> list[dict]:
        # Task 0 holds the head's only CPU until a task has run inside a boost: the other
        # seven stay queued until the runner picks up the boost granted below.
        futures = where.map(range(8), seconds=0.2, started=str(started), hold_until=str(grouped),
                            mark_grouped=str(grouped))
        return [f.result(timeout=120) for f in futures]

    thread = threading.Thread(target=lambda: results.setdefault("rows", eight_on_a_one_cpu_head()))
    thread.start()
    try:
        assert _wait_for(started.exists, 90), "the flow's first task did not start"
        # What the rebalance flow does for a busy head (origin "rebalance"); not attached to the flow.
        granted = boost_ops.request("gpu-master", cpu=2, source="gpu1", duration="10m", origin="rebalance")
    finally:
        thread.join(timeout=150)
    assert not thread.is_alive()
    rows = results["rows"]
    names = _names()
    assert sorted(r["i"] for r in rows) == list(range(8))
    assert all(r["met"] for r in rows), "the head's task gave up: no queued task moved into the node's boost"
    in_boost = [r for r in rows if r["group"] == granted.placement_group_id]
    assert in_boost and all(names[r["node_id"]] == "gpu1" for r in in_boost)
    assert min(r["start"] for r in in_boost) >= granted.granted_at.timestamp()
    assert all(names[r["node_id"]] == "gpu-master" for r in rows if r not in in_boost)  # offload is off
    # The runner only borrowed it: the boost is the node's, and still active after the flow.
    with BoostStore() as store:
        assert store.get(granted.id).state is BoostState.active


def test_share_and_offload_lends_only_once_the_target_is_saturated(grid, tmp_path):
    @flow(task_runner=BoostRayTaskRunner(strategy="spread"))
    def two_small_then_one_big() -> list[dict]:
        with requires(cpu=0.5):  # both run at once (they meet), so the second is placed beside the first
            small = [f.result(timeout=90) for f in where.map(range(2), meet=str(tmp_path), party=2)]
        with requires(cpu=2):
            big = where.submit(2).result(timeout=60)
        return small + [big]

    rows = two_small_then_one_big()
    names = _names()
    assert all(r["met"] for r in rows)
    # spread would put the second small task on an idle lender; the head still had room for it.
    assert [names[r["node_id"]] for r in rows[:2]] == ["gpu-master", "gpu-master"]
    assert names[rows[2]["node_id"]] == "gpu1" and rows[2]["group"] == ""  # offloaded within gpu1's 2 CPU
    assert list_boosts() == []


def test_offload_only_grants_no_boost_and_offloads_within_the_lenders_share(grid, tmp_path):
    meet = tmp_path / "meet"
    meet.mkdir()
    with sharing_settings(grid, mode="offload_only"):
        with pytest.raises(InvalidRequest, match="offload_only: boosts are off"):
            request_boost("gpu-master", cpu=1, source="gpu1")
        assert list_boosts() == [] and rc.grid_groups() == {}  # the rejected request left nothing behind

        @flow(task_runner=BoostRayTaskRunner())
        def four_at_once() -> list[dict]:
            return [f.result(timeout=90) for f in where.map(range(4), meet=str(meet), party=4)]

        rows = four_at_once()
    names = _names()
    ran_on = sorted(names[r["node_id"]] for r in rows)
    # 1 CPU of the head, 2 lent by gpu1, 1 by gpu2: all four ran at once, none in a group.
    assert all(r["met"] for r in rows)
    assert ran_on == ["gpu-master", "gpu1", "gpu1", "gpu2"]
    assert all(r["group"] == "" for r in rows)
    assert list_boosts() == []


def test_offload_only_runner_ignores_a_boost_granted_to_the_node(grid):
    node_boost = boost_ops.request("gpu-master", cpu=2, source="gpu1", duration="10m", origin="rebalance")
    with sharing_settings(grid, mode="offload_only"):

        @flow(task_runner=BoostRayTaskRunner(allow_offload=False))
        def three() -> list[dict]:
            return [f.result(timeout=90) for f in where.map(range(3), seconds=0.2)]

        rows = three()
    names = _names()
    assert {names[r["node_id"]] for r in rows} == {"gpu-master"}
    assert all(r["group"] != node_boost.placement_group_id for r in rows)


@pytest.mark.parametrize("mode, expected", [("dynamic_balancing", "lender"), ("share_and_offload", "gpu-master")])
def test_dynamic_balancing_moves_work_off_a_busy_target(grid, mode, expected):
    with sharing_settings(grid, mode=mode), metrics_history(busy_node="gpu-master"):

        @flow(task_runner=BoostRayTaskRunner())
        def one_small() -> dict:
            with requires(cpu=0.5):
                return where.submit(0).result(timeout=60)

        row = one_small()
    node = _names()[row["node_id"]]
    # The head had room for the task either way; only dynamic_balancing reads its pressure.
    assert (node if node == "gpu-master" else "lender") == expected
    assert row["group"] == ""


def test_rejected_boost_requests_name_the_setting(grid):
    with sharing_settings(grid, enabled=False):
        with pytest.raises(InvalidRequest, match="resource_sharing.enabled is false"):
            request_boost("gpu-master", cpu=1)
    assert list_boosts() == [] and rc.grid_groups() == {}


def test_a_boosted_flow_in_offload_only_runs_unboosted_or_fails_as_asked(grid):
    from grid_flows import BoostsDisabled, boosted

    @boosted(cpu=2, source="gpu1", duration="5m")  # on_unavailable="run": warn and run
    @flow(task_runner=BoostRayTaskRunner(allow_offload=False))
    def tolerant() -> list[dict]:
        return [f.result(timeout=60) for f in where.map(range(2))]

    @boosted(cpu=2, source="gpu1", duration="5m", on_unavailable="fail")
    @flow
    def strict() -> None: ...

    with sharing_settings(grid, mode="offload_only"):
        rows = tolerant()
        with pytest.raises(BoostsDisabled, match="offload_only"):
            strict()
    assert {_names()[r["node_id"]] for r in rows} == {"gpu-master"}
    assert list_boosts() == [] and rc.grid_groups() == {}


@task
def gpu_probe() -> dict:
    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "group": ctx.get_placement_group_id() or "",
            "gpus": [str(g) for g in ray.get_gpu_ids()], "nice": os.nice(0)}


def test_a_gpu_task_the_head_cannot_run_is_offloaded_to_the_gpu_lender_under_its_mode(grid):
    from grid_flows.adapters.ray import throttle

    throttle.kill_throttle("gpu1")  # count this test's GPU starts from zero
    try:

        @flow(task_runner=BoostRayTaskRunner())
        def one_gpu_task() -> dict:
            with requires(cpu=1, gpu=1):  # the head has no GPU; gpu1 lends its one
                return gpu_probe.submit().result(timeout=90)

        row = one_gpu_task()
        assert _names()[row["node_id"]] == "gpu1" and row["group"] == ""
        assert len(row["gpus"]) == 1  # Ray gave the task gpu1's (logical) GPU
        assert row["nice"] >= 10  # gpu1 is conservative: the runner's task wrapper lowered it
        assert throttle.throttle_starts("gpu1") == 1  # and the GPU start went through gpu1's throttle
    finally:
        throttle.kill_throttle("gpu1")


def test_load_balanced_offloads_to_the_calm_lender_and_the_placements_show_the_pressure(grid, tmp_path):
    from prefect.context import get_run_context

    meet = tmp_path / "meet"
    meet.mkdir()
    with metrics_history(busy_node="gpu1"):  # gpu1 at 95% CPU, gpu2 calm: equal before, pressure tells them apart

        @flow(task_runner=BoostRayTaskRunner(strategy="load_balanced"))
        def two_at_once() -> tuple:
            with requires(cpu=1):  # the head has 1 CPU: the second task must go to a lender
                futures = [where.submit(i, meet=str(meet), party=2) for i in range(2)]
                return [f.result(timeout=90) for f in futures], str(get_run_context().flow_run.id)

        rows, run_id = two_at_once()
    names = _names()
    assert all(r["met"] for r in rows), rows  # both ran at the same time
    assert sorted(names[r["node_id"]] for r in rows) == ["gpu-master", "gpu2"]
    table = {r["Node"]: r for r in json.loads(placements_artifact(run_id).data)}
    assert table["gpu2"]["Decision"] == "offload" and table["gpu2"]["Pressure"] == "0.15"
    assert table["gpu-master"]["Pressure"] == "0.15"
