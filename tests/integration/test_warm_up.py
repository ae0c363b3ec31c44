"""Warm-up (issue 19): the Ray workers a flow's first tasks run in are started before they arrive.

Each flow runs in its own process, so it is a fresh Ray job: Ray never lends a job's
workers to another, and the pytest process's own workers cannot stand in for warmed ones.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from prefect import flow

from grid_flows import BoostRayTaskRunner, boosted

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

_WARMED_FLOW = textwrap.dedent(
    """
    import json, os, sys, time
    import ray
    from prefect import flow, task
    from prefect.context import FlowRunContext
    from grid_flows import BoostRayTaskRunner, boost

    @task
    def pid(i: int) -> dict:
        return {"pid": os.getpid(), "group": ray.get_runtime_context().get_placement_group_id() or ""}

    @flow(task_runner=BoostRayTaskRunner(allow_offload=False, warm_up=sys.argv[1] == "on"))
    def warmed() -> dict:
        runner = FlowRunContext.get().task_runner
        cpu, gpu = float(sys.argv[2]), float(sys.argv[3])
        with boost(cpu=cpu, gpu=gpu, source="gpu1", duration="5m", on_unavailable="fail") as granted:
            warm = runner.wait_for_warm_up(timeout=120)
            # Ray's resource view lags the lease's return by a moment: poll it, with a bound.
            deadline, group_cpu_free = time.monotonic() + 15, None
            while group_cpu_free != (cpu or None) and time.monotonic() < deadline:
                group_cpu_free = ray.available_resources().get(f"CPU_group_{granted.placement_group_id}")
                time.sleep(0.1)
            rows = [f.result(timeout=120) for f in pid.map(range(6 if cpu else 1))]
        return {"warm": warm, "rows": rows, "group_cpu_free": group_cpu_free, "group": granted.placement_group_id}

    print("RESULT " + json.dumps(warmed()), flush=True)
    """
)


def _run(grid, warm_up: str, cpu: float = 2, gpu: float = 0) -> dict:
    done = subprocess.run([sys.executable, "-c", _WARMED_FLOW, warm_up, str(cpu), str(gpu)], env=grid.env(),
                          capture_output=True, text=True, timeout=200)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_the_first_tasks_run_in_the_workers_the_warm_up_started(grid):
    result = _run(grid, "on")
    warm = set(result["warm"])
    assert len(warm) == 3  # one on the 1-CPU head, two in the 2-CPU boost
    assert {row["pid"] for row in result["rows"]} <= warm  # no task waited for a new worker
    assert {row["group"] for row in result["rows"]} == {"", result["group"]}  # on the head and in the boost
    assert result["group_cpu_free"] == 2.0  # a finished warm-up holds nothing


def test_a_gpu_only_boost_gets_one_warm_worker_that_holds_nothing(grid):
    result = _run(grid, "on", cpu=0, gpu=1)
    assert len(result["warm"]) == 2  # one on the head, one in the boost's GPU-only bundle
    assert result["group_cpu_free"] is None  # the bundle has no CPU to hold


def test_without_warm_up_nothing_is_started_ahead(grid):
    result = _run(grid, "off")
    assert result["warm"] == []
    assert len(result["rows"]) == 6


def test_warm_up_is_on_for_boosted_flows_and_off_for_the_runner_alone():
    def body():
        return None

    assert BoostRayTaskRunner().warm_up is None  # used alone: off
    assert boosted(cpu=1)(flow(body)).task_runner.warm_up is True
    explicit = boosted(cpu=1)(flow(task_runner=BoostRayTaskRunner(warm_up=False))(body))
    assert explicit.task_runner.warm_up is False
    runner = BoostRayTaskRunner(warm_up=True)
    assert runner.duplicate() == runner and runner.duplicate().warm_up is True
    with pytest.raises(TypeError, match="warm_up"):
        BoostRayTaskRunner(warm_up="yes")
