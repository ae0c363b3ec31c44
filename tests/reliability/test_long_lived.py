"""What a long-lived deployment meets: a long history, reconcile beside requests, a Prefect
Cloud API key, a share lowered by an admin, grants that fail half way. Real Ray nodes and a
real Prefect server throughout."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import ray
from prefect import flow, task

from grid_flows import BoostRayTaskRunner, NoCapacity, boosted, list_boosts, release_boost, request_boost
from grid_flows.control import boosts as boosts_module
from grid_flows.adapters.ray import cluster as rc
from grid_flows.adapters.prefect.blocks import GridBoostHistory
from grid_flows.control.boosts import reconcile
from grid_flows.core.ledger import Event, check_invariants, new_boost, transition
from grid_flows.core.models import DEFAULT_CLUSTER, BoostState, Priority, Resources, utcnow
from grid_flows.errors import UnknownBoost
from grid_flows.adapters.prefect.store import BoostStore
from tests.conftest import changed_cluster, controller_off, sharing_settings
from tests.grid_cli import grid_cli

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
REPO = Path(__file__).resolve().parents[2]


def _ended(minutes_ago: float) -> object:
    now = utcnow() - timedelta(minutes=minutes_ago)
    boost = new_boost(uuid.uuid4().hex, source="gpu2", target="gpu-master", resources=Resources(cpu=1),
                      priority=Priority.normal, duration_seconds=60, now=now, requested_by="test",
                      cluster=DEFAULT_CLUSTER)
    boost = transition(boost, Event.grant, now, placement_group_id="00" * 14)
    return transition(boost, Event.release, now, reason="ended long ago")


def _write_history(count: int) -> list[str]:
    ids = []
    with BoostStore() as store:
        for i in range(count):
            boost = _ended(minutes_ago=i + 1)
            store._create(GridBoostHistory, boost)
            ids.append(boost.id)
    return ids


def test_status_release_and_reconcile_work_past_200_ended_boosts_and_the_history_is_trimmed(grid, capsys):
    # Prefect's per-type listing ignores offset/limit: paging over it never ended at 200 records.
    written = _write_history(205)  # one page of the listing is 200
    live = request_boost("gpu-master", cpu=1, source="gpu2")

    code, out, _ = grid_cli(capsys, "boost", "status", "--all", "--json")
    assert code == 0
    listed = {b["id"] for b in json.loads(out)}
    assert set(written) <= listed and live.id in listed

    code, out, _ = grid_cli(capsys, "boost", "status", "--json")  # live only: the history is not read
    assert code == 0 and [b["id"] for b in json.loads(out)] == [live.id]

    with pytest.raises(UnknownBoost):
        release_boost("f" * 32)  # an unknown full id: one read by name
    assert release_boost(written[0]).state is BoostState.released  # an ended id: returned unchanged

    with BoostStore() as store:  # other tests' boosts may have ended more recently than these
        newest_first = sorted(store.history(), key=lambda b: b.ended_at, reverse=True)
    with sharing_settings(grid, history_keep_count=50):
        report = reconcile()
    assert set(report.pruned) == {b.id for b in newest_first[50:]}
    assert set(written[50:]) <= set(report.pruned)
    with BoostStore() as store:
        kept = store.history()
    assert {b.id for b in kept} == {b.id for b in newest_first[:50]}  # the newest 50 are kept
    assert [b.id for b in list_boosts()] == [live.id]


def _run_requesters(grid, tmp_path: Path, processes: int, rounds: int) -> list[Path]:
    outs = [tmp_path / f"requester-{i}.jsonl" for i in range(processes)]
    procs = [
        subprocess.Popen([sys.executable, "-m", "tests.reliability.requester", str(rounds), str(out)],
                         cwd=REPO, env=grid.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for out in outs
    ]
    passes = 0
    while any(p.poll() is None for p in procs):
        reconcile(pending_timeout_seconds=120)  # in a tight loop, beside the requests
        passes += 1
    for p in procs:
        assert p.wait(timeout=10) == 0, p.stderr.read().decode()[-2000:]
    assert passes >= 3
    return outs


def test_reconcile_in_a_tight_loop_beside_four_requesters_loses_no_live_boost(grid, tmp_path):
    outs = _run_requesters(grid, tmp_path, processes=4, rounds=4)
    rows = [json.loads(line) for out in outs for line in out.read_text().splitlines()]
    assert not [r for r in rows if r["outcome"] == "error"]
    granted = [r["id"] for r in rows if r["outcome"] == "granted"]
    assert len(granted) >= 12
    reconcile()
    with BoostStore() as store:
        records = {b.id: b for b in store.list(include_ended=True)}
    states = {records[i].state for i in granted}
    assert BoostState.lost not in states, [records[i].reason for i in granted if records[i].state is BoostState.lost]
    assert states <= {BoostState.released, BoostState.active}
    active = [records[i] for i in granted if records[i].state is BoostState.active]
    groups = rc.grid_groups()
    assert {b.placement_group for b in active} == set(groups)  # every group has its live record, and back
    check_invariants(grid.spec, records.values())


@task
def api_key_seen(i: int) -> dict:
    import os

    from prefect.settings import PREFECT_API_KEY

    return {"i": i, "setting": PREFECT_API_KEY.value(), "env": os.environ.get("PREFECT_API_KEY")}


def test_a_boosted_flow_runs_with_a_prefect_api_key_that_stays_out_of_ray_and_the_records(grid):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_KEY, temporary_settings

    key = "pnu_" + uuid.uuid4().hex

    @boosted(cpu=1, source="gpu2", duration="5m")
    @flow(task_runner=BoostRayTaskRunner(allow_offload=False))
    def with_key() -> tuple[str, list[dict]]:
        from prefect.runtime import flow_run

        return flow_run.id, [f.result(timeout=60) for f in api_key_seen.map(range(3))]

    with temporary_settings({PREFECT_API_KEY: key}):
        run_id, rows = with_key()
    assert [r["setting"] for r in rows] == [key] * 3  # reached the tasks, in their settings
    assert all(r["env"] is None for r in rows)  # not through Ray's runtime environment
    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        artifacts = client.read_artifacts()
    assert key not in json.dumps(run.parameters)
    assert not [log.message for log in logs if key in log.message]
    assert not [a.key for a in artifacts if key in json.dumps(a.data)]
    with BoostStore() as store:
        assert not [b.id for b in store.list(include_ended=True) if key in b.model_dump_json()]


@pytest.fixture
def lowered_share(grid):
    """gpu1's definition lowered from 2 CPU to 1 while its Ray node still runs with 2 CPU of tokens."""
    def lower(data: dict) -> dict:
        for node in data["nodes"]:
            if node["name"] == "gpu1":
                node["resource_sharing"]["max_share_cpu"] = 1
        return data

    with changed_cluster(grid, lower) as lowered:
        yield lowered


