"""Profile what one trivial task costs outside Ray: the driver's context serialization and
the worker's task body, Prefect's way (prefect-ray) and grid-flows' way (task_context.py).

    .venv/bin/python -m benchmarks.profile_task [TASKS] [--cprofile]

Runs against a local Prefect server with the test cluster's blocks, in one process: the
"worker" part calls the same functions a Ray worker calls (``RayTaskRunner._run_prefect_task``
or ``runner.worker._run_guarded_task``) from a plain thread, as a worker does, so cProfile sees
them. Prints milliseconds per task and, with ``--cprofile``, the top functions of each.
This is how the runner's hot path was found (BENCHMARKS.md, "Runner overhead").
"""

from __future__ import annotations

import copy
import cProfile
import io
import pstats
import sys
import threading
import time
import uuid

from benchmarks.common import quiet_environment


def main(argv: list[str]) -> int:
    tasks = int(next((a for a in argv if a.isdigit()), "100"))
    profile = "--cprofile" in argv
    quiet_environment()
    from prefect import flow, task
    from prefect.context import serialize_context
    from prefect_ray import RayTaskRunner

    from benchmarks import integration as I
    from grid_flows.runner.worker import _run_guarded_task
    from grid_flows.adapters.prefect.task_context import serialize_task_context

    @task
    def noop(i: int) -> int:
        return i

    ways = {
        "prefect-ray": (lambda kw: serialize_context(asset_ctx_kwargs=kw), RayTaskRunner._run_prefect_task),
        "grid-flows": (serialize_task_context, _run_guarded_task),
    }
    rows = []
    with I.grid():
        @flow(persist_result=False)
        def measure() -> None:
            # A few untimed tasks each way first: one-time imports and caches land on neither row.
            passes = [(name, warm, n) for warm, n in ((True, 5), (False, tasks)) for name in ways]
            for name, warm, count in passes:
                serialize, run = ways[name]
                ids = [uuid.uuid4() for _ in range(count)]
                t0 = time.perf_counter()
                contexts = [serialize({"task": noop, "task_run_id": i, "task_inputs": {"i": set()},
                                       "copy_to_child_ctx": True}) for i in ids]
                driver_ms = (time.perf_counter() - t0) / count * 1000
                for context in contexts:  # in Ray each task unpickles its own copy of the settings
                    context["settings_context"] = copy.deepcopy(context["settings_context"])
                stats: dict = {}

                def worker() -> None:  # outside the flow's context, like a Ray worker thread
                    profiler = cProfile.Profile() if profile and not warm else None
                    t1 = time.perf_counter()
                    if profiler:
                        profiler.enable()
                    for n, (run_id, context) in enumerate(zip(ids, contexts)):
                        stats.setdefault("results", []).append(
                            run(task=noop, task_run_id=run_id, parameters={"i": n}, wait_for=None,
                                dependencies=None, context=context))
                    if profiler:
                        profiler.disable()
                        out = io.StringIO()
                        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
                        stats["profile"] = out.getvalue()
                    stats["ms"] = (time.perf_counter() - t1) / count * 1000

                thread = threading.Thread(target=worker)
                thread.start()
                thread.join()
                results = [state.result() for state in stats["results"]]  # the task's state
                assert results == list(range(count)), f"{name}: wrong results {results[:5]}"
                completed = _completed_runs(ids)  # task run states reach the server as events, a bit later
                deadline = time.monotonic() + 60
                while completed < count and time.monotonic() < deadline:
                    time.sleep(0.5)
                    completed = _completed_runs(ids)
                assert completed == count, f"{name}: {completed} of {count} task runs Completed in Prefect"
                if warm:
                    continue
                rows.append((name, driver_ms, stats["ms"]))
                if profile:
                    print(f"--- {name}: worker side, top functions by cumulative time\n{stats['profile']}")

        measure()
    print(f"{'':12} {'driver: serialize ms/task':>26} {'worker: task body ms/task':>26}")
    for name, driver_ms, worker_ms in rows:
        print(f"{name:12} {driver_ms:26.1f} {worker_ms:26.1f}")
    return 0


def _completed_runs(ids: list) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=ids)), limit=len(ids))
    return sum(1 for r in runs if r.state and r.state.is_completed())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
