"""How many Ray workers to warm where a flow's tasks will run, and what each warm-up holds (pure).

A warm-up task starts a Ray worker and imports Prefect and grid-flows in it, so the flow's
first tasks there find a ready worker (``grid_flows.runner.warmup`` carries the plan out).
It holds one CPU of the place while it runs, so a task of the flow that arrives meanwhile
queues behind it in Ray and gets its worker rather than starting one more.

Example:
    >>> from grid_flows.core.models import Resources
    >>> warm_plan(Resources(cpu=2.5))
    WarmPlan(workers=2, hold=Resources(cpu=1.0, gpu=0.0, memory=0))
    >>> warm_plan(Resources(gpu=1)).workers
    1
"""

from __future__ import annotations

from dataclasses import dataclass

from grid_flows.core.models import Resources

# Each warm worker keeps Prefect in memory (~150 MB); Ray keeps at most a node's CPU count of
# idle workers anyway, and a flow with more slots starts the rest as its tasks arrive.
MAX_WARM_WORKERS = 8
_ONE_CPU = Resources(cpu=1)


@dataclass(frozen=True)
class WarmPlan:
    """``workers`` warm-up tasks, each holding ``hold`` while it runs (nothing after)."""

    workers: int
    hold: Resources


def warm_plan(room: Resources, cap: int = MAX_WARM_WORKERS) -> WarmPlan:
    """One worker per whole CPU of ``room`` (a node's free capacity or a boost's), at most ``cap``.

    A place without a whole CPU (a GPU-only boost, half a CPU) gets one worker that holds
    nothing: its tasks can only run one or two at a time there anyway.
    """
    if cap <= 0 or room.is_zero():
        return WarmPlan(0, Resources())
    if room.cpu >= 1:
        return WarmPlan(min(cap, int(room.cpu)), _ONE_CPU)
    return WarmPlan(1, Resources())
