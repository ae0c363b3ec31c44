"""Hostile or careless input through every door, against the real server and cluster:
one clear line, a distinct exit code, nothing left behind."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grid_flows import list_boosts, release_boost, request_boost
from grid_flows.adapters.ray import cluster as rc
from grid_flows.control.boosts import extend, reconcile
from grid_flows.errors import InvalidRequest
from tests.grid_cli import grid_cli
from tests.conftest import stop_the_controller

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
REPO = Path(__file__).resolve().parents[2]


def _grid_process(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grid_flows.cli.app", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_an_unreachable_prefect_api_is_one_line_naming_the_url_and_exit_4(grid):
    env = {**grid.env(), "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    result = _grid_process("boost", "status", env=env)
    assert result.returncode == 4
    assert "cannot reach the Prefect API at http://127.0.0.1:9/api" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_an_unreachable_ray_address_fails_fast_in_one_line_with_exit_4(grid):
    started = time.monotonic()
    result = _grid_process("boost", "request", "gpu-master", "--cpu", "1", "--address", "127.0.0.1:1",
                           env={**grid.env(), "RAY_ADDRESS": ""})
    assert time.monotonic() - started < 30  # it hung for more than 10 minutes before
    assert result.returncode == 4
    assert "cannot connect to Ray at 127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr
    assert list_boosts() == []


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_reconcile_refuses_a_pending_timeout_that_is_not_a_finite_count_of_seconds(grid, capsys, value):
    code, _, err = grid_cli(capsys, "boost", "reconcile", "--pending-timeout", value)
    assert code == 2 and "Traceback" not in err
    with pytest.raises(InvalidRequest, match="pending timeout"):
        reconcile(pending_timeout_seconds=float(value))


@pytest.mark.parametrize("args, message", [
    (["boost", "request", "gpu-master", "cpu", "1e-9"], "below the smallest amount a boost can hold"),
    (["boost", "request", "gpu-master", "memory", "8"], "memory '8' has no unit: write e.g. '8GiB'"),
    (["boost", "release", "abc"], "too short: give at least 4 characters"),
])
def test_tiny_amounts_and_short_prefixes_exit_2_and_leave_nothing(grid, capsys, args, message):
    code, _, err = grid_cli(capsys, *args)
    assert code == 2 and message in err and "Traceback" not in err
    assert list_boosts() == [] and rc.grid_groups() == {}


def test_python_api_refuses_overflowing_amounts_and_non_string_ids(grid):
    with pytest.raises(InvalidRequest, match="must be finite"):
        request_boost("gpu-master", cpu=10**400)
    for bad in (None, 123):
        with pytest.raises(InvalidRequest, match="boost id must be a string"):
            release_boost(bad)
    assert list_boosts() == [] and rc.grid_groups() == {}


def test_an_overdue_boost_shows_as_overdue_and_cannot_be_extended(grid, capsys, monkeypatch):
    # With the controller on, the boost ends at its deadline (test_controller). With it off
    # and not running, nothing ends it here: it shows as overdue until something touches the ledger.
    stop_the_controller(monkeypatch)
    boost = request_boost("gpu-master", cpu=1, source="gpu2", duration=1)
    time.sleep(max(0.0, boost.seconds_left()) + 0.05)  # let its lease run out; nothing ends it here
    code, out, _ = grid_cli(capsys, "boost", "status", "--json")
    assert code == 0
    (shown,) = json.loads(out)
    assert shown["overdue"] is True and shown["seconds_left"] == 0
    code, out, _ = grid_cli(capsys, "boost", "status")
    assert "overdue" in out
    with pytest.raises(InvalidRequest, match="an overdue boost cannot be extended"):
        extend(boost.id, "10m")


def test_every_boost_records_who_asked_and_status_shows_it(grid, capsys):
    import getpass
    import socket

    boost = request_boost("gpu-master", cpu=1, source="gpu2")
    assert boost.requested_by == f"{getpass.getuser()}@{socket.gethostname()}"
    assert list_boosts()[0].requested_by == boost.requested_by  # in the durable record
    code, out, _ = grid_cli(capsys, "boost", "status", "--json")
    assert json.loads(out)[0]["requested_by"] == boost.requested_by


def test_a_boost_requested_by_a_flow_names_its_flow_run(grid):
    from prefect import flow

    from grid_flows.flows.lifecycle import request_boost_flow

    @flow
    def asks() -> dict:
        return request_boost_flow(target="gpu-master", cpu=1, source="gpu2")

    asks()
    (boost,) = list_boosts()
    # The grid-request-boost run (a subflow of asks) asked: its name and id are recorded.
    assert re.fullmatch(r"flow run \S+ \([0-9a-f-]{36}\)", boost.requested_by), boost.requested_by


@pytest.mark.parametrize("params", [dict(cpu=True), dict(cpu=1, duration=True), dict(cpu=1, memory=True),
                                    dict(cpu=-1.0), dict(cpu=1, priority="urgent")])
def test_flow_parameters_refuse_booleans_negative_amounts_and_unknown_choices(grid, params):
    from prefect.exceptions import ParameterTypeError

    from grid_flows.flows.lifecycle import request_boost_flow

    with pytest.raises(ParameterTypeError):
        request_boost_flow(target="gpu-master", source="gpu2", **params)
    assert list_boosts() == []


def test_the_reconcile_flow_refuses_a_negative_pending_timeout(grid):
    from prefect.exceptions import ParameterTypeError

    from grid_flows.flows.lifecycle import reconcile_boosts

    with pytest.raises(ParameterTypeError):
        reconcile_boosts(pending_timeout_seconds=-1)


def test_a_successful_command_prints_no_event_flush_noise(grid):
    result = _grid_process("boost", "request", "gpu-master", "cpu", "1", "--source", "gpu2", "--json", env=grid.env())
    assert result.returncode == 0, result.stderr
    boost_id = json.loads(result.stdout)["id"]
    released = _grid_process("boost", "release", boost_id, env=grid.env())
    assert released.returncode == 0, released.stderr
    for output in (result.stderr, released.stderr):
        assert "Still processing items" not in output


@pytest.mark.parametrize("params", [dict(cpu=True), dict(gpu=True), dict(timeout_seconds=True), dict(memory=True),
                                    dict(gpu=-1.0), dict(timeout_seconds=0.0), dict(priority="urgent"),
                                    dict(strategy="fastest"), dict(use_boost="sometimes")])
def test_the_offload_flow_refuses_booleans_bad_numbers_and_unknown_choices(grid, params):
    from prefect.exceptions import ParameterTypeError

    from grid_flows.flows.offload import offload

    with pytest.raises(ParameterTypeError):
        offload(command=["true"], node="gpu2", **params)
