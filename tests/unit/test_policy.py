"""Rebalance decisions on an injected clock, injected metrics and hand-made boosts."""

from __future__ import annotations

import doctest
from datetime import datetime, timedelta, timezone

import pytest

import grid_flows.core.policy as policy_module
from grid_flows.core.models import Boost, BoostState, ClusterSpec, Priority, Resources
from grid_flows.core.policy import Decision, decide
from grid_flows.core.pressure import MetricsHistory, NodeSample

NOW = datetime(2025, 1, 1, 12, tzinfo=timezone.utc)
STEP = timedelta(seconds=10)  # the spec's default monitoring interval
GIB = 1024**3
HEAD = "gpu-master"
ALL_OF_GPU1 = Resources(cpu=4, gpu=1, memory=8 * GIB)
HALF_OF_GPU1 = Resources(cpu=2, gpu=0.5, memory=4 * GIB)


def make_spec(mode="share_and_offload", policy="balanced", enabled=True, gpu2_priority=10, **sharing) -> ClusterSpec:
    return ClusterSpec.model_validate(
        {
            "nodes": [
                {"name": HEAD, "role": "head", "cpu_count": 8},
                {
                    "name": "gpu1",
                    "cpu_count": 16,
                    "gpu_count": 1,
                    "memory_gb": 32,
                    "resource_sharing": {
                        "can_share": True,
                        "max_share_cpu": 4,
                        "max_share_gpu": 1,
                        "max_share_memory_gb": 8,
                    },
                },
                {
                    "name": "gpu2",
                    "cpu_count": 8,
                    "resource_sharing": {"can_share": True, "max_share_cpu": 2, "priority": gpu2_priority},
                },
                {"name": "gpu3", "cpu_count": 8, "resource_sharing": {"can_share": False, "max_share_cpu": 4}},
            ],
            "resource_sharing": {"enabled": enabled, "mode": mode, "policy": policy, **sharing},
        }
    )


def point(value) -> dict:
    """A number is a cpu percent with quiet memory; a dict gives the sample fields."""
    if isinstance(value, dict):
        return {"cpu_percent": 5, "memory_percent": 10, "swap_percent": 0, **value}
    return {"cpu_percent": value, "memory_percent": 10, "swap_percent": 0}


def add_series(history: MetricsHistory, node: str, values, end: datetime = NOW, step: timedelta = STEP) -> None:
    """Samples one ``step`` apart, the last one at ``end``."""
    for i, value in enumerate(values):
        history.add(NodeSample(node, end - (len(values) - 1 - i) * step, **point(value)))


def history_of(series: dict[str, list], end: datetime = NOW) -> MetricsHistory:
    history = MetricsHistory()
    for node, values in series.items():
        add_series(history, node, values, end)
    return history


QUIET_LENDERS = {"gpu1": [10, 10, 10], "gpu2": [50, 50, 50], "gpu3": [10, 10, 10]}


def boost(
    boost_id: str,
    source: str = "gpu1",
    target: str = HEAD,
    *,
    priority: Priority = Priority.normal,
    origin: str = "rebalance",
    granted_ago: timedelta = timedelta(minutes=10),
    state: BoostState = BoostState.active,
    cpu: float = 2,
) -> Boost:
    granted = NOW - granted_ago
    return Boost(
        id=boost_id,
        source=source,
        target=target,
        resources=Resources(cpu=cpu),
        priority=priority,
        state=state,
        created_at=granted - timedelta(seconds=1),
        expires_at=granted + timedelta(hours=1),
        duration_seconds=3600,
        placement_group=f"grid-boost-{boost_id}",
        granted_at=granted if state is BoostState.active else None,
        origin=origin,
    )


def actions(decisions: list[Decision]) -> list[tuple]:
    return [(d.action, d.node, d.boost_id, d.source) for d in decisions]


def only_none(decisions: list[Decision]) -> Decision:
    assert [d.action for d in decisions] == ["none"], decisions
    assert decisions[0].node == "" and decisions[0].boost_id is None and decisions[0].resources is None
    return decisions[0]


# --- mode and policy ----------------------------------------------------------------


