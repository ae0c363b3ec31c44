"""Boosts on real Ray nodes with a real Prefect server: placement, isolation, limits, races."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import ray

from grid_flows import NoCapacity, list_boosts, release_boost, request_boost
from grid_flows.adapters.ray import cluster as rc
from grid_flows.core.models import BoostState
from grid_flows.adapters.ray.cluster import NODE_LABEL
from grid_flows.adapters.prefect.store import BOOSTS_ARTIFACT_KEY, BoostStore
from tests.conftest import boost_events, server_events, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _node_id(name: str) -> str:
    return rc.grid_nodes()[name].node_id


def test_grant_holds_the_bundle_on_the_chosen_source(grid):
    boost = request_boost("gpu-master", cpu=1, gpu=1, memory="1GiB", source="gpu1", duration="10m")

    group = rc.grid_groups()[boost.placement_group]
    assert boost.state is BoostState.active
    assert group.group_id == boost.placement_group_id
    assert group.state == "CREATED"
    assert group.node_id == _node_id("gpu1")
    assert 590 <= boost.seconds_left() <= 600
    free = rc.grid_nodes()["gpu1"].lendable_free
    assert (free.cpu, free.gpu) == (1, 0)
    # The record names the Ray cluster it was granted in, durably (reconcile's "lost" reason uses it).
    assert boost.ray_session and boost.ray_session == rc.session_name()
    with BoostStore() as store:
        assert store.get(boost.id).ray_session == boost.ray_session


def test_without_source_the_roomiest_lender_is_chosen_and_never_the_target(grid):
    first = request_boost("gpu-master", cpu=1)
    assert first.source == "gpu1"  # 2 of 2 CPU free to lend beats gpu2's 1 of 1 on node priority
    second = request_boost("gpu1", cpu=1)
    assert second.source == "gpu2"  # gpu1 is the target: never borrow from yourself


def test_reserved_cpus_are_not_usable_outside_the_boost_until_release(grid):
    boost = request_boost("gpu-master", cpu=2, source="gpu1")

    @ray.remote(num_cpus=3, max_retries=0)
    def needs_three_cpus():
        return ray.get_runtime_context().get_node_id()

    ref = needs_three_cpus.options(label_selector={NODE_LABEL: "gpu1"}).remote()
    ready, _ = ray.wait([ref], timeout=2)
    assert ready == [], "a task took CPUs that the boost reserves"

    release_boost(boost.id)
    assert ray.get(ref, timeout=30) == _node_id("gpu1")


def test_a_worker_never_lends_more_than_its_share_even_with_raw_capacity(grid):
    with pytest.raises(NoCapacity, match="gpu1 lends at most 2 CPU"):
        request_boost("gpu-master", cpu=3, source="gpu1")
    request_boost("gpu-master", cpu=2, source="gpu1")
    assert rc.grid_nodes()["gpu1"].free.cpu == 2  # two raw CPUs are still free ...
    with pytest.raises(NoCapacity, match="no node can lend 1 CPU"):
        request_boost("gpu-master", cpu=1, source="gpu1")  # ... but none of them is lendable
    assert len(list_boosts()) == 1
    assert len(rc.grid_groups()) == 1


def test_multi_resource_requests_are_all_or_nothing(grid):
    # gpu2 lends CPU and memory but no GPU: asking it for a GPU too must take nothing.
    with pytest.raises(NoCapacity):
        request_boost("gpu-master", cpu=1, gpu=1, source="gpu2")
    assert rc.grid_nodes()["gpu2"].lendable_free.cpu == 1
    assert list_boosts() == []
    assert rc.grid_groups() == {}


def test_release_frees_capacity_and_keeps_the_record(grid):
    boost = request_boost("gpu-master", cpu=2, source="gpu1")
    released = release_boost(boost.id[:10])
    assert released.state is BoostState.released
    assert boost.placement_group not in rc.grid_groups()
    # A request made at once gets the capacity: Ray's view of the node may show the lend
    # tokens back a moment after the group is gone, and a request waits for that.
    again = request_boost("gpu-master", cpu=2, source="gpu1")
    assert again.state is BoostState.active
    ended = {b.id: b for b in list_boosts(include_ended=True)}
    assert ended[boost.id].state is BoostState.released
    assert boost.id not in {b.id for b in list_boosts()}


def test_a_request_waits_for_rays_view_to_catch_up_with_the_records(grid):
    # A group outside grid-flows holds gpu1's lend tokens, as a just-removed boost's group
    # does until Ray's view of the node catches up: the records say gpu1 has room, Ray not.
    import threading
    import time

    from ray.util import placement_group

    from grid_flows.adapters.ray.tokens import bundle
    from grid_flows.core.models import Resources

    held = placement_group([bundle(Resources(cpu=2))], name="test-not-a-boost")  # only gpu1 lends 2 CPU
    assert held.wait(timeout_seconds=30)
    try:
        started = time.monotonic()
        with pytest.raises(NoCapacity, match="gpu1 has too little free to lend"):
            request_boost("gpu-master", cpu=2, source="gpu1")  # never freed: refused after the wait
        assert time.monotonic() - started >= 2.5
        threading.Timer(0.5, rc.remove_group, args=(held.id.hex(),)).start()  # freed while the request waits
        boost = request_boost("gpu-master", cpu=2, source="gpu1")
    finally:
        rc.remove_group(held.id.hex())
    assert boost.state is BoostState.active and boost.source == "gpu1"


def test_grid_boosts_artifact_and_events_follow_each_change(grid):
    from prefect.artifacts import Artifact

    def table() -> list[dict]:
        artifact = Artifact.get(BOOSTS_ARTIFACT_KEY)
        return json.loads(artifact.data) if artifact else []

    boost = request_boost("gpu-master", cpu=1, source="gpu2", priority="high", duration="30m")
    # The controller publishes the table just after it answers: poll, with a bound.
    table_now = wait_for(table, lambda rows: [row["Boost"] for row in rows] == [boost.short_id])
    assert [row["Boost"] for row in table_now] == [boost.short_id]
    assert list(table_now[0])[:3] == ["State", "Time left", "Boost"]  # readable at 1280 px
    assert table_now[0]["Source → Target"] == "gpu2 → gpu-master"
    assert table_now[0]["Time left"].endswith("min left")
    release_boost(boost.id)
    after = wait_for(table, lambda rows: boost.short_id not in [row["Boost"] for row in rows])
    assert boost.short_id not in [row["Boost"] for row in after]


def test_granted_and_released_events_are_emitted(grid):
    from prefect.events.worker import EventsWorker

    boost = request_boost("gpu-master", cpu=1, source="gpu2")
    release_boost(boost.id)
    EventsWorker.drain_all(timeout=10)
    deadline_events = wait_for(lambda: server_events(boost.id), lambda ev: len(ev) >= 2)
    assert deadline_events == ["grid.boost.granted", "grid.boost.released"]
    granted = next(e for e in boost_events(boost.id) if e["event"] == "grid.boost.granted")
    roles = {r["prefect.resource.role"]: r["prefect.resource.id"] for r in granted["related"]}
    assert roles == {"lender": "grid.node.gpu2", "borrower": "grid.node.gpu-master"}  # the feed can filter by node
    assert granted["payload"]["resources"] == "1 CPU"


def test_a_flow_runs_boost_events_name_the_flow_run(grid):
    from prefect import flow
    from prefect.context import get_run_context
    from prefect.events.worker import EventsWorker

    from grid_flows import boost

    @flow
    def asks() -> tuple[str, str]:
        with boost("gpu-master", cpu=1, source="gpu2", duration="1m") as granted:
            return granted.id, str(get_run_context().flow_run.id)

    boost_id, run_id = asks()
    EventsWorker.drain_all(timeout=10)
    events = wait_for(lambda: boost_events(boost_id), lambda ev: len(ev) >= 2)
    related = {r["prefect.resource.id"]: r["prefect.resource.role"] for r in events[0]["related"]}
    assert related[f"prefect.flow-run.{run_id}"] == "flow-run"


def test_a_boost_is_visible_and_releasable_from_another_process(grid):
    boost = request_boost("gpu-master", cpu=1, source="gpu1")
    env = grid.env()

    status = subprocess.run(
        [sys.executable, "-m", "grid_flows.cli.app", "boost", "status", "--json"],
        env=env, capture_output=True, text=True, timeout=90,
    )
    assert status.returncode == 0, status.stderr
    rows = json.loads(status.stdout)
    assert [r["id"] for r in rows] == [boost.id]
    assert rows[0]["source"] == "gpu1" and rows[0]["target"] == "gpu-master"

    listed = subprocess.run(
        [sys.executable, "-c", "import json, grid_flows; print(json.dumps([b.id for b in grid_flows.list_boosts()]))"],
        env=env, capture_output=True, text=True, timeout=90,
    )
    assert json.loads(listed.stdout.strip().splitlines()[-1]) == [boost.id], listed.stderr

    released = subprocess.run(
        [sys.executable, "-m", "grid_flows.cli.app", "boost", "release", boost.id[:8]],
        env=env, capture_output=True, text=True, timeout=90,
    )
    assert released.returncode == 0, released.stderr
    assert f"Released boost {boost.id}" in released.stdout
    assert list_boosts() == []
    assert rc.grid_groups() == {}


_REQUESTER = textwrap.dedent(
    """
    import json, sys
    from grid_flows import NoCapacity, request_boost
    results = []
    for _ in range(5):
        try:
            b = request_boost("gpu-master", cpu=0.5, source="gpu1", duration=600)
            results.append(b.id)
        except NoCapacity:
            results.append(None)
    print(json.dumps(results))
    """
)


def test_concurrent_requests_from_four_processes_never_exceed_the_share(grid):
    procs = [
        subprocess.Popen([sys.executable, "-c", _REQUESTER], env=grid.env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    granted: list[str] = []
    for proc in procs:
        out, errors = proc.communicate(timeout=150)
        assert proc.returncode == 0, errors
        granted += [g for g in json.loads(out.strip().splitlines()[-1]) if g]

    live = list_boosts()
    assert sorted(b.id for b in live) == sorted(granted)
    assert sum(b.resources.cpu for b in live if b.source == "gpu1") <= 2.0
    assert len(granted) == 4  # share 2 CPU / 0.5 each: every slot is used, none twice
    groups = rc.grid_groups()
    assert sorted(groups) == sorted(b.placement_group for b in live)
    assert all(groups[b.placement_group].group_id == b.placement_group_id for b in live)


def test_boost_records_survive_a_fresh_store_and_carry_every_field(grid):
    boost = request_boost("gpu-master", cpu=1, memory="512MiB", source="gpu2", priority="critical", duration="30m")
    with BoostStore() as store:
        again = store.get(boost.id)
    assert again == boost
    assert again.resources.memory == 512 * 1024**2
    assert (again.expires_at - again.granted_at).total_seconds() == 1800


def test_the_python_api_works_inside_a_running_event_loop(grid, monkeypatch):
    """An async flow calls the sync API with an event loop running: Prefect's block methods
    then return coroutines unless told otherwise, and the record list was read with no type id."""
    import asyncio

    from grid_flows.adapters.prefect import store as store_module
    from grid_flows.adapters.prefect.metrics_store import BlockHistoryStore

    monkeypatch.setattr(store_module, "_registered_types", {})  # register again, as a fresh process does

    async def in_a_loop():
        boost = request_boost("gpu-master", cpu=1, source="gpu1", duration="5m")
        listed = list_boosts(include_ended=True)
        release_boost(boost.id)
        return boost, listed, BlockHistoryStore("grid-test-async").load()

    boost, listed, history = asyncio.run(in_a_loop())
    assert boost.id in {b.id for b in listed}
    assert history == {}
