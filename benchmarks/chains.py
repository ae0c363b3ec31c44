"""Dependency chains (issue 20, item 3): a 15-task ``wait_for`` chain and a 50-task fan-in,
BoostRayTaskRunner against prefect-ray's RayTaskRunner in the same run.

    .venv/bin/python -m benchmarks.chains [REPS]

Both runners use the benchmark cluster from one Ray job (this process stays connected, so
both find warm workers after one untimed run each); no boost. Each flow waits for its
last result, so both runners do all the work. Trivial task bodies: what is timed is the
runners' handling of dependencies, not the tasks.
"""

from __future__ import annotations

import os
import sys

from benchmarks.common import Result, Stats, alternating, ratio_stats, run_alone

CHAIN, FAN_IN = 15, 50


def _step(i: int) -> int:
    return i


def _total(parts: list[int]) -> int:
    return sum(parts)


def _flows(runner):
    from prefect import flow, task

    step, total = task(_step), task(_total)

    @flow(name="chain", task_runner=runner, persist_result=False)
    def chain(n: int = CHAIN) -> int:
        future = step.submit(0)
        for i in range(1, n):
            future = step.submit(i, wait_for=[future])
        return future.result(timeout=300)

    @flow(name="fan-in", task_runner=runner.duplicate(), persist_result=False)
    def fan_in(n: int = FAN_IN) -> int:
        return total.submit(step.map(range(n))).result(timeout=300)

    return chain, fan_in


def chains(address: str, reps: int = 5) -> list[Result]:
    from prefect_ray import RayTaskRunner

    from grid_flows.adapters.ray import cluster as rc
    from grid_flows.runner.task_runner import BoostRayTaskRunner

    rc.connect(address)  # one Ray job for every flow: both runners reuse its workers
    grid_chain, grid_fan_in = _flows(BoostRayTaskRunner(address=address))
    ray_chain, ray_fan_in = _flows(RayTaskRunner(address=address))
    results = []
    for name, grid_flow, ray_flow, expected in (
        (f"12a. {CHAIN}-task wait_for chain", grid_chain, ray_chain, CHAIN - 1),
        (f"12b. {FAN_IN}-task fan-in (one task takes all {FAN_IN} results)", grid_fan_in, ray_fan_in,
         FAN_IN * (FAN_IN - 1) // 2),
    ):
        grid_flow(), ray_flow()  # untimed: workers started and Prefect imported in them

        def run(f, expected=expected) -> None:
            assert f() == expected

        grid_times, ray_times = alternating(lambda: run(grid_flow), lambda: run(ray_flow), reps)
        ratio = ratio_stats(grid_times, ray_times)
        results.append(Result(
            name=name,
            measured=f"BoostRayTaskRunner {Stats(grid_times).fmt(1, ' s')}",
            baseline=f"prefect-ray RayTaskRunner {Stats(ray_times).fmt(1, ' s')}",
            ratio=ratio.fmt(1, "x", 2),
            goal="wall-time ratio <= 1.1",
            passed=ratio.median <= 1.1,
            note="the grid runner dispatches a dependent when its upstream tasks have finished (one driver round "
                 "trip per link); prefect-ray submits every task at once and a wait_for dependent waits inside "
                 "its Ray worker",
        ))
    return results


def main(argv: list[str]) -> int:
    reps = int(argv[0]) if argv else 5
    return run_alone(lambda address: chains(address, reps))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main(sys.argv[1:]))
