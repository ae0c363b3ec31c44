"""Unit tests of grid_flows.core.preemption: which boosts to preempt, on an injected clock."""

from __future__ import annotations

import doctest
import itertools
from datetime import datetime, timedelta, timezone

import pytest

import grid_flows.core.preemption as preemption_module
from grid_flows.core.models import Boost, BoostState, Priority, Resources
from grid_flows.core.preemption import PreemptionPlan, plan_preemption, why_not

P = Priority
GIB = 1024**3
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
OLD = 600.0  # seconds: well past the default 60 s minimum runtime
TARGET = "gpu-master"
GPU1_IDLE = {"gpu1": (Resources(cpu=4, gpu=1, memory=8 * GIB), Resources())}  # share, nothing free


def boost(
    boost_id: str,
    priority: Priority = P.low,
    age: float = OLD,
    *,
    cpu: float = 1,
    gpu: float = 0,
    memory: int = 0,
    source: str = "gpu1",
    state: BoostState = BoostState.active,
) -> Boost:
    """A boost granted ``age`` seconds before NOW."""
    granted = NOW - timedelta(seconds=age)
    return Boost(
        id=boost_id,
        source=source,
        target=TARGET,
        resources=Resources(cpu=cpu, gpu=gpu, memory=memory),
        priority=priority,
        state=state,
        created_at=granted - timedelta(seconds=1),
        expires_at=granted + timedelta(hours=1),
        duration_seconds=3600,
        placement_group="grid-boost-" + boost_id,
        granted_at=granted if state is not BoostState.pending else None,
    )


def plan(request: Resources, priority: Priority, active, lenders=GPU1_IDLE, **kw) -> PreemptionPlan | None:
    kw.setdefault("target", TARGET)
    return plan_preemption(request, priority, lenders=lenders, active=active, now=NOW, **kw)


def reason(request: Resources, priority: Priority, active, lenders=GPU1_IDLE, **kw) -> str:
    kw.setdefault("target", TARGET)
    return why_not(request, priority, lenders=lenders, active=active, now=NOW, **kw)


def victim_ids(result: PreemptionPlan | None) -> list[str] | None:
    return None if result is None else [v.id for v in result.victims]


# --- the module itself ---------------------------------------------------------------


def test_docstring_examples_hold():
    result = doctest.testmod(preemption_module)
    assert result.attempted > 0 and result.failed == 0


# --- priority: only strictly lower ----------------------------------------------------

PRIORITY_PAIRS = list(itertools.product(Priority, Priority))


@pytest.mark.parametrize(
    ("request_priority", "victim_priority"),
    PRIORITY_PAIRS,
    ids=[f"{r.value}-takes-{v.value}" for r, v in PRIORITY_PAIRS],
)
def test_a_request_preempts_only_strictly_lower_priorities(request_priority, victim_priority):
    result = plan(Resources(cpu=1), request_priority, [boost("v1", victim_priority)])
    if victim_priority.rank < request_priority.rank:
        assert victim_ids(result) == ["v1"]
    else:
        assert result is None


def test_critical_takes_high_normal_and_low_together():
    active = [boost("h", P.high), boost("n", P.normal), boost("l", P.low)]
    assert victim_ids(plan(Resources(cpu=3), P.critical, active)) == ["l", "n", "h"]


def test_a_low_request_can_take_nothing_and_says_so():
    active = [boost("l", P.low), boost("n", P.normal)]
    assert plan(Resources(cpu=1), P.low, active) is None
    assert reason(Resources(cpu=1), P.low, active) == (
        "a low request can preempt nothing: only boosts of strictly lower priority are preempted"
    )


def test_equal_priority_boosts_are_never_victims_even_when_they_would_suffice():
    active = [boost("n1", P.normal), boost("n2", P.normal), boost("l1", P.low)]
    assert plan(Resources(cpu=2), P.normal, active) is None
    assert victim_ids(plan(Resources(cpu=1), P.normal, active)) == ["l1"]


# --- victim order and count -----------------------------------------------------------


