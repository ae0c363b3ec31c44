"""Unit tests of grid_flows.core.ledger: the boost lifecycle state machine, on an injected clock."""

from __future__ import annotations

import doctest
import itertools
from datetime import timedelta
from pathlib import Path

import pytest

import grid_flows.core.ledger as ledger_module
from grid_flows.core.cluster_file import load_cluster_file
from grid_flows.core.ledger import (
    Event, allowed_events, boost_id_of, check_invariants, due_to_end, held_by_borrower, held_by_lender,
    next_deadline, overdue,
    placement_group_name, transition,
)
from grid_flows.errors import IllegalTransition, InvariantViolation
from grid_flows.core.ledger import PLACEMENT_GROUP_PREFIX
from grid_flows.core.models import BoostState, Resources
from grid_flows.errors import GridError

from tests.factories import DURATION, GIB, T0, T1, T2, in_state, pending

S = BoostState
CLUSTER_YAML = Path(__file__).resolve().parents[2] / "blocks" / "cluster.yaml"

# The lifecycle, written out independently of the module's table.
EXPECTED: dict[tuple[BoostState, Event], BoostState] = {
    (S.pending, Event.grant): S.active,
    (S.pending, Event.fail): S.failed,
    (S.pending, Event.release): S.released,
    (S.active, Event.release): S.released,
    (S.active, Event.expire): S.expired,
    (S.active, Event.preempt): S.preempted,
    (S.active, Event.node_lost): S.lost,
    (S.active, Event.extend): S.active,
    (S.active, Event.notice): S.active,
    (S.active, Event.restore): S.active,
}
ALL_PAIRS = list(itertools.product(BoostState, Event))
LEGAL = [(s, e) for s, e in ALL_PAIRS if (s, e) in EXPECTED]
ILLEGAL = [(s, e) for s, e in ALL_PAIRS if (s, e) not in EXPECTED]


def test_docstring_examples_hold():
    result = doctest.testmod(ledger_module)
    assert result.attempted > 0 and result.failed == 0


def test_the_table_covers_every_pair():
    assert len(ALL_PAIRS) == len(BoostState) * len(Event) == 63
    assert len(LEGAL) == 10
    for state in BoostState:
        assert allowed_events(state) == {e for (s, e) in EXPECTED if s is state}


def test_new_boost_is_pending_with_a_provisional_expiry():
    b = pending()
    assert b.state is S.pending
    assert b.created_at == T0
    assert b.expires_at == T0 + timedelta(seconds=DURATION)
    assert b.placement_group == placement_group_name("b-7f3e") == "grid-boost-b-7f3e"
    assert b.granted_at is None and b.ended_at is None and b.placement_group_id is None


# --- every (state, event) pair --------------------------------------------------------


@pytest.mark.parametrize("state, event", LEGAL, ids=[f"{s.value}-{e.value}" for s, e in LEGAL])
def test_legal_transition_gives_the_expected_state(state, event):
    before = in_state(state)
    if event is Event.restore:
        before = before.model_copy(update={"preempted_by": "b-preemptor"})  # only a noticed boost restores
    after = transition(before, event, T2, placement_group_id="pg02", extra_seconds=300, preempted_by="b-preemptor")
    expected = EXPECTED[(state, event)]
    assert after.state is expected
    # ended_at is set exactly when the boost ends, to the event's time
    assert after.ended_at == (T2 if expected.ended else None)
    # what a boost is never changes
    for field in ("id", "source", "target", "resources", "priority", "created_at", "placement_group", "origin"):
        assert getattr(after, field) == getattr(before, field)
    if event is Event.grant:
        assert after.granted_at == T2
        assert after.expires_at == T2 + timedelta(seconds=DURATION)
        assert after.placement_group_id == "pg02"
        assert after.duration_seconds == DURATION
    elif event is Event.extend:
        assert after.expires_at == before.expires_at + timedelta(seconds=300)
        assert after.duration_seconds == DURATION + 300
        assert after.granted_at == before.granted_at == T1
    elif event is Event.notice:
        assert after.preempted_by == "b-preemptor"
        assert after.placement_group_id == before.placement_group_id and after.expires_at == before.expires_at
    elif event is Event.restore:
        assert after.preempted_by == "" and after.placement_group_id == "pg02"  # held again, in a new group
        assert after.expires_at == before.expires_at and after.granted_at == before.granted_at
    else:
        assert after.expires_at == before.expires_at
        assert after.granted_at == before.granted_at
        assert after.placement_group_id == before.placement_group_id
        assert after.duration_seconds == before.duration_seconds


