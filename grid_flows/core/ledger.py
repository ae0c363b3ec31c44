"""The boost lifecycle as a pure state machine.

Events go in, a new boost record comes out; an event that the state does not allow
raises :class:`IllegalTransition`. No Ray, no Prefect, no wall clock: ``now`` is passed in.

    pending -> active -> released | expired | preempted | lost
    pending -> failed | released

Example:
    >>> from datetime import datetime, timezone
    >>> now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    >>> b = new_boost("a1b2", source="gpu1", target="gpu-master", resources=Resources(cpu=2),
    ...               priority=Priority.high, duration_seconds=60, now=now, cluster="default")
    >>> transition(b, Event.grant, now, placement_group_id="ab").state.value
    'active'
"""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import datetime, timedelta
from enum import Enum
from typing import AbstractSet, Iterable

from grid_flows.core.models import Boost, BoostState, ClusterSpec, Priority, Resources
from grid_flows.errors import IllegalTransition, InvariantViolation

PLACEMENT_GROUP_PREFIX = "grid-boost-"  # a boost's group is named after it: reconcile pairs them by name


class Event(str, Enum):
    grant = "grant"
    release = "release"
    expire = "expire"
    preempt = "preempt"
    node_lost = "node_lost"
    fail = "fail"
    extend = "extend"
    notice = "notice"  # a preemption is under way: runners stop routing, the boost still holds
    restore = "restore"  # the preemption could not complete: the boost holds again, in a new group




_S = BoostState
# state -> event -> next state
_TRANSITIONS: dict[BoostState, dict[Event, BoostState]] = {
    _S.pending: {Event.grant: _S.active, Event.fail: _S.failed, Event.release: _S.released},
    _S.active: {
        Event.release: _S.released,
        Event.expire: _S.expired,
        Event.preempt: _S.preempted,
        Event.node_lost: _S.lost,
        Event.extend: _S.active,
        Event.notice: _S.active,
        Event.restore: _S.active,
    },
}


def placement_group_name(boost_id: str) -> str:
    return f"{PLACEMENT_GROUP_PREFIX}{boost_id}"


def boost_id_of(placement_group_name_: str) -> str | None:
    """The boost id a grid placement group is named after, or None for other groups."""
    if placement_group_name_.startswith(PLACEMENT_GROUP_PREFIX):
        return placement_group_name_[len(PLACEMENT_GROUP_PREFIX):]
    return None


def new_boost(
    boost_id: str,
    *,
    source: str,
    target: str,
    resources: Resources,
    priority: Priority,
    duration_seconds: float,
    now: datetime,
    origin: str = "api",
    requested_by: str = "",
    cluster: str,
    ray_session: str = "",
) -> Boost:
    """A pending boost; ``expires_at`` is provisional until the grant restarts the clock."""
    return Boost(
        id=boost_id,
        source=source,
        target=target,
        resources=resources,
        priority=priority,
        state=BoostState.pending,
        created_at=now,
        expires_at=now + timedelta(seconds=duration_seconds),
        duration_seconds=duration_seconds,
        placement_group=placement_group_name(boost_id),
        origin=origin,
        requested_by=requested_by,
        cluster=cluster,
        ray_session=ray_session,
    )


PENDING_TIMEOUT_SECONDS = 120.0  # a request pending longer than this has died: reconcile fails it


def allowed_events(state: BoostState) -> set[Event]:
    return set(_TRANSITIONS.get(state, {}))


def transition(
    boost: Boost,
    event: Event,
    now: datetime,
    *,
    reason: str = "",
    placement_group_id: str | None = None,
    extra_seconds: float = 0.0,
    preempted_by: str = "",
) -> Boost:
    """Apply ``event`` to ``boost`` at ``now`` and return the new record (the input is untouched)."""
    next_state = _TRANSITIONS.get(boost.state, {}).get(event)
    if next_state is None:
        allowed = ", ".join(sorted(e.value for e in allowed_events(boost.state))) or "none: it has ended"
        raise IllegalTransition(
            f"boost {boost.id}: cannot {event.value} a boost that is {boost.state.value} (allowed: {allowed})"
        )
    if event is Event.extend and not (math.isfinite(extra_seconds) and extra_seconds > 0):
        raise IllegalTransition(f"boost {boost.id}: extend needs a positive number of seconds, got {extra_seconds!r}")
    changes: dict = {"state": next_state}
    if event is Event.grant:
        changes.update(
            granted_at=now,
            expires_at=now + timedelta(seconds=boost.duration_seconds),
            placement_group_id=placement_group_id,
        )
    elif event is Event.extend:
        changes.update(
            expires_at=boost.expires_at + timedelta(seconds=extra_seconds),
            duration_seconds=boost.duration_seconds + extra_seconds,
        )
    elif event is Event.notice:
        if not preempted_by:
            raise IllegalTransition(f"boost {boost.id}: a preemption notice names the preempting boost")
        changes["preempted_by"] = preempted_by
    elif event is Event.restore:
        if not boost.preempted_by:
            raise IllegalTransition(f"boost {boost.id}: only a boost under a preemption notice can be restored")
        changes.update(preempted_by="", placement_group_id=placement_group_id or boost.placement_group_id)
    if next_state.ended:
        changes["ended_at"] = now
    if reason:
        changes["reason"] = reason
    return boost.model_copy(update=changes)