@pytest.mark.parametrize(
    "enabled, mode, policy, expected",
    [
        pytest.param(False, "share_and_offload", "aggressive", "disabled", id="disabled-never-grants"),
        pytest.param(True, "offload_only", "balanced", "offload_only", id="offload-only-never-grants"),
        pytest.param(True, "offload_only", "aggressive", "offload_only", id="offload-only-aggressive"),
        pytest.param(True, "share_and_offload", "conservative", "conservative", id="conservative-never-grants"),
        pytest.param(True, "dynamic_balancing", "conservative", "conservative", id="conservative-dynamic"),
        pytest.param(True, "share_and_offload", "balanced", HALF_OF_GPU1, id="balanced-half"),
        pytest.param(True, "dynamic_balancing", "balanced", HALF_OF_GPU1, id="balanced-dyn"),
        pytest.param(True, "share_and_offload", "aggressive", ALL_OF_GPU1, id="aggressive-all"),
        pytest.param(True, "dynamic_balancing", "predictive", HALF_OF_GPU1, id="predictive-half"),
    ],
)
def test_mode_and_policy_decide_whether_and_how_much_to_lend(enabled, mode, policy, expected):
    history = history_of({HEAD: [95, 95], **QUIET_LENDERS})
    decisions = decide(make_spec(mode, policy, enabled), history, [], NOW)
    if isinstance(expected, str):
        assert expected in only_none(decisions).reason
        return
    [grant] = decisions
    assert (grant.action, grant.node, grant.source, grant.boost_id) == ("grant", HEAD, "gpu1", None)
    assert grant.resources == expected
    assert grant.priority is Priority.normal
    assert "gpu1" in grant.reason and "cpu 0.95 > 0.80" in grant.reason


@pytest.mark.parametrize(
    "policy, lent, expected_cpu",
    [
        ("balanced", [boost("api-1", origin="api", target="gpu3", cpu=2)], 1.0),
        ("aggressive", [boost("api-1", origin="api", target="gpu3", cpu=2)], 2.0),
        ("balanced", [boost("p-1", target="gpu3", cpu=3, origin="api", state=BoostState.pending)], 0.5),
        ("balanced", [boost("gone", target="gpu3", cpu=4, origin="api", state=BoostState.released)], 2.0),
    ],
)
def test_lends_a_share_of_what_is_still_free(policy, lent, expected_cpu):
    history = history_of({HEAD: [95, 95], "gpu1": [10, 10], "gpu2": [70, 70], "gpu3": [50, 50]})
    decisions = decide(make_spec(policy=policy), history, lent, NOW)
    grants = [d for d in decisions if d.action == "grant" and d.node == HEAD]
    assert [(d.source, d.resources.cpu) for d in grants] == [("gpu1", expected_cpu)]


@pytest.mark.parametrize(
    "gpu1, gpu2, gpu2_priority, expected_source",
    [
        pytest.param([10, 10], [50, 50], 10, "gpu1", id="least-pressured"),
        pytest.param([60, 60], [20, 20], 10, "gpu2", id="least-pressured-other"),
        pytest.param([20, 20], [20, 20], 1, "gpu2", id="tie-goes-to-lower-sharing-priority"),
        pytest.param([20, 20], [20, 20], 10, "gpu1", id="full-tie-by-name"),
        pytest.param([10, 95], [70, 70], 10, "gpu2", id="busy-lender-skipped"),
        pytest.param([], [70, 70], 10, "gpu2", id="lender-without-samples-skipped"),
        pytest.param([95, 95], [95, 95], 10, None, id="no-lender-quiet-enough"),
        pytest.param([], [], 10, None, id="no-lender-known"),
    ],
)
def test_grant_comes_from_the_least_pressured_able_lender(gpu1, gpu2, gpu2_priority, expected_source):
    history = history_of({HEAD: [95, 95], "gpu1": gpu1, "gpu2": gpu2, "gpu3": [0, 0]})
    decisions = decide(make_spec(gpu2_priority=gpu2_priority), history, [], NOW)
    if expected_source is None:
        assert "no idle-enough lender" in only_none(decisions).reason
    else:
        assert actions(decisions) == [("grant", HEAD, None, expected_source)]


def test_a_node_that_cannot_share_never_lends():
    # gpu3 is the quietest node but can_share is false.
    history = history_of({HEAD: [95, 95], "gpu1": [40, 40], "gpu2": [40, 40], "gpu3": [0, 0]})
    assert [d.source for d in decide(make_spec(), history, [], NOW)] == ["gpu1"]


def test_stale_lender_is_skipped():
    history = history_of({HEAD: [95, 95], "gpu2": [70, 70]})
    add_series(history, "gpu1", [0, 0], end=NOW - timedelta(minutes=5))
    assert [d.source for d in decide(make_spec(), history, [], NOW)] == ["gpu2"]


