"""The boost controller on real Ray nodes with a real Prefect server: where it runs, durable
grants, expiry on time with no maintenance flow, the grace of a held boost, restarts, watch,
and the maintenance flows as its backstop."""

from __future__ import annotations

import time
import uuid

import pytest
import ray

from grid_flows import release_boost, request_boost
from grid_flows.adapters.prefect.settings import RAY_NAMESPACE
from grid_flows.adapters.prefect.store import BoostStore
from grid_flows.adapters.ray import cluster as rc
from grid_flows.control import boosts, client
from grid_flows.core.models import BoostState, Resources
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _record(boost_id: str):
    with BoostStore() as store:
        return store.get(boost_id)


def _until(predicate, timeout: float, what: str):
    """``predicate()``'s first truthy value within ``timeout`` (conftest.wait_for), or fail naming ``what``."""
    value = wait_for(predicate, bool, timeout)
    if not value:
        raise AssertionError(f"{what}: not within {timeout} s")
    return value


def _status() -> dict:
    return ray.get(client.controller().status.remote(), timeout=30)


def test_the_controller_runs_on_the_head_and_a_grant_is_durable_when_answered(grid):
    boost = request_boost("gpu-master", cpu=1, source="gpu1", duration="10m")
    handle = ray.get_actor(client.controller_name(), namespace=RAY_NAMESPACE)
    status = ray.get(handle.status.remote(), timeout=30)
    assert status["node_id"] == rc.grid_nodes()["gpu-master"].node_id
    assert status["live"] == 1 and status["durable"] == 1
    assert _record(boost.id).state is BoostState.active  # a fresh client reads it back
    release_boost(boost.id)
    assert _record(boost.id).state is BoostState.released


def test_an_unheld_boost_ends_at_its_deadline_with_no_maintenance_flow(grid):
    boost = request_boost("gpu-master", cpu=1, source="gpu1", duration=2)
    ended = _until(lambda: (r := _record(boost.id)).state.ended and r, 10, "the boost ending")
    assert ended.state is BoostState.expired
    late = (ended.ended_at - boost.expires_at).total_seconds()
    assert 0 <= late < 1.0, f"ended {late:.2f} s after its deadline"
    _until(lambda: boost.placement_group not in rc.grid_groups(), 5, "its group removed")  # record first


def test_a_held_boost_gets_the_grace_and_ends_once_released_from_the_hold(grid):
    from tests.conftest import sharing_settings

    with sharing_settings(grid, grace_seconds=30):
        boost = request_boost("gpu-master", cpu=1, source="gpu1", duration=1)
        boosts.hold(boost.id)
        _until(lambda: _status()["version"] and time.time() > boost.expires_at.timestamp() + 1.0, 5, "deadline")
        assert _record(boost.id).state is BoostState.active  # a flow still runs tasks in it: grace
        boosts.unhold(boost.id)
        ended = _until(lambda: (r := _record(boost.id)).state.ended and r, 5, "the boost ending")
    assert ended.state is BoostState.expired


def test_a_request_sent_again_with_its_key_returns_the_first_grant(grid):
    key = uuid.uuid4().hex
    first = client.call("request", "gpu-master", cpu=1, source="gpu1", duration="10m", request_key=key)
    again = client.call("request", "gpu-master", cpu=1, source="gpu1", duration="10m", request_key=key)
    assert again.id == first.id
    assert [b.id for b in boosts.list_boosts()] == [first.id]


def test_a_killed_controller_comes_back_rebuilt_and_callers_go_on(grid):
    boost = request_boost("gpu-master", cpu=1, source="gpu1", duration="10m")
    orphan = rc.start_boost_group("grid-boost-" + uuid.uuid4().hex, "gpu2", Resources(cpu=0.5))
    assert orphan.wait(timeout_seconds=10)  # as if a grant was in flight when the controller died
    before = _status()["started_at"]
    ray.kill(client.controller(), no_restart=False)
    released = release_boost(boost.id)  # sent again until the restarted controller answers
    assert released.state is BoostState.released
    status = _status()
    assert status["started_at"] != before
    assert any("removed orphan placement group" in line for line in status["rebuild"]), status["rebuild"]
    assert orphan.id.hex() not in {g.group_id for g in rc.grid_groups().values()}


def test_watch_reports_each_change_after_a_version(grid):
    handle = client.controller()
    since = _status()["version"]
    boost = request_boost("gpu-master", cpu=1, source="gpu2", duration="10m")
    seen = ray.get(handle.watch.remote(since, 5), timeout=30)
    assert seen["complete"] and [b.id for b in seen["boosts"]] == [boost.id]
    release_boost(boost.id)
    seen = ray.get(handle.watch.remote(seen["version"], 5), timeout=30)
    assert [(b.id, b.state) for b in seen["boosts"]] == [(boost.id, BoostState.released)]
    quiet = ray.get(handle.watch.remote(seen["version"], 0.2), timeout=30)
    assert quiet["boosts"] == [] and quiet["version"] == seen["version"]