@pytest.mark.parametrize(
    ("cpus_needed", "expected"),
    [
        (1, ["low-newest"]),
        (2, ["low-newest", "low-middle"]),
        (3, ["low-newest", "low-middle", "low-oldest"]),
        (4, ["low-newest", "low-middle", "low-oldest", "normal-newest"]),
        (5, ["low-newest", "low-middle", "low-oldest", "normal-newest", "normal-oldest"]),
        (6, None),  # more than all preemptible boosts together
    ],
)
def test_victims_are_lowest_priority_first_then_most_recently_granted(cpus_needed, expected):
    lenders = {"gpu1": (Resources(cpu=8), Resources())}
    active = [
        boost("low-oldest", P.low, age=3000),
        boost("normal-oldest", P.normal, age=2000),
        boost("low-newest", P.low, age=100),  # newer than both normal boosts
        boost("normal-newest", P.normal, age=70),
        boost("low-middle", P.low, age=500),
    ]
    assert victim_ids(plan(Resources(cpu=cpus_needed), P.high, active, lenders)) == expected


@pytest.mark.parametrize(
    ("wanted", "free", "active", "expected"),
    [
        # Three 1-CPU low boosts, 1 CPU needed: exactly one, the newest.
        (Resources(cpu=1), Resources(), [boost("a", age=300), boost("b", age=100), boost("c", age=200)], ["b"]),
        # Free capacity covers part of the request: fewer victims.
        (Resources(cpu=2), Resources(cpu=1), [boost("a", age=300), boost("b", age=100)], ["b"]),
        # One large victim is enough.
        (Resources(cpu=2), Resources(), [boost("big", cpu=3, age=100)], ["big"]),
        # Free capacity already holds it: a plan with no victims.
        (Resources(cpu=1), Resources(cpu=1), [boost("a")], []),
        # Fractional amounts.
        (Resources(cpu=0.5), Resources(cpu=0.25), [boost("q1", cpu=0.25, age=100), boost("q2", cpu=0.25)], ["q1"]),
    ],
    ids=["newest-of-three", "free-covers-part", "one-big", "already-fits", "fractional"],
)
def test_only_as_many_victims_as_the_request_needs(wanted, free, active, expected):
    lenders = {"gpu1": (Resources(cpu=4), free)}
    assert victim_ids(plan(wanted, P.high, active, lenders)) == expected


def test_a_plan_without_victims_says_nothing_is_preempted():
    result = plan(Resources(cpu=1), P.low, [], {"gpu1": (Resources(cpu=2), Resources(cpu=2))})
    assert result == PreemptionPlan("gpu1", (), "no preemption needed: gpu1 has room for 1 CPU")


# --- minimum runtime ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("age", "min_runtime", "eligible"),
    [
        (0, 60, False),
        (59.999, 60, False),
        (60, 60, True),  # the boundary: age >= min_runtime is eligible
        (61, 60, True),
        (0, 0, True),
        (119, 120, False),
        (120, 120, True),
    ],
)
def test_boosts_younger_than_the_minimum_runtime_are_exempt(age, min_runtime, eligible):
    result = plan(Resources(cpu=1), P.high, [boost("v", age=age)], min_runtime_seconds=min_runtime)
    assert victim_ids(result) == (["v"] if eligible else None)


def test_default_minimum_runtime_is_60_seconds():
    assert plan(Resources(cpu=1), P.high, [boost("v", age=59)]) is None
    assert victim_ids(plan(Resources(cpu=1), P.high, [boost("v", age=60)])) == ["v"]


def test_a_young_boost_is_skipped_for_the_next_newest_old_one():
    active = [boost("young", age=10), boost("newer", age=100), boost("older", age=900)]
    assert victim_ids(plan(Resources(cpu=1), P.high, active)) == ["newer"]