def test_a_lowered_share_is_enforced_before_the_node_restarts(grid, lowered_share, capsys):
    first = request_boost("gpu-master", cpu=1, source="gpu1")
    with pytest.raises(NoCapacity, match="gpu1 already lends 1 CPU of its share 1 CPU"):
        request_boost("gpu-master", cpu=1, source="gpu1")
    release_boost(first.id)

    # Concurrent requesters: the share, not the running tokens, bounds what is lent.
    granted, refused = [], []

    def ask() -> None:
        try:
            granted.append(request_boost("gpu-master", cpu=0.5, source="gpu1"))
        except NoCapacity:
            refused.append(1)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(granted) <= 2 and len(granted) + len(refused) == 4
    check_invariants(lowered_share, list_boosts())
    assert len(rc.grid_groups()) == len(granted)  # refused requests left no group behind

    code, out, _ = grid_cli(capsys, "cluster", "status")
    assert code == 0
    assert "gpu1 runs with lend tokens for 2 CPU" in out and "grid node ray-args gpu1" in out


def test_a_grant_that_fails_half_way_leaves_no_record_and_no_group(grid, monkeypatch):
    controller_off(monkeypatch)  # the direct path (with the controller, the lock is its own)
    def broken(*args, **kwargs):
        raise RuntimeError("the API went away during activation")

    monkeypatch.setattr(boosts_module, "_activate", broken)
    with pytest.raises(RuntimeError, match="went away"):
        request_boost("gpu-master", cpu=1, source="gpu2")
    assert list_boosts() == [] and rc.grid_groups() == {}


def test_a_request_that_cannot_get_the_ledger_lock_leaves_nothing_behind(grid, monkeypatch):
    controller_off(monkeypatch)  # the direct path (with the controller, the lock is its own)
    from grid_flows.adapters.ray.cluster import _ledger_lock_actor
    from grid_flows.errors import LedgerBusy

    monkeypatch.setenv("PREFECT_INTEGRATIONS_GRID_LOCK_TIMEOUT_SECONDS", "0.5")
    lock = _ledger_lock_actor()
    assert ray.get(lock.acquire.remote("someone-else", 30.0), timeout=10)
    try:
        with pytest.raises(LedgerBusy):
            request_boost("gpu-master", cpu=1, source="gpu2")
    finally:
        ray.get(lock.release.remote("someone-else"), timeout=10)
    assert list_boosts() == [] and rc.grid_groups() == {}
    release_boost(request_boost("gpu-master", cpu=1, source="gpu2").id)  # the capacity was freed
