"""Warm Ray workers before a flow's first tasks arrive (``BoostRayTaskRunner(warm_up=True)``).

A Ray worker's first Prefect task pays for starting the process, importing Prefect,
prefect-ray and grid-flows (about a second of CPU each), and building the worker's
settings and API client. Ray keeps an idle worker for the next task of the same job and
runtime environment, so a short task doing just that, started where the flow's tasks
will run, leaves those workers ready. Ray's own reuse does the rest: no pool of ours.

Example:
    ```python
    refs = start_warm_up(ray.remote(_run_guarded_task), 3, {"num_cpus": 1}, settings_for_workers())
    pids = ray.get(refs, timeout=60)  # the workers the flow's next tasks will reuse
    ```
"""

from __future__ import annotations

import os
from typing import Any

WARM_UP_TASK_NAME = "grid-warm-up"


def prepare_worker(settings: dict[str, Any]) -> int:
    """Runs in the Ray worker: import what a task needs and open the worker's cached settings
    and client for ``settings`` (the flow's, as its tasks will carry them; ``{}``: none).
    Returns the pid."""
    import prefect.task_engine  # noqa: F401  (the engine prefect-ray's task body runs)

    from grid_flows.adapters.prefect.task_context import worker_context

    if settings:
        try:
            with worker_context(settings):
                pass
        except Exception:  # e.g. the API not reachable yet: the first task opens the client itself
            pass
    return os.getpid()


def start_warm_up(remote_fn: Any, workers: int, options: dict[str, Any], settings: dict[str, Any]) -> list:
    """Submit ``workers`` warm-up calls of the runner's remote task function (``runner.worker``)
    with these Ray ``options`` (where they run and what they hold, from ``rc.task_options``);
    returns their refs at once."""
    call = remote_fn.options(name=WARM_UP_TASK_NAME, **options)
    return [call.remote(grid_warm_up=settings) for _ in range(workers)]
