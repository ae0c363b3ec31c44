"""7. Priority isolation: does a boost keep its capacity while another flow floods the lender?

Measured: a flow of 20 one-second tasks that run only inside a high-priority 2-CPU boost on
gpu1 (granted first; node_specific, no offload); its wall time while a competing flow floods
gpu1, over its wall time on an idle cluster. Baseline: the same 20 tasks pinned to gpu1 with
plain prefect-ray (``RayTaskRunner``, ``num_cpus=1`` and a ``grid.node`` label selector), alone
and under the same flood.

The flood is a real Prefect flow in its own process (``python -m benchmarks.isolation flood``)
with plain prefect-ray: batches of 8 one-second tasks pinned to gpu1, for as long as a "go"
file exists. Its tasks sleep rather than burn CPU: every node of this local cluster shares
the same 2 cores, and the question is whether the lender's *Ray* capacity stays reserved,
not whether two cores can run three nodes' work at once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import Result, Stats, ratio_stats

TASKS = 20
FLOOD_BATCH = 8
LENDER = "gpu1"


def _one_second_task():
    from prefect import task

    @task
    def one_second(i: int, mark: str = "") -> int:
        if mark:
            Path(mark).touch()
        time.sleep(1.0)
        return i

    return one_second


def _flows(address: str):
    from prefect import flow
    from prefect_ray import RayTaskRunner
    from prefect_ray.context import remote_options

    from grid_flows import BoostRayTaskRunner, requires
    from grid_flows.adapters.ray.cluster import NODE_LABEL

    one_second = _one_second_task()

    def boosted_twenty(boost_id: str):
        @flow(task_runner=BoostRayTaskRunner(strategy="node_specific", allow_offload=False, boost_ids=[boost_id]),
              persist_result=False)
        def boosted_twenty() -> int:
            with requires(cpu=1, node=LENDER):  # into the boost on gpu1, nowhere else
                return sum(one_second.map(range(TASKS)).result())

        return boosted_twenty()

    @flow(task_runner=RayTaskRunner(address=address), persist_result=False)
    def plain_twenty() -> int:
        with remote_options(num_cpus=1, label_selector={NODE_LABEL: LENDER}):
            return sum(one_second.map(range(TASKS)).result())

    return boosted_twenty, plain_twenty


class Flood:
    """The competing flow, in its own process; ``on()`` returns once its tasks run on gpu1."""

    def __init__(self, workdir: str) -> None:
        self.dir = Path(workdir)
        self.go, self.running, self.paused, self.stop = (self.dir / n for n in ("go", "running", "paused", "stop"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.isolation", "flood", str(self.dir)],
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        self._wait(self.paused, 120, "the flood flow to start")

    def _wait(self, path: Path, seconds: float, what: str, present: bool = True) -> None:
        deadline = time.monotonic() + seconds
        while path.exists() is not present:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the flood process exited with {self.proc.returncode} while waiting for {what}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {seconds} s for {what}")
            time.sleep(0.05)

    def on(self) -> None:
        self.running.unlink(missing_ok=True)
        self.go.touch()
        self._wait(self.running, 60, "flood tasks to run on gpu1")

    def off(self) -> None:
        self.go.unlink(missing_ok=True)
        self.paused.unlink(missing_ok=True)
        self._wait(self.paused, 60, "the flood to pause (its last batch to finish)")

    def close(self) -> None:
        self.stop.touch()
        self.go.unlink(missing_ok=True)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            from grid_flows.dev.local_prefect import stop_process_group

            stop_process_group(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def flood_main(workdir: str) -> int:
    """The competing flow: batches of one-second tasks on gpu1 while ``go`` exists."""
    from prefect import flow
    from prefect_ray import RayTaskRunner
    from prefect_ray.context import remote_options

    from grid_flows.adapters.ray.cluster import NODE_LABEL

    d = Path(workdir)
    one_second = _one_second_task()

    @flow(task_runner=RayTaskRunner(address=os.environ["RAY_ADDRESS"]), persist_result=False)
    def flood() -> int:
        batches = 0
        while not (d / "stop").exists():
            if not (d / "go").exists():
                (d / "paused").touch()
                time.sleep(0.05)
                continue
            with remote_options(num_cpus=1, label_selector={NODE_LABEL: LENDER}):
                futures = one_second.map(range(FLOOD_BATCH), mark=str(d / "running"))
            for f in futures:
                f.wait(timeout=120)
            batches += 1
        return batches

    flood()
    return 0


def priority_isolation(address: str, reps: int = 5) -> Result:
    from grid_flows import list_boosts, release_boost, request_boost

    boosted_twenty, plain_twenty = _flows(address)
    os.environ["RAY_ADDRESS"] = address  # for the flood process
    # The boost is granted before the flood starts: the question is whether it keeps its capacity.
    boost = request_boost("gpu-master", cpu=2, source=LENDER, priority="high", duration="30m")
    flood = None
    idle = {"boosted": [], "plain": []}
    busy = {"boosted": [], "plain": []}
    expected = TASKS * (TASKS - 1) // 2
    runs = {"boosted": lambda: boosted_twenty(boost.id), "plain": plain_twenty}
    try:
        runs["boosted"]()  # warm-up: Ray workers on gpu1 import prefect once
        runs["plain"]()
        flood = Flood(tempfile.mkdtemp(prefix="grid-flood-"))
        for i in range(reps):
            for name in ("boosted", "plain") if i % 2 == 0 else ("plain", "boosted"):
                t0 = time.perf_counter()
                assert runs[name]() == expected
                idle[name].append(time.perf_counter() - t0)
                flood.on()
                t0 = time.perf_counter()
                assert runs[name]() == expected
                busy[name].append(time.perf_counter() - t0)
                flood.off()
    finally:
        if flood is not None:
            flood.close()
        release_boost(boost.id)
        os.environ.pop("RAY_ADDRESS", None)
    assert not list_boosts(), "a live boost was left behind"
    g, p = ratio_stats(busy["boosted"], idle["boosted"]), ratio_stats(busy["plain"], idle["plain"])
    gi, gb = Stats(idle["boosted"]), Stats(busy["boosted"])
    pi, pb = Stats(idle["plain"]), Stats(busy["plain"])
    return Result(
        name=f"7. priority isolation: {TASKS} x 1 s tasks on gpu1 while a flow floods gpu1",
        measured=f"boosted (high) flow: flooded {gb.fmt(1, ' s', 1)}, idle {gi.fmt(1, ' s', 1)}",
        baseline=f"prefect-ray: flooded {pb.fmt(1, ' s', 1)}, idle {pi.fmt(1, ' s', 1)}; "
                 f"ratio {p.fmt(1, 'x', 2)}",
        ratio=g.fmt(1, "x", 2),
        goal="boosted flooded/idle <= 1.15",
        passed=g.median <= 1.15,
        note="the boost's 2 CPUs are a placement-group bundle granted before the flood, so the flood's "
             "tasks (num_cpus=1 on gpu1) only get gpu1's other 2 CPUs; what is shared is the Prefect "
             "server and the 2 physical cores serving both flows' task runs. prefect-ray's "
             "tasks queue in Ray behind the flood's",
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "flood":
        from benchmarks.common import quiet_environment

        address = os.environ.get("RAY_ADDRESS")
        quiet_environment()  # drops RAY_ADDRESS; the flood needs it back
        os.environ["RAY_ADDRESS"] = address or ""
        sys.exit(flood_main(sys.argv[2]))
    print("usage: python -m benchmarks.isolation flood WORKDIR  (started by benchmarks.run)", file=sys.stderr)
    sys.exit(2)
