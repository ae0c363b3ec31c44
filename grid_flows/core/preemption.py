"""Which live boosts to preempt so a more important request fits: a pure decision.

When a boost request cannot be placed, it may take capacity back from ACTIVE boosts of
strictly lower priority (low < normal < high < critical), never equal or higher. The
victims all sit on one lender, the one that can then hold the whole request, and:

- are picked lowest priority first, then most recently granted first;
- are only as many as the request needs (a boost that frees nothing still missing is
  skipped, and one made redundant by a later pick is spared);
- are at least ``min_runtime_seconds`` old: age = now - granted_at, and a boost whose
  age is exactly ``min_runtime_seconds`` is already eligible (``age >= min_runtime``).

Among lenders with a plan, the cheapest wins: fewest victims, then the lowest sum of
victim priority ranks, then the order the lenders were given in. The target never lends
to itself. If a lender's free capacity already holds the request, its plan has no
victims (and so is the cheapest): the caller places the request there and preempts
nothing. No Ray, no Prefect, no wall clock: ``now`` is passed in.

Example:
    >>> from datetime import datetime, timedelta, timezone
    >>> from grid_flows.core.models import Boost, BoostState, Priority, Resources
    >>> now = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
    >>> def low_boost(boost_id, minutes_ago):
    ...     granted = now - timedelta(minutes=minutes_ago)
    ...     return Boost(id=boost_id, source="gpu1", target="gpu-master", resources=Resources(cpu=1),
    ...                  priority=Priority.low, state=BoostState.active, created_at=granted,
    ...                  expires_at=granted + timedelta(hours=1), duration_seconds=3600,
    ...                  placement_group="grid-boost-" + boost_id, granted_at=granted)
    >>> active = [low_boost("aaaa1111", 30), low_boost("bbbb2222", 5)]
    >>> lenders = {"gpu1": (Resources(cpu=2), Resources())}  # share 2 CPU, nothing free now
    >>> plan = plan_preemption(Resources(cpu=1), Priority.high, target="gpu-master",
    ...                        lenders=lenders, active=active, now=now)
    >>> plan.reason
    'preempt 1 low boost on gpu1 (bbbb2222) to fit 1 CPU'
    >>> why_not(Resources(cpu=1), Priority.low, target="gpu-master", lenders=lenders, active=active, now=now)
    'a low request can preempt nothing: only boosts of strictly lower priority are preempted'
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Mapping, Sequence

from grid_flows.core.models import Boost, BoostState, Priority, Resources

_EPS = 1e-9  # the same tolerance Resources.fits_in allows on CPU and GPU
_LOWEST = min(Priority, key=lambda p: p.rank)
_HIGHEST = max(Priority, key=lambda p: p.rank)


@dataclass(frozen=True)
class PreemptionPlan:
    """Preempt ``victims`` (all on ``lender``) and the request fits on ``lender``."""

    lender: str
    victims: tuple[Boost, ...]  # in the order they were picked
    reason: str

    @property
    def freed(self) -> Resources:
        """What preempting the victims gives back to the lender."""
        return sum((victim.resources for victim in self.victims), Resources())


def plan_preemption(
    request: Resources,
    priority: Priority,
    *,
    target: str,
    lenders: Mapping[str, tuple[Resources, Resources]],
    active: Sequence[Boost],
    now: datetime,
    min_runtime_seconds: float = 60,
    source: str | None = None,
) -> PreemptionPlan | None:
    """The cheapest plan that makes ``request`` fit on one lender, or None if there is none.

    ``lenders`` maps a node name to ``(share, free lendable now)``; ``active`` holds the
    live boosts cluster-wide (only those in state ``active`` can be preempted).
    """
    active = tuple(active)
    best: tuple[tuple[int, int, int], PreemptionPlan] | None = None
    for order, lender in enumerate(_lenders_considered(target, lenders, source)):
        share, free = lenders[lender]
        if not request.fits_in(share):
            continue  # even an idle lender could never hold it
        candidates = _eligible_victims(lender, priority, active, now, min_runtime_seconds)
        victims = _pick_victims(request, free, candidates)
        if victims is None:
            continue
        cost = (len(victims), sum(v.priority.rank for v in victims), order)
        if best is None or cost < best[0]:
            best = (cost, PreemptionPlan(lender, victims, _describe_plan(lender, victims, request)))
    return best[1] if best else None


def why_not(
    request: Resources,
    priority: Priority,
    *,
    target: str,
    lenders: Mapping[str, tuple[Resources, Resources]],
    active: Sequence[Boost],
    now: datetime,
    min_runtime_seconds: float = 60,
    source: str | None = None,
) -> str:
    """One line saying why :func:`plan_preemption` finds no plan (same arguments)."""
    active = tuple(active)
    plan = plan_preemption(
        request, priority, target=target, lenders=lenders, active=active, now=now,
        min_runtime_seconds=min_runtime_seconds, source=source,
    )
    if plan is not None:
        return f"a plan exists: {plan.reason}"
    if source is not None and source == target:
        return f"{source} is the target itself; a node never lends to itself"
    if source is not None and source not in lenders:
        return f"{source} is not a lender (lenders: {', '.join(lenders) or 'none'})"
    considered = _lenders_considered(target, lenders, source)
    if not considered:
        return f"no lender other than the target {target}"

    reasons = []
    any_share_fits = False
    for lender in considered:
        share, free = lenders[lender]
        if not request.fits_in(share):
            reasons.append(f"{request.describe()} is more than {lender}'s share ({share.describe()})")
        elif priority is not _LOWEST:
            reasons.append(_why_not_on(lender, free, request, priority, active, now, min_runtime_seconds))
        else:
            any_share_fits = True
    if any_share_fits:  # said once, not once per lender
        reasons.append(
            f"a {priority.value} request can preempt nothing: only boosts of strictly lower priority are preempted"
        )
    return "; ".join(reasons)


def _lenders_considered(
    target: str, lenders: Mapping[str, tuple[Resources, Resources]], source: str | None
) -> list[str]:
    names = [source] if source is not None else list(lenders)
    return [name for name in names if name in lenders and name != target]


def _granted_at(boost: Boost) -> datetime:
    # An active boost always has a grant time (ledger invariant); created_at is only a safe fallback.
    return boost.granted_at or boost.created_at


def _age_seconds(boost: Boost, now: datetime) -> float:
    return (now - _granted_at(boost)).total_seconds()


def _active_on(lender: str, active: Sequence[Boost]) -> list[Boost]:
    return [b for b in active if b.state is BoostState.active and b.source == lender]


def _eligible_victims(
    lender: str, priority: Priority, active: Sequence[Boost], now: datetime, min_runtime_seconds: float
) -> list[Boost]:
    """Preemptible boosts on ``lender``, in the order they should be picked."""
    eligible = [
        b
        for b in _active_on(lender, active)
        if b.priority.rank < priority.rank and _age_seconds(b, now) >= min_runtime_seconds
    ]
    # Stable sorts, last key first: lowest priority, then newest grant, then id for determinism.
    eligible.sort(key=lambda b: b.id)
    eligible.sort(key=_granted_at, reverse=True)
    eligible.sort(key=lambda b: b.priority.rank)
    return eligible


def _frees_something_missing(victim: Resources, request: Resources, available: Resources) -> bool:
    return (
        (victim.cpu > 0 and available.cpu + _EPS < request.cpu)
        or (victim.gpu > 0 and available.gpu + _EPS < request.gpu)
        or (victim.memory > 0 and available.memory < request.memory)
    )


def _pick_victims(request: Resources, free: Resources, candidates: list[Boost]) -> tuple[Boost, ...] | None:
    """Take candidates in order until ``request`` fits, then spare any that turned out unneeded."""
    picked: list[Boost] = []
    available = free
    for boost in candidates:
        if request.fits_in(available):
            break
        # A boost that frees only what is already covered would be preempted for nothing.
        if _frees_something_missing(boost.resources, request, available):
            picked.append(boost)
            available = available + boost.resources
    if not request.fits_in(available):
        return None
    # A later pick can make an earlier one redundant (e.g. it brought CPU along with the GPU).
    # Try sparing the most protected picks first: those were picked last.
    for boost in reversed(picked.copy()):
        without = [b for b in picked if b is not boost]
        if request.fits_in(_total(free, without)):
            picked = without
    return tuple(picked)


def _total(free: Resources, boosts: Sequence[Boost]) -> Resources:
    return sum((b.resources for b in boosts), free)


def _describe_plan(lender: str, victims: tuple[Boost, ...], request: Resources) -> str:
    if not victims:
        return f"no preemption needed: {lender} has room for {request.describe()}"
    counts = Counter(v.priority for v in victims)
    kinds = " and ".join(f"{counts[p]} {p.value}" for p in sorted(counts, key=lambda p: p.rank))
    noun = "boost" if len(victims) == 1 else "boosts"
    ids = ", ".join(v.short_id for v in victims)
    return f"preempt {kinds} {noun} on {lender} ({ids}) to fit {request.describe()}"


def _why_not_on(
    lender: str,
    free: Resources,
    request: Resources,
    priority: Priority,
    active: Sequence[Boost],
    now: datetime,
    min_runtime_seconds: float,
) -> str:
    """Why one lender, whose share could hold the request, has no plan."""
    on_lender = _active_on(lender, active)
    if not on_lender:
        return f"{lender} has no active boosts to preempt and lacks {', '.join(request.shortfall(free))}"
    lower = [b for b in on_lender if b.priority.rank < priority.rank]
    if not lower:
        holders = "critical" if priority is _HIGHEST else f"{priority.value}-or-higher"
        return f"only {holders} boosts hold {lender}'s share"
    everything = _total(free, lower)
    if not request.fits_in(everything):
        return (
            f"even preempting every lower-priority boost on {lender} leaves it short of "
            f"{', '.join(request.shortfall(everything))}"
        )
    # The lower-priority boosts would be enough, so some of the needed ones are too young.
    young = sorted((b for b in lower if _age_seconds(b, now) < min_runtime_seconds), key=lambda b: b.id)
    limit = f"{min_runtime_seconds:g} s"
    if len(young) == 1:
        age = _age_seconds(young[0], now)
        return f"boost {young[0].short_id} on {lender} is younger than {limit} ({int(age)} s old)"
    if young:
        ids = ", ".join(b.short_id for b in young)
        return f"boosts {ids} on {lender} are younger than {limit}"
    return f"no plan on {lender}"  # not reached: without young boosts a plan would exist
