"""A boosted flow to deploy: 6 tasks that report, from inside, where Ray ran them.

The flow borrows 2 CPUs from ``gpu1`` for 10 minutes (``@boosted``). The head
(``gpu-master``) has 1 CPU, so with ``allow_offload=False`` every task runs either on
the head or inside the boost's placement group on ``gpu1`` -- never on a lender's
share without a boost. Each task returns the Ray node id and placement group id it saw.

Run it locally (needs RAY_ADDRESS and PREFECT_API_URL):
    python deployments/boosted_example.py
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task

from grid_flows import BoostRayTaskRunner, boosted


@task
def where_am_i(i: int, hold_seconds: float = 2.0) -> dict:
    """Report the Ray node and placement group this task runs in."""
    import ray

    ctx = ray.get_runtime_context()
    time.sleep(hold_seconds)  # hold the CPU so that the head fills up and the boost is used
    pg = ctx.get_placement_group_id()
    return {"task": i, "node_id": ctx.get_node_id(), "placement_group_id": pg or None}


@boosted(cpu=2, source="gpu1", duration="10m")
@flow(name="boosted-example", task_runner=BoostRayTaskRunner(allow_offload=False))
def boosted_example(n_tasks: int = 6, hold_seconds: float = 2.0) -> list[dict]:
    futures = where_am_i.map(range(n_tasks), hold_seconds=hold_seconds)
    rows = [f.result() for f in futures]
    logger = get_run_logger()
    for row in rows:
        logger.info("task %d ran on Ray node %s, placement group %s",
                    row["task"], row["node_id"], row["placement_group_id"] or "none")
    return rows


if __name__ == "__main__":
    for row in boosted_example():
        print(row)