def test_with_the_controller_off_each_process_changes_the_records_itself(grid, monkeypatch):
    monkeypatch.setenv("PREFECT_INTEGRATIONS_GRID_CONTROLLER", "false")
    assert not client.enabled()
    boost = request_boost("gpu-master", cpu=1, source="gpu2", duration="10m")
    assert _record(boost.id).state is BoostState.active
    assert release_boost(boost.id).state is BoostState.released
    monkeypatch.delenv("PREFECT_INTEGRATIONS_GRID_CONTROLLER")
    again = request_boost("gpu-master", cpu=1, source="gpu2", duration="10m")  # the controller sees it free
    release_boost(again.id)


def _run_log(flow_fn, wait_for: str, timeout: float = 30) -> list[str]:
    """Run ``flow_fn`` and read its flow run's log from the server until a line holds ``wait_for``."""
    import logging

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    run_logger = logging.getLogger("prefect.flow_runs")
    level = run_logger.level
    run_logger.setLevel(logging.INFO)  # the suite runs with PREFECT_LOGGING_LEVEL=WARNING
    try:
        state = flow_fn(return_state=True)
    finally:
        run_logger.setLevel(level)
    assert state.is_completed(), state.message
    for name in ("prefect.flow_runs", "prefect"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, APILogHandler):
                handler.flush()
    with get_client(sync_client=True) as api:
        def lines():
            logs = api.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
                any_=[state.state_details.flow_run_id])))
            found = [log.message for log in logs]
            return found if any(wait_for in m for m in found) else None
        return _until(lines, timeout, f"a log line with {wait_for!r}")


def test_the_expire_flow_says_who_did_the_work(grid, monkeypatch):
    from grid_flows.flows.lifecycle import expire_boosts

    _run_log(expire_boosts, "The boost controller ended 0 overdue boost(s)")
    monkeypatch.setenv("PREFECT_INTEGRATIONS_GRID_CONTROLLER", "false")
    _run_log(expire_boosts, "This flow run (the boost controller is switched off) ended 0 overdue boost(s)")


def test_the_boosts_table_and_events_are_published_in_the_background(grid):
    boost = request_boost("gpu-master", cpu=1, source="gpu1", duration="10m")
    assert ray.get(client.controller().flush.remote(10), timeout=30)
    with BoostStore() as store:
        artifact = store.client.read_latest_artifacts(limit=50)
    table = [a for a in artifact if a.key == "grid-boosts"]
    assert table and boost.short_id in str(table[0].data)


def test_wait_for_change_wakes_on_a_change_and_times_out_without_one(grid):
    start = client.wait_for_change(None, timeout=5)  # the current version, at once
    assert start == _status()["version"]
    boost = request_boost("gpu-master", cpu=1, source="gpu2", duration="10m")
    after = client.wait_for_change(start, timeout=5)
    assert after > start
    assert client.wait_for_change(after, timeout=0.2) == after  # nothing changed meanwhile
    release_boost(boost.id)
    assert client.wait_for_change(after, timeout=5) > after


def test_status_watch_refuses_json_in_one_line(grid, capsys):
    from tests.grid_cli import grid_cli

    code, _, err = grid_cli(capsys, "boost", "status", "--watch", "--json")
    assert code == 2 and "--watch redraws a table" in err and "Traceback" not in err


def test_status_watch_redraws_when_a_boost_is_granted_and_stops_on_ctrl_c(grid):
    import os
    import signal
    import subprocess
    import sys
    import threading

    proc = subprocess.Popen([sys.executable, "-m", "grid_flows.cli.app", "boost", "status", "--watch",
                             "--every", "120"],
                            env={**grid.env(), "COLUMNS": "200", "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            # A suite started in the background (`make test &`) ignores SIGINT, and so
                            # would the child: Python then never turns Ctrl-C into KeyboardInterrupt.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        _until(lambda: any("total" in line for line in seen), 60, "the first table")
        boost = request_boost("gpu-master", cpu=1, source="gpu2", duration="10m")
        # Told by the controller: the periodic redraw is 120 s away.
        try:
            _until(lambda: any(boost.id[:8] in line for line in seen), 30, "the table showing the new boost")
        except AssertionError as exc:
            proc.kill()
            proc.wait(timeout=30)
            raise AssertionError(f"{exc}; the command printed: {''.join(seen)[-1500:]}; "
                                 f"stderr: {proc.stderr.read()[-3000:]}") from None
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGABRT)  # PYTHONFAULTHANDLER: every thread's stack to stderr
            proc.wait(timeout=30)
            raise AssertionError(f"no exit within 30 s of Ctrl-C; stacks: {proc.stderr.read()[-6000:]}") from None
    assert code == 0, proc.stderr.read()[-2000:]