@pytest.mark.parametrize("state, event", ILLEGAL, ids=[f"{s.value}-{e.value}" for s, e in ILLEGAL])
def test_illegal_transition_raises_naming_boost_state_and_event(state, event):
    before = in_state(state, boost_id="b-illegal-42")
    snapshot = before.model_dump()
    with pytest.raises(IllegalTransition) as info:
        transition(before, event, T2, placement_group_id="pg02", extra_seconds=300)
    message = str(info.value)
    assert "b-illegal-42" in message
    assert f"cannot {event.value} " in message
    assert f"is {state.value}" in message
    assert "\n" not in message
    assert before.model_dump() == snapshot


def test_illegal_transition_is_a_user_facing_error():
    assert issubclass(IllegalTransition, GridError)


@pytest.mark.parametrize("state", [s for s in BoostState if s.ended])
def test_an_ended_boost_allows_nothing(state):
    assert allowed_events(state) == set()
    for event in Event:
        with pytest.raises(IllegalTransition, match="none: it has ended"):
            transition(in_state(state), event, T2)


def test_an_ended_boost_never_becomes_active_again():
    """Every event sequence up to length 4 from pending: once ended, always ended and unchanged."""
    walks = 0
    for events in itertools.product(Event, repeat=4):
        b = pending()
        ended_state = None
        for i, event in enumerate(events):
            now = T0 + timedelta(minutes=i + 1)
            try:
                nxt = transition(b, event, now, extra_seconds=60)
            except IllegalTransition:
                continue
            assert ended_state is None, f"{events}: {ended_state.value} boost accepted {event.value}"
            assert nxt.state is not S.pending
            b = nxt
            if b.state.ended:
                ended_state = b.state
                ended_at = b.ended_at
        if ended_state is not None:
            assert b.state is ended_state and b.ended_at == ended_at
            walks += 1
    assert walks > 0


@pytest.mark.parametrize("state, event", LEGAL, ids=[f"{s.value}-{e.value}" for s, e in LEGAL])
def test_transition_does_not_mutate_its_input(state, event):
    before = in_state(state).model_copy(update={"preempted_by": "b-high" if event is Event.restore else ""})
    snapshot = before.model_dump()
    after = transition(before, event, T2, reason="why not", placement_group_id="pg02", extra_seconds=300,
                       preempted_by="b-high")
    assert after is not before
    assert before.model_dump() == snapshot
    assert before.state is state


def test_reason_is_recorded_only_when_given():
    b = in_state(S.active).model_copy(update={"reason": "asked by ci"})
    assert transition(b, Event.preempt, T2, reason="critical boost needs gpu1").reason == "critical boost needs gpu1"
    assert transition(b, Event.release, T2).reason == "asked by ci"


def test_grant_restarts_the_clock():
    b = pending(duration_seconds=3600)
    granted = transition(b, Event.grant, T2, placement_group_id="abc")
    assert b.expires_at == T0 + timedelta(hours=1)
    assert granted.expires_at == T2 + timedelta(hours=1)
    assert granted.seconds_left(T2) == 3600
    assert granted.seconds_left(T2 + timedelta(hours=2)) == 0


def test_extend_accumulates():
    b = transition(pending(), Event.grant, T1)
    b = transition(b, Event.extend, T2, extra_seconds=60)
    b = transition(b, Event.extend, T2, extra_seconds=90)
    assert b.state is S.active
    assert b.expires_at == T1 + timedelta(seconds=DURATION + 150)
    assert b.duration_seconds == DURATION + 150


def test_extend_rejects_negative_seconds():
    b = transition(pending(), Event.grant, T1)
    with pytest.raises((ValueError, GridError)):
        transition(b, Event.extend, T2, extra_seconds=-1000)


def test_full_lifecycle_on_the_injected_clock():
    b = pending()
    b = transition(b, Event.grant, T1, placement_group_id="pg")
    assert not b.is_overdue(T1 + timedelta(seconds=DURATION - 1))
    assert b.is_overdue(T1 + timedelta(seconds=DURATION))
    b = transition(b, Event.expire, T1 + timedelta(seconds=DURATION))
    assert b.state is S.expired
    assert b.granted_at == T1
    assert b.ended_at == T1 + timedelta(seconds=DURATION)
    assert not b.is_overdue(T2 + timedelta(days=1))


# --- overdue and held_by_lender -------------------------------------------------------


def test_overdue_lists_only_active_boosts_past_their_expiry():
    expiry = T1 + timedelta(seconds=DURATION)
    boosts = {
        "due": in_state(S.active, "due"),
        "fresh": in_state(S.active, "fresh", duration_seconds=DURATION * 10),
        "waiting": in_state(S.pending, "waiting"),  # pending past its provisional expiry: not overdue
        "gone": in_state(S.released, "gone"),
        "lost": in_state(S.lost, "lost"),
    }
    assert [b.id for b in overdue(boosts.values(), expiry - timedelta(seconds=1))] == []
    assert [b.id for b in overdue(boosts.values(), expiry)] == ["due"]  # the boundary counts
    assert [b.id for b in overdue(boosts.values(), expiry + timedelta(days=1))] == ["due", "fresh"]
    assert overdue([], T2) == []


