"""Lifecycle on real Ray nodes and a real Prefect server: extend, reconcile, preemption, expiry."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta

import pytest
import ray
from prefect import flow, task

from grid_flows import BoostRayTaskRunner, NoCapacity, boosted, list_boosts, request_boost
from grid_flows.adapters.ray import cluster as rc
from grid_flows.control.boosts import extend, reconcile
from grid_flows.core.ledger import new_boost
from grid_flows.core.models import DEFAULT_CLUSTER, BoostState, Priority, Resources, utcnow
from grid_flows.errors import InvalidRequest
from grid_flows.adapters.prefect.store import BoostStore
from grid_flows.adapters.ray.tokens import bundle
from tests.conftest import controller_off

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _record(boost_id: str):
    with BoostStore() as store:
        return store.get(boost_id)


def test_extend_moves_the_end_within_the_limit(grid):
    boost = request_boost("gpu-master", cpu=1, source="gpu2", duration=60)
    longer = extend(boost.id[:8], "30m")
    assert (longer.expires_at - boost.expires_at).total_seconds() == 1800
    assert _record(boost.id).expires_at == longer.expires_at
    with pytest.raises(InvalidRequest, match="more than the limit of 7 d"):
        extend(boost.id, "7d")
    with pytest.raises(InvalidRequest, match="must not be negative"):
        extend(boost.id, -5)


def test_an_ended_boost_cannot_be_extended(grid):
    from grid_flows import release_boost

    boost = request_boost("gpu-master", cpu=1, source="gpu2")
    release_boost(boost.id)
    with pytest.raises(InvalidRequest, match="is released; only an active boost can be extended"):
        extend(boost.id, "10m")


def test_reconcile_removes_orphans_marks_lost_and_failed_and_is_idempotent(grid):
    orphan_name = "grid-boost-orphan" + uuid.uuid4().hex[:8]
    orphan = rc.start_boost_group(orphan_name, "gpu2", Resources(cpu=0.5))
    assert orphan.wait(timeout_seconds=10)

    lost = request_boost("gpu-master", cpu=1, source="gpu1")
    rc.remove_group(lost.placement_group_id)  # as if the group vanished behind our back

    stuck = new_boost(uuid.uuid4().hex, source="gpu1", target="gpu-master", resources=Resources(cpu=0.5),
                      priority=Priority.normal, duration_seconds=600, now=utcnow() - timedelta(seconds=300),
                      cluster=DEFAULT_CLUSTER)
    with BoostStore() as store:
        store.create(stuck)
    stuck_group = rc.start_boost_group(stuck.placement_group, "gpu1", stuck.resources)
    assert stuck_group.wait(timeout_seconds=10)

    report = reconcile(pending_timeout_seconds=120)
    assert report.removed_groups == [orphan_name]
    assert report.lost == [lost.id]
    assert report.failed == [stuck.id]
    assert _record(lost.id).state is BoostState.lost
    assert _record(stuck.id).state is BoostState.failed
    assert rc.grid_groups() == {}
    assert reconcile().changed is False  # idempotent: a second pass finds nothing


def test_reconcile_leaves_a_young_pending_request_alone(grid):
    young = new_boost(uuid.uuid4().hex, source="gpu2", target="gpu-master", resources=Resources(cpu=1),
                      priority=Priority.normal, duration_seconds=60, now=utcnow(),
                      cluster=DEFAULT_CLUSTER)
    with BoostStore() as store:
        store.create(young)
    group = rc.start_boost_group(young.placement_group, "gpu2", young.resources)
    assert group.wait(timeout_seconds=10)
    assert reconcile(pending_timeout_seconds=120).changed is False
    assert young.placement_group in rc.grid_groups()
    assert _record(young.id).state is BoostState.pending
    with BoostStore() as store:
        from grid_flows.control.boosts import end
        from grid_flows.core.ledger import Event

        end(store, young.id, Event.fail, "test cleanup")


def test_higher_priority_preempts_lower_and_never_equal(grid):
    low = request_boost("gpu-master", cpu=2, source="gpu1", priority="low")
    with pytest.raises(NoCapacity):
        request_boost("gpu-master", cpu=2, source="gpu1", priority="low")  # equal: never

    high = request_boost("gpu-master", cpu=2, source="gpu1", priority="high")
    victim = _record(low.id)
    assert victim.state is BoostState.preempted
    assert f"preempted by a high boost {high.short_id}" in victim.reason
    assert high.state is BoostState.active
    assert rc.grid_groups().keys() == {high.placement_group}
    with pytest.raises(NoCapacity):
        request_boost("gpu-master", cpu=1, source="gpu1", priority="normal")  # lower than high: no


def test_a_preemption_that_cannot_complete_leaves_the_victim_holding_its_capacity(grid, monkeypatch):
    controller_off(monkeypatch)  # the failure is injected into this process's boosts module
    from grid_flows.control import boosts as boost_ops

    low = request_boost("gpu-master", cpu=2, source="gpu1", priority="low")
    real_start = rc.start_boost_group

    def unplaceable(name, source, resources):  # as if the lender could not take the preemptor's group
        return real_start(name, source if name == low.placement_group else "no-such-node", resources)

    monkeypatch.setattr(boost_ops.rc, "start_boost_group", unplaceable)
    with pytest.raises(NoCapacity):
        request_boost("gpu-master", cpu=2, source="gpu1", priority="high")
    monkeypatch.undo()

    kept = _record(low.id)
    assert kept.state is BoostState.active and kept.preempted_by == ""
    assert "kept: the preemption by" in kept.reason
    groups = rc.grid_groups()
    assert groups.keys() == {low.placement_group}  # the preemptor left nothing; the victim holds again
    assert groups[low.placement_group].group_id == kept.placement_group_id != low.placement_group_id
    assert groups[low.placement_group].state == "CREATED"
    assert [b.id for b in list_boosts()] == [low.id]
    assert reconcile().changed is False  # Ray and the record agree


def test_preemption_gives_running_tasks_their_grace(grid):
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    low = request_boost("gpu-master", cpu=2, source="gpu1", priority="low")

    @ray.remote(num_cpus=1, max_retries=0)
    def short_job() -> str:
        time.sleep(1.5)
        return "finished"

    strategy = PlacementGroupSchedulingStrategy(rc.group_handle(low.placement_group_id), 0)
    job = short_job.options(scheduling_strategy=strategy).remote()
    deadline = time.monotonic() + 30
    while rc.group_idle(low.placement_group_id, bundle(low.resources)) and time.monotonic() < deadline:
        time.sleep(0.05)  # until the job holds its CPU in the group
    started = time.monotonic()
    high = request_boost("gpu-master", cpu=2, source="gpu1", priority="critical")
    waited = time.monotonic() - started
    assert ray.get(job, timeout=30) == "finished"  # not killed: it finished within the grace
    assert waited < 3 + 2.0  # grace is 3 s in the test cluster; the job needed ~1.5 s
    assert high.state is BoostState.active


@task
def where(i: int, seconds: float) -> dict:
    start = time.time()
    time.sleep(seconds)
    ctx = ray.get_runtime_context()
    return {"i": i, "group": ctx.get_placement_group_id() or "", "start": start, "end": time.time()}


def test_a_preempted_flow_continues_on_its_target(grid):
    results: dict = {}

    @boosted(cpu=2, source="gpu1", priority="low", duration="10m")
    @flow(task_runner=BoostRayTaskRunner(allow_offload=False))
    def victim_flow() -> list[dict]:
        return [f.result(timeout=150) for f in where.map(range(12), seconds=0.5)]

    runner = threading.Thread(target=lambda: results.setdefault("rows", victim_flow()))
    runner.start()
    deadline = time.monotonic() + 60
    while not list_boosts() and time.monotonic() < deadline:
        time.sleep(0.1)  # until the victim flow holds its boost
    (victim,) = list_boosts()
    preemptor = request_boost("gpu-master", cpu=2, source="gpu1", priority="high")
    preempted_at = time.time()
    runner.join(timeout=150)
    assert not runner.is_alive()
    rows = results["rows"]
    assert sorted(r["i"] for r in rows) == list(range(12))  # nothing lost
    late = [r for r in rows if r["start"] > preempted_at + 3.5]  # after routing stopped and the grace
    assert all(r["group"] != victim.placement_group_id for r in late)
    assert _record(victim.id).state is BoostState.preempted
    assert _record(preemptor.id).state is BoostState.active


def test_the_runner_stops_at_expiry_and_ends_the_boost_itself(grid):
    @boosted(cpu=2, source="gpu1", duration=3)
    @flow(task_runner=BoostRayTaskRunner(allow_offload=False))
    def outlives_its_boost() -> list[dict]:
        futures = where.map(range(10), seconds=1.0)
        rows = [f.result(timeout=150) for f in futures]
        for row, future in zip(rows, futures):
            row["dispatched_at"], row["kind"] = future.dispatched_at, future.placement.kind.value
        return rows

    before = {b.id for b in list_boosts(include_ended=True)}
    rows = outlives_its_boost()
    (boost,) = [b for b in list_boosts(include_ended=True) if b.id not in before]
    assert boost.state is BoostState.expired
    # Its runner ends it once idle; the controller, told the flow holds it, at the end of the
    # grace (3 s here): whichever comes first.
    assert boost.reason in ("expired while its flow ran",
                            f"expired at {boost.expires_at:%H:%M:%S} UTC, after its 3 s grace (a flow was using it)")
    expires = boost.expires_at.timestamp()
    after = [r for r in rows if r["dispatched_at"] > expires]
    assert after, "no task was dispatched after the boost expired"
    assert all(r["kind"] != "boost" and not r["group"] for r in after)
    # Ended within the grace for its last tasks: no schedule needed.
    assert (boost.ended_at - boost.expires_at).total_seconds() < 3 + 1.5
    assert sorted(r["i"] for r in rows) == list(range(10))
