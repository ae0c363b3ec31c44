"""BoostRayTaskRunner and @boosted on real Ray nodes with a real Prefect server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import ray
from prefect import flow, task

from grid_flows import BoostRayTaskRunner, boosted, list_boosts, requires
from grid_flows.adapters.ray import cluster as rc
from grid_flows.adapters.ray.tokens import LEND_CPU
from grid_flows.core.models import BoostState
from grid_flows.adapters.ray.cluster import NODE_LABEL
from tests.conftest import placements_artifact

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@task
def where(i: int, seconds: float = 0.0) -> dict:
    """Report, from inside the task, where it ran and what Ray gave it."""
    start = time.time()
    time.sleep(seconds)
    ctx = ray.get_runtime_context()
    return {
        "i": i,
        "node_id": ctx.get_node_id(),
        "group": ctx.get_placement_group_id() or "",
        "assigned": ctx.get_assigned_resources(),
        "start": start,
        "end": time.time(),
    }


def _names() -> dict[str, str]:
    return {info.node_id: name for name, info in rc.grid_nodes().items()}


def _max_overlap(rows: list[dict]) -> int:
    edges = sorted([(r["start"], 1) for r in rows] + [(r["end"], -1) for r in rows])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def test_boosted_flow_uses_the_head_and_the_boost_and_nothing_else(grid):
    @boosted(cpu=2, source="gpu1", duration="10m", priority="high")
    @flow(task_runner=BoostRayTaskRunner(allow_offload=False))
    def six_sleepers() -> list[dict]:
        return [f.result(timeout=120) for f in where.map(range(6), seconds=1.0)]

    before = {b.id for b in list_boosts(include_ended=True)}
    rows = six_sleepers()
    names = _names()
    ran_on = sorted({names[r["node_id"]] for r in rows})
    assert ran_on == ["gpu-master", "gpu1"]
    (boost,) = [b for b in list_boosts(include_ended=True) if b.id not in before]
    for row in rows:
        if names[row["node_id"]] == "gpu1":
            assert row["group"] == boost.placement_group_id  # inside the boost's group
        else:
            assert row["group"] == ""
    assert _max_overlap(rows) <= 3
    assert sorted(r["i"] for r in rows) == list(range(6))
    assert boost.state is BoostState.released
    assert rc.grid_groups() == {}


def test_without_a_boost_no_task_touches_a_workers_private_cpus(grid):
    @flow(task_runner=BoostRayTaskRunner())
    def unboosted() -> list[dict]:
        return [f.result(timeout=120) for f in where.map(range(6), seconds=0.5)]

    rows = unboosted()
    names = _names()
    for row in rows:
        node = names[row["node_id"]]
        if node != "gpu-master":
            # Offloaded work must hold the lender's lend tokens: its share, not its own CPUs.
            assert row["assigned"].get(LEND_CPU, 0) >= 1000, (node, row["assigned"])
    assert {names[r["node_id"]] for r in rows} <= {"gpu-master", "gpu1", "gpu2"}
    assert len(rows) == 6


def test_competing_tasks_pinned_to_the_lender_cannot_take_the_boost(grid):
    @ray.remote(num_cpus=1, max_retries=0)
    def hog(seconds: float) -> str:
        time.sleep(seconds)
        return ray.get_runtime_context().get_node_id()

    @boosted(cpu=2, source="gpu1", duration="10m")
    @flow(task_runner=BoostRayTaskRunner(allow_offload=False))
    def boosted_while_flooded() -> list[dict]:
        # Ask for more than the head has, so every task must go into the boost.
        with requires(cpu=1.0):
            futures = where.map(range(4), seconds=1.0)
        hogs = [hog.options(label_selector={NODE_LABEL: "gpu1"}).remote(3.0) for _ in range(6)]
        rows = [f.result(timeout=120) for f in futures]
        ray.get(hogs, timeout=120)
        return rows

    rows = boosted_while_flooded()
    names = _names()
    in_boost = [r for r in rows if r["group"]]
    assert in_boost, "no task ran in the boost"
    assert all(names[r["node_id"]] == "gpu1" for r in in_boost)
    # The boost's two CPUs stayed the flow's: two boosted tasks overlapped while hogs ran.
    assert _max_overlap(in_boost) == 2


def test_boosted_keeps_the_flows_name_parameters_and_releases_on_error(grid):
    @flow(name="my-training", retries=0)
    def train(epochs: int = 3, lr: float = 0.1) -> int:
        raise RuntimeError(f"diverged after {epochs} epochs")

    plain_schema = train.parameters.model_dump()
    boosted_train = boosted(cpu=1, source="gpu2", duration="5m")(train)
    assert boosted_train.name == "my-training"
    assert boosted_train.parameters.model_dump() == plain_schema
    assert isinstance(boosted_train.task_runner, BoostRayTaskRunner)

    before = {b.id for b in list_boosts(include_ended=True)}
    with pytest.raises(RuntimeError, match="diverged after 2 epochs"):
        boosted_train(epochs=2)
    (boost,) = [b for b in list_boosts(include_ended=True) if b.id not in before]
    assert boost.state is BoostState.released
    assert boost.origin == "flow"
    assert rc.grid_groups() == {}


def test_map_of_200_trivial_tasks_loses_and_duplicates_nothing(grid):
    @task
    def ident(i: int) -> int:
        return i

    @flow(task_runner=BoostRayTaskRunner())
    def many() -> list[int]:
        return [f.result(timeout=120) for f in ident.map(range(200))]

    assert many() == list(range(200))


def test_dependencies_between_queued_tasks_are_respected(grid):
    @task
    def add(a: int, b: int) -> int:
        return a + b

    @flow(task_runner=BoostRayTaskRunner(allow_offload=False))
    def chain() -> int:
        total = add.submit(0, 1)
        for i in range(2, 8):
            total = add.submit(total, i)  # each waits on the one before, on a 1-CPU head
        return total.result(timeout=120)

    assert chain() == sum(range(8))


_KILLED_FLOW = textwrap.dedent(
    """
    import time
    from prefect import flow
    from grid_flows import BoostRayTaskRunner, boosted

    @boosted(cpu=1, source="gpu2", duration=4)
    @flow(task_runner=BoostRayTaskRunner())
    def hangs():
        print("BOOSTED", flush=True)
        time.sleep(600)

    hangs()
    """
)


def test_a_boost_outlives_a_killed_flow_only_until_it_expires(grid):
    from grid_flows.control.boosts import expire_overdue
    from grid_flows.adapters.prefect.store import BoostStore

    proc = subprocess.Popen([sys.executable, "-c", _KILLED_FLOW], env=grid.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "BOOSTED" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "the flow process died before its boost"
        assert "BOOSTED" in line
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    (boost,) = list_boosts()
    assert boost.state is BoostState.active
    assert boost.placement_group in rc.grid_groups()  # the detached group survives its driver
    wait = (boost.expires_at - boost.granted_at).total_seconds()
    assert wait == 4
    time.sleep(max(0.0, boost.seconds_left()) + 0.1)  # let the lease run out (a real deadline, not sync)
    with BoostStore() as store:
        expired = expire_overdue(store)
    assert [b.id for b in expired] == [boost.id]
    assert expired[0].state is BoostState.expired
    assert rc.grid_groups() == {}


def test_placements_artifact_counts_every_task(grid):
    from prefect.context import get_run_context

    @flow(task_runner=BoostRayTaskRunner(allow_offload=False))
    def counted() -> str:
        [f.result(timeout=60) for f in where.map(range(5))]
        return str(get_run_context().flow_run.id)

    run_id = counted()
    artifact = placements_artifact(run_id)
    rows = json.loads(artifact.data)
    assert str(artifact.flow_run_id) == run_id  # shown on the flow run's page in the UI
    assert artifact.key == "grid-placements"  # one key for every flow run, not one per run
    assert len(rows) == 5 and {r["Decision"] for r in rows} == {"target"}  # a row per task run
    assert {r["Task"] for r in rows} == {"where"} and len({r["Task run"] for r in rows}) == 5
    assert all(r["Node"] == "gpu-master" and r["Queue wait"].endswith(" s") and r["Reason"] for r in rows)
    assert artifact.description.startswith("5 task runs (strategy local_first). By node: gpu-master 5 (target 5).")


@task
def my_priority(i: int) -> dict:
    import psutil

    me = psutil.Process()
    return {"i": i, "node_id": ray.get_runtime_context().get_node_id(), "nice": me.nice(),
            "ioclass": int(me.ionice().ioclass)}


def test_tasks_run_under_their_nodes_resource_mode(grid):
    import psutil

    @boosted(cpu=2, source="gpu1", duration="5m")
    @flow(task_runner=BoostRayTaskRunner(allow_offload=False))
    def moded() -> list[dict]:
        return [f.result(timeout=120) for f in my_priority.map(range(6))]

    rows = moded()
    names = _names()
    on_lender = [r for r in rows if names[r["node_id"]] == "gpu1"]
    assert on_lender, "no task ran on the lender"
    for row in on_lender:  # gpu1 is a conservative desktop: nice 10 (Ray's workers start at 15), ionice idle
        assert row["nice"] >= 10
        assert row["ioclass"] == int(psutil.IOPRIO_CLASS_IDLE)
    for row in rows:
        if names[row["node_id"]] == "gpu-master":  # aggressive: left as Ray started it
            assert row["ioclass"] != int(psutil.IOPRIO_CLASS_IDLE)


def test_the_dispatcher_thread_sees_the_prefect_settings_of_the_thread_that_entered_the_runner(grid):
    # local_prefect_server() and user code set PREFECT_API_URL with temporary_settings(), a
    # context variable: a plain thread would fall back to the profile's (or an ephemeral) API
    # and read no boost record at all.
    import threading

    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    runner = BoostRayTaskRunner(allow_offload=False)
    seen: dict = {}
    refreshed = threading.Event()
    original = runner._refresh

    def spy(store):
        seen.update(url=PREFECT_API_URL.value(), retries=PREFECT_CLIENT_MAX_RETRIES.value())
        refreshed.set()
        return original(store)

    runner._refresh = spy
    with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 4}):  # only this context has it
        with runner:
            assert refreshed.wait(timeout=30), "the dispatcher never refreshed"
    assert seen == {"url": grid.api_url, "retries": 4}


@task
def client_retries_seen(i: int) -> int:
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES

    return PREFECT_CLIENT_MAX_RETRIES.value()


def test_tasks_see_the_settings_of_their_own_flow_run(grid):
    # Settings are serialized once per SettingsContext in the driver and rebuilt once per
    # distinct settings in each worker (task_context.py): a changed setting must still arrive.
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    @flow(task_runner=BoostRayTaskRunner(allow_offload=False))
    def report(n: int) -> list[int]:
        return [f.result(timeout=60) for f in client_retries_seen.map(range(n))]

    seen = []
    for retries in (7, 9, 7):
        with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: retries}):
            seen.append(report(4))
    assert seen == [[7] * 4, [9] * 4, [7] * 4]


def test_the_task_context_is_what_prefect_would_serialize(grid):
    from uuid import uuid4

    from prefect.context import serialize_context

    from grid_flows.adapters.prefect.task_context import serialize_task_context

    @flow
    def compare() -> tuple[dict, dict, bool]:
        run_id = uuid4()
        kwargs = {"task": client_retries_seen, "task_run_id": run_id, "task_inputs": {"i": set()},
                  "copy_to_child_ctx": True}
        ours, again = serialize_task_context(kwargs), serialize_task_context(kwargs)
        return ours, serialize_context(asset_ctx_kwargs=kwargs), ours["settings_context"] is again["settings_context"]

    ours, prefects, reused = compare()
    assert ours == prefects
    assert ours["settings_context"]["settings"]["api"]["url"] == grid.api_url
    assert reused


@task
def start_time(i: int, gate: str = "") -> float:
    """When the task started; with ``gate``, it then holds its slot until that file exists."""
    started = time.time()
    deadline = time.monotonic() + 60
    while gate and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.02)
    return started


def test_queued_tasks_start_by_priority_whatever_order_they_came_in(grid, tmp_path):
    gate = tmp_path / "all-submitted"

    @flow(task_runner=BoostRayTaskRunner(allow_offload=False))
    def queued() -> dict:
        blocker = start_time.submit(0, gate=str(gate))  # holds the head's only CPU until all are queued
        with requires(priority="low"):
            lows = start_time.map(range(1, 4))
        with requires(priority="high"):
            highs = start_time.map(range(4, 7))
        gate.touch()
        return {"blocker": blocker.result(timeout=60), "low": [f.result(timeout=60) for f in lows],
                "high": [f.result(timeout=60) for f in highs]}

    got = queued()
    # One CPU, so one task at a time: every high-priority task starts before any low one.
    assert got["blocker"] < min(got["high"])
    assert max(got["high"]) < min(got["low"]), got


@task
def plus_one(x: int) -> int:
    return x + 1


def test_options_only_ray_remote_accepts_work_as_with_prefect_ray(grid):
    from prefect_ray.context import remote_options

    @flow(task_runner=BoostRayTaskRunner(allow_offload=False))
    def once_per_worker() -> list[int]:
        with remote_options(max_calls=1):  # refused by .options(); prefect-ray passes it to ray.remote()
            futures = [plus_one.submit(i) for i in range(3)]
        return [f.result(timeout=60) for f in futures]

    assert once_per_worker() == [1, 2, 3]


def test_a_task_ray_refuses_fails_alone_and_the_flow_ends(grid):
    from prefect.states import State
    from prefect_ray.context import remote_options

    @flow(task_runner=BoostRayTaskRunner(allow_offload=False))
    def one_bad_option() -> tuple[State, list[int]]:
        with remote_options(not_a_ray_option=1):
            bad = plus_one.submit(0)
        good = [plus_one.submit(i) for i in range(3)]
        bad.wait(timeout=60)
        return bad.state, [f.result(timeout=60) for f in good]

    started = time.monotonic()
    state, results = one_bad_option()
    assert results == [1, 2, 3]  # the dispatcher went on
    assert state.is_failed()
    assert "could not submit task plus_one" in state.message and "not_a_ray_option" in state.message
    assert time.monotonic() - started < 120


@task
def wait_for_file(path: str) -> str:
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)  # a task nobody waits on; the test lets it end once the flow has
    return path


def test_the_flow_ends_within_the_exit_bound_and_names_what_was_left(grid, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("PREFECT_INTEGRATIONS_GRID_EXIT_WAIT_SECONDS", "2")
    flag = str(tmp_path / "done")
    futures = []

    @flow(task_runner=BoostRayTaskRunner(allow_offload=False))
    def leaves_work_behind() -> None:
        stuck = wait_for_file.submit(flag)
        futures.extend([stuck, plus_one.submit(1, wait_for=[stuck])])  # the second waits on the first

    started = time.monotonic()
    with caplog.at_level("WARNING", logger="grid_flows"):
        leaves_work_behind()
    try:
        assert time.monotonic() - started < 60  # not the 60 s the stuck task would take
        never_started = futures[1]
        never_started.wait(timeout=10)
        assert never_started.state.is_failed()
        assert "did not start task plus_one" in never_started.state.message
        assert "stopped waiting after 2 s" in never_started.state.message
        assert any("still running on Ray" in r.message and "wait_for_file" in r.message for r in caplog.records)
    finally:
        open(flag, "w").close()
        futures[0].wait(timeout=60)
    assert futures[0].result(timeout=60) == flag  # Ray ran it to its end, as RayTaskRunner would


def test_placements_are_published_before_the_flow_run_ends(grid):
    """Whatever reacts to Completed (an Automation, run_deployment) finds the artifact."""
    from prefect.context import get_run_context

    from grid_flows import boost

    @flow(task_runner=BoostRayTaskRunner(allow_offload=False))
    def boosted_block() -> tuple[str, list[dict] | None]:
        run_id = str(get_run_context().flow_run.id)
        with boost(cpu=1, source="gpu1", duration="5m"):
            [f.result(timeout=60) for f in where.map(range(3))]
        # Still inside the flow run: the block's end published what was placed.
        artifact = placements_artifact(run_id)
        return run_id, json.loads(artifact.data) if artifact else None

    run_id, rows = boosted_block()
    assert rows is not None, "no placements artifact before the flow run ended"
    assert len(rows) == 3
    latest = json.loads(placements_artifact(run_id).data)
    assert latest == rows  # nothing changed after: no second version was needed


_FAILED_ENTER = textwrap.dedent(
    """
    import threading
    import ray
    from grid_flows import BoostRayTaskRunner
    from grid_flows.errors import GridError

    runner = BoostRayTaskRunner(boost_ids=["0123456789abcdef0123456789abcdef"])  # no such boost
    try:
        with runner:
            print("ENTERED")
    except GridError as exc:
        print("REFUSED", type(exc).__name__)
    print("RAY", ray.is_initialized())
    print("THREADS", sorted(t.name for t in threading.enumerate() if t.name.startswith("grid-")))
    print("STARTED", runner._started)
    """
)


def test_an_enter_that_fails_leaves_no_ray_connection_or_thread_behind(grid):
    done = subprocess.run([sys.executable, "-c", _FAILED_ENTER], env=grid.env(), capture_output=True, text=True,
                          timeout=120)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ENTERED" not in lines and lines[0].startswith("REFUSED")  # the unknown boost is refused
    assert "RAY False" in lines  # the connection the runner opened is closed again
    assert "THREADS []" in lines  # the controller watch it had started is stopped
    assert "STARTED False" in lines