# --- due_to_end and next_deadline: what the controller's timer ends, and when it wakes ---------

EXPIRY = T1 + timedelta(seconds=DURATION)
GRACE = 30.0
DUE_CASES = [
    # (case, state, held, seconds after expires_at, due?)
    ("unheld, before its deadline", S.active, False, -0.001, False),
    ("unheld, at its deadline", S.active, False, 0, True),
    ("unheld, after its deadline", S.active, False, 5, True),
    ("held, at its deadline: in its grace", S.active, True, 0, False),
    ("held, just inside its grace", S.active, True, GRACE - 0.001, False),
    ("held, at the end of its grace", S.active, True, GRACE, True),
    ("pending, long past: reconcile's business", S.pending, False, 3600, False),
    ("released", S.released, False, 3600, False),
    ("expired already", S.expired, False, 3600, False),
]


@pytest.mark.parametrize("case, state, held, after, due", DUE_CASES, ids=[c[0] for c in DUE_CASES])
def test_due_to_end(case, state, held, after, due):
    boost = in_state(state, "b1")
    now = EXPIRY + timedelta(seconds=after)
    found = due_to_end([boost], now, held={"b1"} if held else set(), grace_seconds=GRACE)
    assert [b.id for b, _ in found] == (["b1"] if due else [])
    if due:
        assert found[0][1].startswith(f"expired at {EXPIRY:%H:%M:%S} UTC")
        assert ("grace" in found[0][1]) is held


def test_next_deadline_is_the_earliest_end_counting_the_grace_of_held_boosts():
    soon = in_state(S.active, "soon")
    later = in_state(S.active, "later", duration_seconds=DURATION * 2)
    assert next_deadline([later, soon]) == EXPIRY
    assert next_deadline([later, soon], held={"soon"}, grace_seconds=GRACE) == EXPIRY + timedelta(seconds=GRACE)
    assert next_deadline([later, soon], held={"soon"}, grace_seconds=DURATION * 2) == \
        T1 + timedelta(seconds=DURATION * 2)
    assert next_deadline([in_state(S.pending, "p"), in_state(S.released, "r")]) is None
    assert next_deadline([]) is None


def test_overdue_accepts_a_generator():
    assert [b.id for b in overdue((in_state(S.active, f"g{i}") for i in range(3)), T2)] == ["g0", "g1", "g2"]


def test_held_by_lender_sums_active_boosts_per_source():
    boosts = [
        in_state(S.active, "a", resources=Resources(cpu=1, memory=GIB)),
        in_state(S.pending, "b", resources=Resources(cpu=0.5, gpu=1)),
        in_state(S.active, "c", source="gpu2", resources=Resources(cpu=1)),
        in_state(S.released, "d", resources=Resources(cpu=8)),
        in_state(S.expired, "e", source="gpu2", resources=Resources(cpu=8)),
        in_state(S.failed, "f", source="gpu3", resources=Resources(cpu=8)),
    ]
    assert held_by_lender(boosts) == {  # pending "b" may never be granted: it holds nothing yet
        "gpu1": Resources(cpu=1, memory=GIB),
        "gpu2": Resources(cpu=1),
    }
    assert held_by_lender([]) == {}
    assert held_by_lender(iter(boosts[:1])) == {"gpu1": Resources(cpu=1, memory=GIB)}
    # planning more grants counts what is being admitted too; ended boosts never count
    assert held_by_lender(boosts, count_pending=True) == {
        "gpu1": Resources(cpu=1.5, gpu=1, memory=GIB),
        "gpu2": Resources(cpu=1),
    }
    assert held_by_borrower(boosts) == {"gpu-master": Resources(cpu=2, memory=GIB)}
    assert held_by_borrower(boosts, count_pending=True) == {"gpu-master": Resources(cpu=2.5, gpu=1, memory=GIB)}


# --- invariants -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def spec():
    return load_cluster_file(CLUSTER_YAML)  # gpu1 lends 2 CPU, 1 GPU, 4 GiB; gpu2 lends 1 CPU, 2 GiB


def test_invariants_hold_up_to_the_full_share(spec):
    boosts = [
        in_state(S.active, "a", resources=Resources(cpu=1, gpu=1, memory=2 * GIB)),
        in_state(S.pending, "b", resources=Resources(cpu=1, memory=2 * GIB)),
        in_state(S.active, "c", source="gpu2", resources=Resources(cpu=1, memory=2 * GIB)),
        in_state(S.released, "d", resources=Resources(cpu=2)),  # ended: holds nothing
        in_state(S.preempted, "e", source="gpu2", resources=Resources(cpu=1)),
    ]
    assert check_invariants(spec, boosts) is None