# --- several resources ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("wanted", "free", "active", "expected"),
    [
        # The newest low boost holds only CPU; the GPU must come back too, and that boost
        # also brings a CPU, so the CPU-only one is spared.
        (
            Resources(cpu=1, gpu=1),
            Resources(),
            [boost("cpu-only", cpu=2, age=100), boost("with-gpu", cpu=1, gpu=1, age=900)],
            ["with-gpu"],
        ),
        # Free CPU covers the CPU part: a CPU-only boost would be preempted for nothing.
        (
            Resources(cpu=1, gpu=1),
            Resources(cpu=1),
            [boost("cpu-only", cpu=1, age=100), boost("gpu-only", cpu=0, gpu=1, age=900)],
            ["gpu-only"],
        ),
        # Both are needed: one brings the CPU, the other the GPU.
        (
            Resources(cpu=1, gpu=1),
            Resources(),
            [boost("cpu-only", cpu=1, age=100), boost("gpu-only", cpu=0, gpu=1, age=900)],
            ["cpu-only", "gpu-only"],
        ),
        # Memory counts as well.
        (
            Resources(cpu=1, memory=4 * GIB),
            Resources(),
            [boost("small", cpu=1, memory=GIB, age=100), boost("large", cpu=1, memory=4 * GIB, age=900)],
            ["large"],
        ),
        # No boost holds a GPU: no plan, however many CPUs come back.
        (
            Resources(cpu=1, gpu=1),
            Resources(),
            [boost("c1", cpu=2), boost("c2", cpu=2)],
            None,
        ),
    ],
    ids=["gpu-victim-spares-cpu-victim", "free-cpu-skips-cpu-victim", "both-needed", "memory", "no-gpu-anywhere"],
)
def test_victims_must_free_every_resource_the_request_needs(wanted, free, active, expected):
    lenders = {"gpu1": (Resources(cpu=4, gpu=1, memory=8 * GIB), free)}
    assert victim_ids(plan(wanted, P.critical, active, lenders)) == expected


# --- choice of lender -----------------------------------------------------------------

SHARE = Resources(cpu=4, gpu=1)


@pytest.mark.parametrize(
    ("lenders", "active", "expected_lender", "expected_victims"),
    [
        # Fewest victims wins, even against lender order.
        (
            {"gpu1": (SHARE, Resources()), "gpu2": (SHARE, Resources())},
            [boost("a1"), boost("a2"), boost("b1", cpu=2, source="gpu2")],
            "gpu2",
            ["b1"],
        ),
        # Same count: the lower priority rank sum wins.
        (
            {"gpu1": (SHARE, Resources()), "gpu2": (SHARE, Resources())},
            [boost("a1", P.normal, cpu=2), boost("b1", P.low, cpu=2, source="gpu2")],
            "gpu2",
            ["b1"],
        ),
        # A full tie: the order the lenders were given in.
        (
            {"gpu2": (SHARE, Resources()), "gpu1": (SHARE, Resources())},
            [boost("a1", cpu=2), boost("b1", cpu=2, source="gpu2")],
            "gpu2",
            ["b1"],
        ),
        (
            {"gpu1": (SHARE, Resources()), "gpu2": (SHARE, Resources())},
            [boost("a1", cpu=2), boost("b1", cpu=2, source="gpu2")],
            "gpu1",
            ["a1"],
        ),
        # A lender with room needs no victims and is cheapest of all.
        (
            {"gpu1": (SHARE, Resources()), "gpu2": (SHARE, Resources(cpu=2))},
            [boost("a1", cpu=2)],
            "gpu2",
            [],
        ),
        # A lender whose share is too small is passed over, not preferred.
        (
            {"gpu1": (Resources(cpu=1), Resources()), "gpu2": (SHARE, Resources())},
            [boost("a1", cpu=1), boost("b1"), boost("b2", source="gpu2"), boost("b3", source="gpu2")],
            "gpu2",
            ["b2", "b3"],
        ),
    ],
    ids=["fewest-victims", "lowest-rank-sum", "tie-order-gpu2-first", "tie-order-gpu1-first", "free-room", "share"],
)
def test_the_cheapest_lender_is_chosen(lenders, active, expected_lender, expected_victims):
    result = plan(Resources(cpu=2), P.high, active, lenders)
    assert result is not None
    assert (result.lender, victim_ids(result)) == (expected_lender, expected_victims)
    assert all(v.source == expected_lender for v in result.victims)


