"""What reconcile does, decided on a snapshot: records and Ray's groups in, actions out.

Pure: no Ray, no Prefect, the clock passed in. ``boosts.reconcile`` takes the snapshot in
the one order that cannot misjudge a request in flight (groups, then records, then groups
again: docs/architecture.md, "Crash-safe ordering") and carries the actions out, each
re-checked under the ledger lock.

Example:
    >>> from datetime import datetime, timezone
    >>> snap = Snapshot(groups_before={"grid-boost-x": "0a"}, live=[], ended_ids=set(),
    ...                 alive={}, groups_after={"grid-boost-x"}, now=datetime.now(timezone.utc))
    >>> [(a.kind.value, a.target, a.group_id) for a in plan(snap, pending_timeout_seconds=120)]
    [('remove_group', 'grid-boost-x', '0a')]
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Iterable, Mapping, Optional

from grid_flows.core.ledger import Event
from grid_flows.core.models import Boost, BoostState


class ActionKind(str, Enum):
    drop_live_copy = "drop_live_copy"  # an end was half written: the ended copy wins
    remove_group = "remove_group"  # a group no live record names
    end = "end"  # a live boost that must end (lost, expired, failed)
    lift_notice = "lift_notice"  # a preemption notice whose preemptor is gone


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    target: str  # a boost id, or a group name for remove_group
    event: Optional[Event] = None
    reason: str = ""
    group_id: str = ""  # remove_group: the group to remove


@dataclass(frozen=True)
class Snapshot:
    """What reconcile read, in order: Ray's groups (name -> id), the live records, the ids of
    ended records, node liveness by name, Ray's group names again, and the time; ``session``
    is the Ray cluster's session name ("" when unknown)."""

    groups_before: Mapping[str, str]
    live: Iterable[Boost]
    ended_ids: set[str]
    alive: Mapping[str, bool]
    groups_after: set[str]
    now: datetime
    session: str = ""


def plan(snap: Snapshot, pending_timeout_seconds: float) -> list[Action]:
    """The actions that make Ray and the records agree; empty when they already do."""
    actions: list[Action] = []
    live = {}
    for b in snap.live:
        if b.id in snap.ended_ids:
            actions.append(Action(ActionKind.drop_live_copy, b.id))
        else:
            live[b.id] = b
    named = {b.placement_group for b in live.values()}
    actions += [Action(ActionKind.remove_group, name, reason="no live record names it", group_id=group_id)
                for name, group_id in snap.groups_before.items() if name not in named]
    for b in live.values():
        decided = _judge(b, snap, live, pending_timeout_seconds)
        if decided is not None:
            actions.append(decided)
    return actions


def _judge(b: Boost, snap: Snapshot, live: Mapping[str, Boost], pending_timeout_seconds: float) -> Optional[Action]:
    if b.state is BoostState.pending:
        if (snap.now - b.created_at).total_seconds() > pending_timeout_seconds:
            return Action(ActionKind.end, b.id, Event.fail, f"stuck pending for more than {pending_timeout_seconds:g} s")
        return None
    if b.preempted_by and b.preempted_by in live:
        return None  # a preemption is under way: its requester ends or restores this boost
    if b.placement_group not in snap.groups_after:
        return Action(ActionKind.end, b.id, Event.node_lost, "its placement group is gone" + _elsewhere(b, snap))
    if not snap.alive.get(b.source, False):
        return Action(ActionKind.end, b.id, Event.node_lost, f"lender {b.source} is down")
    if b.is_overdue(snap.now):
        return Action(ActionKind.end, b.id, Event.expire, f"expired at {b.expires_at:%H:%M:%S} UTC")
    if b.preempted_by and b.preempted_by not in live:
        return Action(ActionKind.lift_notice, b.id, reason=f"kept: the preemption by {b.preempted_by[:8]} did not complete")
    return None


def _elsewhere(b: Boost, snap: Snapshot) -> str:
    """Why the group may be gone, when the record was granted in another Ray cluster than this one."""
    if not b.ray_session or not snap.session or b.ray_session == snap.session:
        return ""
    return (f": it was granted in Ray session {b.ray_session} and this Ray cluster is {snap.session} (the cluster "
            f"restarted since, or another Ray cluster uses the GridCluster block '{b.cluster}')")