def test_invariants_tolerate_float_noise(spec):
    boosts = [in_state(S.active, f"t{i}", source="gpu2", resources=Resources(cpu=0.1)) for i in range(10)]
    check_invariants(spec, boosts)  # 0.1 * 10 is 0.9999999999999999 or 1.0000000000000002: both fine


@pytest.mark.parametrize(
    "boosts, lender",
    [
        ([in_state(S.active, "a", resources=Resources(cpu=2)), in_state(S.active, "b", resources=Resources(cpu=1))],
         "gpu1"),
        ([in_state(S.active, "a", resources=Resources(gpu=2))], "gpu1"),
        ([in_state(S.active, "a", source="gpu2", resources=Resources(memory=2 * GIB + 1))], "gpu2"),
        ([in_state(S.active, "a", source="gpu2", resources=Resources(gpu=0.5))], "gpu2"),  # gpu2 lends no GPU
    ],
)
def test_over_share_lender_raises_naming_the_lender(spec, boosts, lender):
    with pytest.raises(InvariantViolation) as info:
        check_invariants(spec, boosts)
    assert str(info.value).startswith(f"lender {lender} lends ")
    assert "more than its share" in str(info.value)


def test_a_node_that_does_not_lend_cannot_be_a_source(spec):
    b = in_state(S.active, "h", source="gpu-master", target="gpu1", resources=Resources(cpu=0.5))
    with pytest.raises(InvariantViolation, match="^lender gpu-master lends 0.5 CPU, more than its share \\(nothing\\)$"):
        check_invariants(spec, [b])


def test_source_equal_to_target_raises(spec):
    b = in_state(S.active, "loop-1", source="gpu1", target="gpu1", resources=Resources(cpu=1))
    with pytest.raises(InvariantViolation, match="^boost loop-1: source and target are both gpu1$"):
        check_invariants(spec, [b])


def test_ended_without_end_time_raises(spec):
    b = in_state(S.released, "r-1").model_copy(update={"ended_at": None})
    with pytest.raises(InvariantViolation, match="^boost r-1: released without an end time$"):
        check_invariants(spec, [b])


def test_active_without_grant_time_raises(spec):
    b = in_state(S.active, "g-1").model_copy(update={"granted_at": None})
    with pytest.raises(InvariantViolation, match="^boost g-1: active without a grant time$"):
        check_invariants(spec, [b])


def test_records_made_by_transition_always_satisfy_the_record_invariants(spec):
    for events in itertools.product(Event, repeat=3):
        b = pending(resources=Resources(cpu=1))
        for i, event in enumerate(events):
            try:
                b = transition(b, event, T0 + timedelta(minutes=i + 1), extra_seconds=30)
            except IllegalTransition:
                pass
            check_invariants(spec, [b])


def test_invariant_violation_is_an_assertion_error():
    assert issubclass(InvariantViolation, AssertionError)
    assert issubclass(InvariantViolation, GridError)


# --- placement group names ------------------------------------------------------------


@pytest.mark.parametrize("boost_id", ["a1b2", "b-7f3e", "0123456789abcdef", "x"])
def test_placement_group_name_round_trip(boost_id):
    name = placement_group_name(boost_id)
    assert name == f"{PLACEMENT_GROUP_PREFIX}{boost_id}"
    assert boost_id_of(name) == boost_id


@pytest.mark.parametrize("name", ["other-pg", "", "boost-a1b2", "xgrid-boost-a1b2", "GRID-BOOST-a1b2"])
def test_boost_id_of_foreign_groups_is_none(name):
    assert boost_id_of(name) is None


def test_a_notice_names_its_preemptor_and_only_a_noticed_boost_is_restored():
    b = transition(pending(), Event.grant, T1, placement_group_id="pg01")
    with pytest.raises(IllegalTransition, match="names the preempting boost"):
        transition(b, Event.notice, T2)
    with pytest.raises(IllegalTransition, match="only a boost under a preemption notice"):
        transition(b, Event.restore, T2, placement_group_id="pg02")
    noticed = transition(b, Event.notice, T2, preempted_by="b-high")
    assert noticed.state is S.active and noticed.preempted_by == "b-high"
    assert transition(noticed, Event.preempt, T2).state is S.preempted  # the preemption completed
    kept = transition(noticed, Event.restore, T2)  # no new group given: keeps its own
    assert kept.preempted_by == "" and kept.placement_group_id == "pg01"
