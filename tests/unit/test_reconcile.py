"""reconcile.plan: one row per situation a reconcile pass can meet, decided on a snapshot."""

from __future__ import annotations

import doctest
from datetime import timedelta

import pytest

import grid_flows.core.reconcile as reconcile_module
from grid_flows.core.ledger import Event
from grid_flows.core.models import BoostState
from grid_flows.core.reconcile import Action, ActionKind, Snapshot, plan
from tests.factories import T0, T1, in_state

S = BoostState
GROUP = "grid-boost-b1"  # placement group of boost "b1"
LATER = T1 + timedelta(minutes=1)  # b1 (active at T1 for 10 min) is neither overdue nor young
NOTICED = in_state(S.active, "b1").model_copy(update={"preempted_by": "b-high"})


def snap(live=(), *, before=None, after=None, ended=(), alive=None, now=LATER, session="") -> Snapshot:
    return Snapshot(
        groups_before=before if before is not None else {b.placement_group: "id-" + b.id for b in live},
        live=list(live),
        ended_ids=set(ended),
        alive=alive if alive is not None else {"gpu1": True, "gpu2": True},
        groups_after=set(after) if after is not None else {b.placement_group for b in live},
        now=now,
        session=session,
    )


IN_OLD = in_state(S.active, "b1").model_copy(update={"ray_session": "session_old"})


CASES = [
    ("agree: an active boost with its group", snap([in_state(S.active, "b1")]), []),
    ("agree: a young pending boost without a group yet",
     snap([in_state(S.pending, "b1")], before={}, after=(), now=T0 + timedelta(seconds=30)), []),
    ("a group no live record names is removed",
     snap([], before={"grid-boost-zz": "id-zz"}, after={"grid-boost-zz"}),
     [Action(ActionKind.remove_group, "grid-boost-zz", reason="no live record names it", group_id="id-zz")]),
    ("a group that appeared after the records were read is not judged",  # a request in flight
     snap([], before={}, after={GROUP}), []),
    ("an active record whose group is gone in the second read is lost",
     snap([in_state(S.active, "b1")], after=()),
     [Action(ActionKind.end, "b1", Event.node_lost, "its placement group is gone")]),
    ("a lost record granted in another Ray session says so",  # the head restarted, or a second cluster
     snap([IN_OLD], after=(), session="session_new"),
     [Action(ActionKind.end, "b1", Event.node_lost, "its placement group is gone: it was granted in Ray session "
             "session_old and this Ray cluster is session_new (the cluster restarted since, or another Ray cluster "
             "uses the GridCluster block 'default')")]),
    ("a lost record granted in this Ray session: only that its group is gone",
     snap([IN_OLD], after=(), session="session_old"),
     [Action(ActionKind.end, "b1", Event.node_lost, "its placement group is gone")]),
    ("a record of this Ray session with its group agrees", snap([IN_OLD], session="session_old"), []),
    ("an active record placed after the first read keeps its group",  # activated between the reads
     snap([in_state(S.active, "b1")], before={}), []),
    ("a boost on a dead lender is lost",
     snap([in_state(S.active, "b1")], alive={"gpu1": False}),
     [Action(ActionKind.end, "b1", Event.node_lost, "lender gpu1 is down")]),
    ("a boost on a lender Ray does not know is lost",
     snap([in_state(S.active, "b1")], alive={}),
     [Action(ActionKind.end, "b1", Event.node_lost, "lender gpu1 is down")]),
    ("an overdue boost expires",
     snap([in_state(S.active, "b1")], now=T1 + timedelta(minutes=10)),
     [Action(ActionKind.end, "b1", Event.expire, "expired at 12:15:00 UTC")]),
    ("a pending record past the timeout fails",
     snap([in_state(S.pending, "b1")], before={}, after=(), now=T0 + timedelta(seconds=121)),
     [Action(ActionKind.end, "b1", Event.fail, "stuck pending for more than 120 s")]),
    ("a half-written end: the ended copy wins, and its group is an orphan",
     snap([in_state(S.active, "b1")], ended={"b1"}),
     [Action(ActionKind.drop_live_copy, "b1"),
      Action(ActionKind.remove_group, GROUP, reason="no live record names it", group_id="id-b1")]),
    ("a notice whose preemptor is gone is lifted",
     snap([NOTICED]),
     [Action(ActionKind.lift_notice, "b1", reason="kept: the preemption by b-high did not complete")]),
    ("a noticed victim whose group went is left to its live preemptor",  # it ends or restores it
     snap([NOTICED, in_state(S.pending, "b-high", now=LATER - timedelta(seconds=30))], before={}, after=()), []),
    ("a notice whose preemptor ended is lifted",
     snap([NOTICED], ended={"b-high"}),
     [Action(ActionKind.lift_notice, "b1", reason="kept: the preemption by b-high did not complete")]),
    ("a young pending record's group is its own, not an orphan",
     snap([in_state(S.pending, "b1")], now=T0 + timedelta(seconds=30)), []),
    ("a notice whose preemptor still lives is left alone",
     snap([NOTICED, in_state(S.pending, "b-high", now=LATER - timedelta(seconds=30))],
          before={GROUP: "id-b1"}, after={GROUP}), []),
]


@pytest.mark.parametrize("snapshot, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan(snapshot, expected):
    assert plan(snapshot, pending_timeout_seconds=120) == expected


def test_a_pass_is_idempotent_once_its_actions_are_carried_out():
    lost = in_state(S.active, "b1")
    first = plan(snap([lost], after=()), pending_timeout_seconds=120)
    assert [a.kind for a in first] == [ActionKind.end]
    ended = lost.model_copy(update={"state": S.lost, "ended_at": LATER})
    assert plan(snap([], before={}, after=(), ended={ended.id}), pending_timeout_seconds=120) == []


def test_docstring_examples_hold():
    result = doctest.testmod(reconcile_module)
    assert result.attempted > 0 and result.failed == 0