# --- when a borrower is busy ----------------------------------------------------------


@pytest.mark.parametrize(
    "head, grants",
    [
        pytest.param([95], False, id="one-sample"),
        pytest.param([50, 95], False, id="one-spike-does-not-grant"),
        pytest.param([95, 50], False, id="spike-passed"),
        pytest.param([95, 50, 95], False, id="two-spikes-apart"),
        pytest.param([80, 80], False, id="at-high-is-not-above"),
        pytest.param([81, 95], True, id="two-consecutive"),
        pytest.param([50, 95, 95], True, id="two-consecutive-after-quiet"),
        pytest.param([{"memory_percent": 95}] * 2, True, id="memory-alone-is-enough"),
        pytest.param([{"memory_percent": 70, "swap_percent": 60}] * 2, True, id="swap-pushes-memory-over"),
        pytest.param([{"gpu_util_percent": 95}] * 2, True, id="gpu-alone-is-enough"),
        pytest.param([{"gpu_memory_percent": 90}] * 2, True, id="gpu-memory-is-enough"),
        pytest.param([{"cpu_percent": 70, "memory_percent": 70}] * 2, False, id="high-total-but-no-resource-over"),
    ],
)
def test_two_consecutive_busy_samples_are_needed(head, grants):
    history = history_of({HEAD: head, **QUIET_LENDERS})
    decisions = decide(make_spec(), history, [], NOW)
    assert [d.action for d in decisions] == (["grant"] if grants else ["none"])


def test_busy_samples_with_a_gap_between_them_are_not_in_a_row():
    history = history_of(QUIET_LENDERS)
    add_series(history, HEAD, [95], end=NOW - timedelta(hours=1))  # the rebalancer was stopped since
    add_series(history, HEAD, [95], end=NOW)
    assert [d.action for d in decide(make_spec(), history, [], NOW)] == ["none"]
    add_series(history, HEAD, [95], end=NOW + STEP)  # the next sample makes two in a row
    assert [d.action for d in decide(make_spec(), history, [], NOW + STEP)] == ["grant"]


def rising(start: float, per_minute: float, minutes: float = 5) -> list[float]:
    """cpu percents one STEP apart, rising ``per_minute`` percent a minute, ending at NOW."""
    count = int(minutes * 60 / STEP.total_seconds())
    return [start + per_minute * i * STEP.total_seconds() / 60 for i in range(count + 1)]


@pytest.mark.parametrize(
    "head, policy, grants",
    [
        pytest.param(rising(50, 5), "predictive", True, id="predictive-grants-before-crossing"),
        pytest.param(rising(50, 5), "balanced", False, id="balanced-waits-for-the-crossing"),
        pytest.param(rising(50, 5), "aggressive", False, id="aggressive-waits-for-the-crossing"),
        pytest.param(rising(60, 1), "predictive", False, id="too-slow-to-cross-in-5-minutes"),
        pytest.param(rising(75, 0), "predictive", False, id="flat-below-high"),
        pytest.param(rising(79, -1), "predictive", False, id="falling"),
        pytest.param([70, 78], "predictive", False, id="two-points-are-not-a-trend"),
        pytest.param([95] * 30 + [79], "predictive", False, id="falling-from-busy-is-not-a-crossing"),
        pytest.param(rising(22, 11), "predictive", True, id="steep-rise-from-low"),
        # The 5-minute line damps a late jump; two busy samples will catch it if it stays.
        pytest.param([10] * 28 + [60, 70, 78], "predictive", False, id="late-jump-is-not-a-trend"),
    ],
)
def test_predictive_acts_on_the_5_minute_prediction(head, policy, grants):
    assert head[-1] < 80  # the latest sample is not busy: only a prediction can grant
    history = history_of({HEAD: head, **QUIET_LENDERS})
    decisions = decide(make_spec(policy=policy), history, [], NOW)
    assert [d.action for d in decisions] == (["grant"] if grants else ["none"])
    if grants:
        assert "predicted cpu" in decisions[0].reason
        assert decisions[0].resources == HALF_OF_GPU1  # lends like balanced


