"""How many Ray workers a warm-up starts, and what each holds (core.warmup.warm_plan)."""

from __future__ import annotations

import pytest

from grid_flows.core.models import Resources
from grid_flows.core.warmup import MAX_WARM_WORKERS, WarmPlan, warm_plan

ONE_CPU = Resources(cpu=1)
NOTHING = Resources()


@pytest.mark.parametrize(
    "room, cap, expected",
    [
        (Resources(cpu=1), MAX_WARM_WORKERS, WarmPlan(1, ONE_CPU)),  # the demo's head
        (Resources(cpu=2, memory="4GiB"), MAX_WARM_WORKERS, WarmPlan(2, ONE_CPU)),  # the demo's boost
        (Resources(cpu=2.9), MAX_WARM_WORKERS, WarmPlan(2, ONE_CPU)),  # whole CPUs only: a third would queue
        (Resources(cpu=64), MAX_WARM_WORKERS, WarmPlan(MAX_WARM_WORKERS, ONE_CPU)),  # a big node: capped
        (Resources(cpu=64), 3, WarmPlan(3, ONE_CPU)),
        (Resources(gpu=1), MAX_WARM_WORKERS, WarmPlan(1, NOTHING)),  # a GPU-only boost: one worker, holds nothing
        (Resources(cpu=0.5), MAX_WARM_WORKERS, WarmPlan(1, NOTHING)),
        (Resources(memory="1GiB"), MAX_WARM_WORKERS, WarmPlan(1, NOTHING)),
        (NOTHING, MAX_WARM_WORKERS, WarmPlan(0, NOTHING)),  # nothing to run in: nothing to warm
        (Resources(cpu=4), 0, WarmPlan(0, NOTHING)),  # warming switched off by the cap
    ],
)
def test_warm_plan(room, cap, expected):
    assert warm_plan(room, cap) == expected
