"""Shared builders for tests: consistent boost records in any state, on a fixed clock.

Example:
    >>> in_state(BoostState.active, "b1", source="gpu2").placement_group_id
    'pg01'
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from grid_flows.core.ledger import new_boost
from grid_flows.core.models import DEFAULT_CLUSTER, Boost, BoostState, Priority, Resources

GIB = 1024**3
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)  # created
T1 = T0 + timedelta(minutes=5)  # granted
T2 = T1 + timedelta(minutes=20)  # later event
DURATION = 600.0


def pending(boost_id: str = "b-7f3e", **overrides) -> Boost:
    """A new pending boost: gpu1 -> gpu-master, 1 CPU and 1 GiB, high, 10 minutes, made at T0."""
    fields = dict(
        source="gpu1",
        target="gpu-master",
        resources=Resources(cpu=1, memory=GIB),
        priority=Priority.high,
        duration_seconds=DURATION,
        now=T0,
        cluster=DEFAULT_CLUSTER,
    )
    fields.update(overrides)
    return new_boost(boost_id, **fields)


def in_state(state: BoostState, boost_id: str = "b-7f3e", **overrides) -> Boost:
    """A consistent record in ``state``: granted at T1 if it was ever active, ended at T1 if it ended."""
    b = pending(boost_id, **overrides)
    if state is BoostState.pending:
        return b
    if state is BoostState.failed:  # the only end reachable from pending alone
        return b.model_copy(update={"state": state, "ended_at": T1})
    granted = b.model_copy(
        update={
            "state": BoostState.active,
            "granted_at": T1,
            "expires_at": T1 + timedelta(seconds=b.duration_seconds),
            "placement_group_id": "pg01",
        }
    )
    if state is BoostState.active:
        return granted
    return granted.model_copy(update={"state": state, "ended_at": T1})