@pytest.mark.parametrize(
    "held, grants",
    [
        pytest.param([boost("r-1")], False, id="active-rebalance-boost-blocks"),
        pytest.param([boost("r-1", state=BoostState.pending)], False, id="pending-rebalance-boost-blocks"),
        pytest.param([boost("a-1", origin="api")], True, id="api-boost-does-not-block"),
        pytest.param([boost("r-1", state=BoostState.expired)], True, id="ended-boost-does-not-block"),
    ],
)
def test_one_rebalance_boost_per_borrower(held, grants):
    history = history_of({HEAD: [95, 95], **QUIET_LENDERS})
    decisions = decide(make_spec(policy="aggressive"), history, held, NOW)
    assert [d.action for d in decisions] == (["grant"] if grants else ["none"])
    if not grants:
        assert "already holds rebalance boost r-1" in decisions[0].reason


def test_borrowers_share_lenders_without_overdrawing_them():
    # gpu3 borrows 1 CPU of gpu1 through the API, so it is a borrower too; both are busy.
    lent = [boost("a-1", target="gpu3", origin="api", cpu=1)]
    history = history_of({HEAD: [95, 95], "gpu3": [95, 95], "gpu1": [10, 10], "gpu2": [20, 20]})
    decisions = decide(make_spec(policy="aggressive"), history, lent, NOW)
    assert [(d.action, d.node, d.source, d.resources.cpu) for d in decisions] == [
        ("grant", HEAD, "gpu1", 3.0),  # all that is left of gpu1's 4
        ("grant", "gpu3", "gpu2", 2.0),  # gpu1 has nothing left
    ]


def test_a_worker_that_does_not_borrow_is_not_a_borrower():
    history = history_of({HEAD: [50, 50], "gpu3": [95, 95], **{k: v for k, v in QUIET_LENDERS.items() if k != "gpu3"}})
    only_none(decide(make_spec(policy="aggressive"), history, [], NOW))


# --- release when idle ------------------------------------------------------------------


@pytest.mark.parametrize(
    "head, granted_ago_s, origin, kwargs, released",
    [
        pytest.param([10, 10, 10], 120, "rebalance", {}, True, id="idle-and-held"),
        pytest.param([50, 10, 10], 120, "rebalance", {}, False, id="two-idle-of-three"),
        pytest.param([50, 10, 10], 120, "rebalance", {"idle_samples": 2}, True, id="idle-samples-parameter"),
        pytest.param([10, 10, 35], 120, "rebalance", {}, False, id="between-thresholds-keeps"),
        pytest.param([10, 10, 10], 30, "rebalance", {}, False, id="held-less-than-min-runtime"),
        pytest.param([10, 10, 10], 30, "rebalance", {"min_hold_seconds": 20}, True, id="min-hold-parameter"),
        pytest.param([10, 10, 10], 60, "rebalance", {}, True, id="held-exactly-min-runtime"),
        pytest.param([10, 10, 10], 120, "api", {}, False, id="api-boosts-are-not-released"),
        pytest.param([{"gpu_util_percent": 50}] * 3, 120, "rebalance", {}, False, id="busy-gpu-is-not-idle"),
        pytest.param([{"memory_percent": 25, "swap_percent": 30}] * 3, 120, "rebalance", {}, False, id="swap-counts"),
    ],
)
def test_release_idle_rebalance_boost(head, granted_ago_s, origin, kwargs, released):
    held = boost("r-1", origin=origin, granted_ago=timedelta(seconds=granted_ago_s))
    history = history_of({HEAD: head, **QUIET_LENDERS})
    decisions = decide(make_spec(), history, [held], NOW, **kwargs)
    if released:
        [release] = decisions
        assert (release.action, release.node, release.boost_id, release.source) == ("release", HEAD, "r-1", "gpu1")
        assert (release.resources, release.priority) == (Resources(cpu=2), Priority.normal)
    else:
        only_none(decisions)


def test_hold_time_counts_from_creation_when_grant_time_is_missing():
    held = boost("r-1", granted_ago=timedelta(seconds=120)).model_copy(update={"granted_at": None})
    history = history_of({HEAD: [10, 10, 10], **QUIET_LENDERS})
    assert actions(decide(make_spec(), history, [held], NOW)) == [("release", HEAD, "r-1", "gpu1")]


def test_a_node_without_gpu_is_judged_on_cpu_and_memory_only():
    # With gpu.low at 0 no GPU could ever look idle; a node without one must still be releasable.
    spec = make_spec(thresholds={"gpu": {"low": 0, "high": 0.5}})
    history = history_of({HEAD: [10, 10, 10], **QUIET_LENDERS})
    assert actions(decide(spec, history, [boost("r-1")], NOW)) == [("release", HEAD, "r-1", "gpu1")]