def test_boosts_on_other_lenders_do_not_help():
    lenders = {"gpu1": (SHARE, Resources()), "gpu2": (Resources(cpu=1), Resources())}
    active = [boost("a1"), boost("b1", source="gpu2"), boost("b2", source="gpu2")]
    assert plan(Resources(cpu=2), P.high, active, lenders) is None


TWO_LENDERS = {"gpu1": (SHARE, Resources()), "gpu2": (SHARE, Resources())}
CHEAP_ON_GPU2 = [boost("a1"), boost("a2"), boost("b1", cpu=2, source="gpu2")]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (None, ("gpu2", ["b1"])),
        ("gpu1", ("gpu1", ["a1", "a2"])),  # dearer, but the only one allowed
        ("gpu2", ("gpu2", ["b1"])),
        ("gpu3", None),  # not a lender
        (TARGET, None),
    ],
)
def test_a_source_restricts_the_plan_to_that_lender(source, expected):
    result = plan(Resources(cpu=2), P.high, CHEAP_ON_GPU2, TWO_LENDERS, source=source)
    assert (None if result is None else (result.lender, victim_ids(result))) == expected


def test_a_source_without_a_plan_gives_none_even_if_another_lender_has_one():
    active = [boost("b1", cpu=2, source="gpu2")]
    assert plan(Resources(cpu=2), P.high, active, TWO_LENDERS, source="gpu1") is None
    assert victim_ids(plan(Resources(cpu=2), P.high, active, TWO_LENDERS)) == ["b1"]


@pytest.mark.parametrize("source", [None, "gpu1"])
def test_the_target_never_lends_to_itself(source):
    lenders = {"gpu1": (SHARE, Resources(cpu=4)), "gpu2": (SHARE, Resources())}
    active = [boost("b1", cpu=2, source="gpu2")]
    result = plan(Resources(cpu=2), P.high, active, lenders, target="gpu1", source=source)
    if source is None:
        assert (result.lender, victim_ids(result)) == ("gpu2", ["b1"])
    else:
        assert result is None


@pytest.mark.parametrize(
    "wanted",
    [Resources(cpu=5), Resources(cpu=1, gpu=2), Resources(memory=9 * GIB)],
    ids=["cpu", "gpu", "memory"],
)
def test_a_request_larger_than_the_share_has_no_plan(wanted):
    # Even if the lender's free capacity and victims (wrongly) add up to more than its share.
    lenders = {"gpu1": (Resources(cpu=4, gpu=1, memory=8 * GIB), Resources(cpu=9, gpu=9, memory=99 * GIB))}
    assert plan(wanted, P.critical, [boost("v", cpu=9, gpu=9)], lenders) is None


# --- states ---------------------------------------------------------------------------

NOT_ACTIVE = [s for s in BoostState if s is not BoostState.active]


@pytest.mark.parametrize("state", NOT_ACTIVE, ids=[s.value for s in NOT_ACTIVE])
def test_only_active_boosts_are_ever_victims(state):
    active = [boost("v", state=state), boost("live", cpu=1, age=900)]
    assert victim_ids(plan(Resources(cpu=1), P.critical, active)) == ["live"]
    assert plan(Resources(cpu=2), P.critical, active) is None


# --- determinism ----------------------------------------------------------------------


def test_the_result_does_not_depend_on_the_order_of_the_boosts():
    same_grant_time = [boost(f"t{i}", age=300) for i in range(3)]  # ties broken by id
    mixed = [boost("n", P.normal, age=100), boost("l", P.low, age=900), boost("x", cpu=1, gpu=1, age=200)]
    boosts = same_grant_time + mixed
    request = Resources(cpu=3, gpu=1)
    results = [
        plan(request, P.high, list(perm), {"gpu1": (SHARE, Resources())})
        for perm in itertools.permutations(boosts)
    ]
    assert all(r == results[0] for r in results)
    assert victim_ids(results[0]) == ["x", "t0", "t1"]