def overdue(boosts: Iterable[Boost], now: datetime) -> list[Boost]:
    """Active boosts whose lease ran out at ``now`` (``due_to_end`` with nothing held)."""
    return [b for b, _ in due_to_end(boosts, now)]


def due_to_end(boosts: Iterable[Boost], now: datetime, *, held: AbstractSet[str] = frozenset(),
               grace_seconds: float = 0.0) -> list[tuple[Boost, str]]:
    """Active boosts whose time is up at ``now``, each with the reason to record.

    An unheld boost ends at ``expires_at``. One a running flow holds (its runner routes
    tasks into it) ends ``grace_seconds`` later; its runner ends it sooner, once idle.

        >>> from datetime import datetime, timedelta, timezone
        >>> t = datetime(2025, 1, 1, tzinfo=timezone.utc)
        >>> b = transition(new_boost("a" * 32, source="w", target="h", resources=Resources(cpu=1),
        ...     priority=Priority.normal, duration_seconds=60, now=t, cluster="default"), Event.grant, t, placement_group_id="g")
        >>> [r for _, r in due_to_end([b], t + timedelta(seconds=60))]
        ['expired at 00:01:00 UTC']
        >>> due_to_end([b], t + timedelta(seconds=60), held={b.id}, grace_seconds=30)
        []
    """
    due = []
    for boost in boosts:
        if boost.state is not BoostState.active:
            continue
        ends_at = _ends_at(boost, held, grace_seconds)
        if now >= ends_at:
            reason = f"expired at {boost.expires_at:%H:%M:%S} UTC"
            if ends_at != boost.expires_at:
                reason += f", after its {grace_seconds:g} s grace (a flow was using it)"
            due.append((boost, reason))
    return due


def next_deadline(boosts: Iterable[Boost], *, held: AbstractSet[str] = frozenset(),
                  grace_seconds: float = 0.0) -> datetime | None:
    """When the next of ``boosts`` is due to end (``due_to_end``'s rule); None if none is active."""
    return min((_ends_at(b, held, grace_seconds) for b in boosts if b.state is BoostState.active), default=None)


def _ends_at(boost: Boost, held: AbstractSet[str], grace_seconds: float) -> datetime:
    return boost.expires_at + timedelta(seconds=grace_seconds) if boost.id in held else boost.expires_at


def held_by_lender(boosts: Iterable[Boost], *, count_pending: bool = False) -> dict[str, Resources]:
    """What each lender has lent: the resources of its active boosts, per source node. The one
    place that computes it.

    Pending boosts count only with ``count_pending`` (when planning more grants: they are
    being admitted on that capacity now). Otherwise not: several requesters may each have
    a pending record naming the same lender, and Ray grants at most what its tokens allow.
    """
    return _held_by(boosts, "source", count_pending)


def held_by_borrower(boosts: Iterable[Boost], *, count_pending: bool = False) -> dict[str, Resources]:
    """What each target node borrows, counted as :func:`held_by_lender` counts."""
    return _held_by(boosts, "target", count_pending)


def _held_by(boosts: Iterable[Boost], node_field: str, count_pending: bool) -> dict[str, Resources]:
    counted = {BoostState.active, BoostState.pending} if count_pending else {BoostState.active}
    held: dict[str, Resources] = defaultdict(Resources)
    for b in boosts:
        if b.state in counted:
            node = getattr(b, node_field)
            held[node] = held[node] + b.resources
    return dict(held)


def check_invariants(spec: ClusterSpec, boosts: Iterable[Boost]) -> None:
    """Raise InvariantViolation if any lender lends past its share or a record is inconsistent."""
    boosts = list(boosts)
    for b in boosts:
        if b.source == b.target:
            raise InvariantViolation(f"boost {b.id}: source and target are both {b.source}")
        if b.state.ended and b.ended_at is None:
            raise InvariantViolation(f"boost {b.id}: {b.state.value} without an end time")
        if b.state is BoostState.active and b.granted_at is None:
            raise InvariantViolation(f"boost {b.id}: active without a grant time")
    for lender, held in held_by_lender(boosts).items():
        share = spec.node(lender).share
        if not held.fits_in(share):
            raise InvariantViolation(
                f"lender {lender} lends {held.describe()}, more than its share ({share.describe()})"
            )