def test_idle_but_too_young_says_so():
    held = boost("r-1", granted_ago=timedelta(seconds=30))
    history = history_of({HEAD: [10, 10, 10], **QUIET_LENDERS})
    assert "minimum 60s" in only_none(decide(make_spec(), history, [held], NOW)).reason


def test_idle_samples_must_be_positive():
    with pytest.raises(ValueError, match="idle_samples"):
        decide(make_spec(), MetricsHistory(), [], NOW, idle_samples=0)


# --- protect the lender -------------------------------------------------------------------


def lent_by_gpu1() -> list[Boost]:
    return [
        boost("normal-old", priority=Priority.normal, granted_ago=timedelta(minutes=20)),
        boost("critical", priority=Priority.critical, granted_ago=timedelta(minutes=1), origin="api"),
        boost("high", priority=Priority.high, granted_ago=timedelta(minutes=2), origin="api"),
        boost("low", priority=Priority.low, granted_ago=timedelta(minutes=30), target="gpu3", origin="api"),
        boost("normal-new", priority=Priority.normal, granted_ago=timedelta(minutes=5), origin="api"),
        boost("other-lender", source="gpu2", priority=Priority.low),
        boost("pending", priority=Priority.low, state=BoostState.pending, origin="api"),
    ]


@pytest.mark.parametrize("policy", ["conservative", "balanced", "aggressive", "predictive"])
@pytest.mark.parametrize("mode", ["offload_only", "share_and_offload", "dynamic_balancing"])
def test_busy_lender_reclaims_lowest_priority_first_and_keeps_critical(mode, policy):
    history = history_of({HEAD: [50, 50], "gpu1": [95, 95], "gpu2": [10, 10], "gpu3": [50, 50]})
    decisions = decide(make_spec(mode, policy), history, lent_by_gpu1(), NOW)
    assert actions(decisions) == [
        ("reclaim", "gpu1", "low", "gpu1"),
        ("reclaim", "gpu1", "normal-new", "gpu1"),  # same priority: most recently granted first
        ("reclaim", "gpu1", "normal-old", "gpu1"),
        ("reclaim", "gpu1", "high", "gpu1"),
    ]
    assert [d.priority for d in decisions] == [Priority.low, Priority.normal, Priority.normal, Priority.high]
    assert all("cpu 0.95 > 0.80" in d.reason for d in decisions)


@pytest.mark.parametrize(
    "gpu1, reclaims",
    [
        pytest.param([50, 95], False, id="one-spike-keeps-boosts"),
        pytest.param([95, 50], False, id="spike-passed"),
        pytest.param([95, 95], True, id="two-busy-samples-reclaim"),
        pytest.param([{"memory_percent": 90}] * 2, True, id="busy-memory-reclaims"),
    ],
)
def test_lender_protection_needs_two_busy_samples(gpu1, reclaims):
    history = history_of({HEAD: [50, 50], "gpu1": gpu1, "gpu2": [10, 10]})
    decisions = decide(make_spec(), history, [boost("r-1")], NOW)
    assert [d.action for d in decisions] == (["reclaim"] if reclaims else ["none"])


def test_critical_boosts_only_leave_nothing_to_reclaim():
    history = history_of({HEAD: [50, 50], "gpu1": [95, 95], "gpu2": [10, 10]})
    lent = [boost("c-1", priority=Priority.critical)]
    assert "keeps 1 critical boost" in only_none(decide(make_spec(), history, lent, NOW)).reason


def test_a_reclaimed_boost_is_not_also_released():
    history = history_of({HEAD: [10, 10, 10], "gpu1": [95, 95, 95], "gpu2": [10, 10, 10]})
    decisions = decide(make_spec(), history, [boost("r-1")], NOW)
    assert actions(decisions) == [("reclaim", "gpu1", "r-1", "gpu1")]


# --- flapping ---------------------------------------------------------------------------