def test_the_same_input_gives_the_same_plan_and_does_not_change_the_boosts():
    active = [boost("a", age=100), boost("b", age=200)]
    before = [b.model_copy() for b in active]
    first = plan(Resources(cpu=1), P.high, active)
    assert first == plan(Resources(cpu=1), P.high, active)
    assert active == before
    assert first.freed == Resources(cpu=1)


# --- the words ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wanted", "active", "expected"),
    [
        (Resources(cpu=1), [boost("ab12cd34ef")], "preempt 1 low boost on gpu1 (ab12cd34) to fit 1 CPU"),
        (
            Resources(cpu=2),
            [boost("ab12cd34", age=100), boost("ef567890", age=200)],
            "preempt 2 low boosts on gpu1 (ab12cd34, ef567890) to fit 2 CPU",
        ),
        (
            Resources(cpu=2, gpu=1),
            [boost("n1", P.normal, cpu=1, gpu=1), boost("l1")],
            "preempt 1 low and 1 normal boosts on gpu1 (l1, n1) to fit 2 CPU, 1 GPU",
        ),
    ],
)
def test_the_plan_reason_is_one_human_line(wanted, active, expected):
    assert plan(wanted, P.critical, active).reason == expected


@pytest.mark.parametrize(
    ("wanted", "priority", "active", "kwargs", "expected"),
    [
        (Resources(cpu=1), P.high, [boost("v")], {}, "a plan exists: preempt 1 low boost on gpu1 (v) to fit 1 CPU"),
        (Resources(cpu=1), P.normal, [boost("n1", P.normal), boost("h1", P.high)], {},
         "only normal-or-higher boosts hold gpu1's share"),
        (Resources(cpu=1), P.critical, [boost("c1", P.critical)], {}, "only critical boosts hold gpu1's share"),
        (Resources(cpu=1), P.high, [boost("young", age=12)], {},
         "boost young on gpu1 is younger than 60 s (12 s old)"),
        (Resources(cpu=2), P.high, [boost("y2", age=5), boost("y1", age=30)], {},
         "boosts y1, y2 on gpu1 are younger than 60 s"),
        (Resources(cpu=1, gpu=1), P.high, [boost("c1", cpu=2)], {},
         "even preempting every lower-priority boost on gpu1 leaves it short of 1 GPU (has 0)"),
        (Resources(cpu=1), P.high, [boost("p", state=BoostState.pending)], {},
         "gpu1 has no active boosts to preempt and lacks 1 CPU (has 0)"),
        (Resources(cpu=5), P.high, [boost("v")], {}, "5 CPU is more than gpu1's share (4 CPU, 1 GPU, 8 GiB)"),
        (Resources(cpu=1), P.high, [boost("v")], {"source": "gpu9"}, "gpu9 is not a lender (lenders: gpu1)"),
        (Resources(cpu=1), P.high, [boost("v")], {"source": "gpu1", "target": "gpu1"},
         "gpu1 is the target itself; a node never lends to itself"),
        (Resources(cpu=1), P.high, [boost("v")], {"target": "gpu1"}, "no lender other than the target gpu1"),
    ],
    ids=["plan-exists", "equal-or-higher", "critical", "young", "young-plural", "short", "none-active",
         "share", "unknown-source", "source-is-target", "only-target"],
)
def test_why_not_explains_in_one_line(wanted, priority, active, kwargs, expected):
    assert reason(wanted, priority, active, **kwargs) == expected


def test_why_not_names_every_lender_considered():
    lenders = {"gpu1": (Resources(cpu=1), Resources()), "gpu2": (SHARE, Resources())}
    active = [boost("h", P.high, source="gpu2")]
    assert reason(Resources(cpu=2), P.high, active, lenders) == (
        "2 CPU is more than gpu1's share (1 CPU); only high-or-higher boosts hold gpu2's share"
    )