def simulate(head_values: list, *, policy: str = "balanced", min_hold_seconds: float | None = None) -> list[tuple]:
    """One decision round per head sample; grants and releases are applied like a ledger would."""
    spec = make_spec(policy=policy)
    history = MetricsHistory()
    boosts: list[Boost] = []
    start = NOW - len(head_values) * STEP
    happened = []
    for round_number, value in enumerate(head_values):
        now = start + round_number * STEP
        history.add(NodeSample(HEAD, now, **point(value)))
        history.add(NodeSample("gpu1", now, **point(10)))
        for decision in decide(spec, history, boosts, now, min_hold_seconds=min_hold_seconds):
            if decision.action == "grant":
                boosts.append(
                    Boost(
                        id=f"b{round_number}",
                        source=decision.source,
                        target=decision.node,
                        resources=decision.resources,
                        state=BoostState.active,
                        created_at=now,
                        expires_at=now + timedelta(hours=1),
                        duration_seconds=3600,
                        placement_group=f"grid-boost-b{round_number}",
                        granted_at=now,
                        origin="rebalance",
                    )
                )
            elif decision.action in ("release", "reclaim"):
                boosts = [b for b in boosts if b.id != decision.boost_id]
            if decision.action != "none":
                happened.append((round_number, decision.action))
    return happened


@pytest.mark.parametrize(
    "head_values, expected",
    [
        pytest.param([95, 50] * 10, [], id="alternating-spikes-never-grant"),
        pytest.param([79, 81] * 10, [], id="hovering-at-high-never-grants"),
        pytest.param([95, 95] + [10, 95] * 10, [(1, "grant")], id="busy-then-flapping-keeps-one-boost"),
        pytest.param([95, 95] + [29, 31] * 10, [(1, "grant")], id="hovering-at-low-keeps-the-boost"),
        pytest.param([95, 95] + [50] * 20, [(1, "grant")], id="between-thresholds-keeps-the-boost"),
        # Idle from round 2: three idle samples by round 4, but the 60 s hold ends at round 7.
        pytest.param([95, 95] + [10] * 10, [(1, "grant"), (7, "release")], id="idle-released-after-hold"),
        pytest.param(
            [95, 95] + [10] * 8 + [95, 95] + [10] * 8,
            [(1, "grant"), (7, "release"), (11, "grant"), (17, "release")],
            id="real-load-changes-still-act",
        ),
    ],
)
def test_flapping_load_does_not_oscillate_grants_and_releases(head_values, expected):
    assert simulate(head_values) == expected


def test_without_hold_time_release_waits_for_idle_samples():
    assert simulate([95, 95] + [10] * 6, min_hold_seconds=0) == [(1, "grant"), (4, "release")]


# --- nothing to do ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "series, end, reason",
    [
        pytest.param({HEAD: [50, 50], **QUIET_LENDERS}, NOW, "not above high", id="between-thresholds"),
        pytest.param({}, NOW, "no fresh sample", id="no-metrics"),
        pytest.param({HEAD: [95, 95], **QUIET_LENDERS}, NOW - timedelta(minutes=2), "no fresh sample", id="stale"),
    ],
)
def test_a_quiet_round_says_why(series, end, reason):
    decisions = decide(make_spec(), history_of(series, end), [], NOW)
    assert reason in only_none(decisions).reason


def test_samples_after_now_are_not_used():
    history = history_of({HEAD: [50, 50, 95, 95], **QUIET_LENDERS}, end=NOW + 2 * STEP)
    only_none(decide(make_spec(), history, [], NOW))
    assert [d.action for d in decide(make_spec(), history, [], NOW + 2 * STEP)] == ["grant"]


def test_decisions_are_frozen():
    decision = decide(make_spec(), MetricsHistory(), [], NOW)[0]
    with pytest.raises(AttributeError):
        decision.action = "grant"  # type: ignore[misc]


# --- the module itself ----------------------------------------------------------------


def test_docstring_examples_hold():
    result = doctest.testmod(policy_module)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        ([], {}),  # no history: every node reads as calm
        ([("gpu1", 0, 90, 50)], {"gpu1": 0.7}),  # a CPU-only node: cpu and memory weigh half each
        ([("gpu1", 200, 90, 50)], {}),  # older than 3 monitoring intervals: stale, left out
        ([("gpu1", 200, 90, 50), ("gpu1", 5, 10, 10)], {"gpu1": 0.1}),  # the latest sample counts
    ],
)
def test_placement_pressures_come_from_each_nodes_latest_fresh_sample(samples, expected):
    from grid_flows.core.policy import placement_pressures

    spec = ClusterSpec.model_validate({"nodes": [{"name": "head", "role": "head"}, {"name": "gpu1"}]})
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    history = MetricsHistory()
    for node, age, cpu_pct, mem_pct in sorted(samples, key=lambda s: -s[1]):
        history.add(NodeSample(node, now - timedelta(seconds=age), cpu_pct, mem_pct, 0))
    got = placement_pressures(spec, history, now)
    assert {n: round(p.score, 6) for n, p in got.items()} == expected
