"""Rebalance decisions: which boosts to grant, release early or reclaim, from node pressure.

Pure: takes the cluster spec, the metrics history, the live boosts and ``now``; returns
decisions for a flow to carry out. The sharing mode says whether borrowing is allowed at
all (``offload_only`` grants nothing); the policy says how (``conservative`` never grants,
``balanced`` lends half of a lender's free share, ``aggressive`` all of it, ``predictive``
lends like balanced but also when a rising trend will cross ``high`` within 5 minutes).

Thresholds are per resource: a node is *busy* when any score of ``pressure_of`` (cpu,
memory, or gpu when it has one) is above that resource's ``high``, and *idle* when all
are below their ``low``. One saturated resource is enough to starve a node, and a
weighted total would hide it. The total ranks lenders (least pressured lends first).

A node whose latest sample (at or before ``now``) is older than three sampling intervals
(the larger of ``monitoring_interval_seconds`` and ``rebalance_interval_seconds``: the
rebalance flow takes the samples) has no say: it neither borrows, lends, is released for
idleness nor protected. Samples count as consecutive only without such a gap between them.

Example:
    >>> from datetime import datetime, timedelta, timezone
    >>> spec = ClusterSpec.model_validate({"nodes": [
    ...     {"name": "gpu-master", "role": "head"},
    ...     {"name": "gpu1", "cpu_count": 8, "resource_sharing": {"can_share": True, "max_share_cpu": 4}}]})
    >>> t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
    >>> history = MetricsHistory()
    >>> for second in (0, 10):
    ...     history.add(NodeSample("gpu-master", t0 + timedelta(seconds=second), 95, 20, 0))
    ...     history.add(NodeSample("gpu1", t0 + timedelta(seconds=second), 10, 20, 0))
    >>> [(d.action, d.node, d.source, d.resources.describe())
    ...  for d in decide(spec, history, [], t0 + timedelta(seconds=10))]
    [('grant', 'gpu-master', 'gpu1', '2 CPU')]
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, Optional, Sequence

from grid_flows.core.models import (
    Boost,
    BoostState,
    ClusterSharing,
    ClusterSpec,
    Priority,
    Resources,
    SharingMode,
    SharingPolicy,
    Threshold,
    Thresholds,
)
from grid_flows.core.ledger import held_by_lender
from grid_flows.core.placement import Pressure
from grid_flows.core.pressure import MetricsHistory, NodeSample, pressure_of, trend

REBALANCE_ORIGIN = "rebalance"
BUSY_SAMPLES = 2  # one spike is noise; two in a row is load
PREDICTION_MINUTES = 5
MIN_TREND_POINTS = 3  # a line through two points predicts from a single spike
STALE_INTERVALS = 3

Action = Literal["grant", "release", "reclaim", "none"]


@dataclass(frozen=True)
class Decision:
    """One thing the rebalancer wants done, with a reason a person can read.

    ``node`` is the borrower for grant/release, the lender for reclaim, "" for none.
    A grant has no ``boost_id`` yet: the flow creates the boost.

    Example:
        >>> Decision("none", "", reason="all nodes between thresholds").action
        'none'
    """

    action: Action
    node: str
    boost_id: Optional[str] = None
    source: Optional[str] = None
    resources: Optional[Resources] = None
    priority: Optional[Priority] = None
    reason: str = ""


def decide(
    spec: ClusterSpec,
    history: MetricsHistory,
    boosts: Sequence[Boost],
    now: datetime,
    *,
    idle_samples: int = 3,
    min_hold_seconds: float | None = None,
) -> list[Decision]:
    """Decide one rebalance round: reclaims first, then early releases, then grants.

    Never empty: a round with nothing to do returns one ``none`` decision saying why.
    """
    if idle_samples < 1:
        raise ValueError(f"idle_samples: must be >= 1, got {idle_samples}")
    sharing = spec.resource_sharing
    if not sharing.enabled:
        return [Decision("none", "", reason="resource sharing is disabled")]
    hold = sharing.min_runtime_seconds if min_hold_seconds is None else min_hold_seconds
    view = _View(history, now, stale_after(sharing))
    thresholds = sharing.thresholds
    live = [b for b in boosts if not b.state.ended]
    active = [b for b in live if b.state is BoostState.active]
    notes: list[str] = []

    decisions = _reclaims(view, thresholds, active, notes)
    reclaimed = {d.boost_id for d in decisions}
    unclaimed = [b for b in active if b.id not in reclaimed]
    decisions += _releases(view, thresholds, unclaimed, idle_samples, hold, now, notes)
    decisions += _grants(spec, view, live, notes)
    if decisions:
        return decisions
    return [Decision("none", "", reason="; ".join(notes) or "all nodes between thresholds")]


def placement_pressures(spec: ClusterSpec, history: MetricsHistory, now: datetime) -> dict[str, Pressure]:
    """Each node's pressure as placement sees it, from its latest sample; a node whose latest
    sample is stale (older than :func:`stale_after`) is left out and so reads as calm.

    Example:
        >>> from datetime import datetime, timezone
        >>> spec = ClusterSpec.model_validate({"nodes": [{"name": "head", "role": "head"}]})
        >>> t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
        >>> history = MetricsHistory()
        >>> history.add(NodeSample("head", t0, 90, 50, 0))
        >>> placement_pressures(spec, history, t0)["head"].score
        0.7
        >>> placement_pressures(spec, history, t0 + timedelta(minutes=5))
        {}
    """
    out = {}
    for node in spec.nodes:
        latest = history.latest(node.name)
        if latest is not None and now - latest.at <= stale_after(spec.resource_sharing):
            s = pressure_of(latest)
            out[node.name] = Pressure(s.cpu, s.memory, s.gpu, has_gpu=latest.has_gpu)
    return out


def stale_after(sharing: ClusterSharing) -> timedelta:
    """How old a node's latest sample may be and still count (three sampling intervals)."""
    interval = max(sharing.monitoring_interval_seconds, sharing.rebalance_interval_seconds)
    return timedelta(seconds=STALE_INTERVALS * interval)


class _View:
    """The samples known at ``now``, for nodes whose latest one is fresh."""

    def __init__(self, history: MetricsHistory, now: datetime, stale_after: timedelta) -> None:
        self.history, self.now, self.stale_after = history, now, stale_after

    def samples(self, node: str) -> list[NodeSample]:
        """The latest unbroken run: samples before a gap longer than ``stale_after`` are not
        "in a row" with the later ones (a rebalancer stopped for an hour has no streak)."""
        known = [s for s in self.history.samples(node) if s.at <= self.now]
        if not known or self.now - known[-1].at > self.stale_after:
            return []
        start = len(known) - 1
        while start > 0 and known[start].at - known[start - 1].at <= self.stale_after:
            start -= 1
        return known[start:]


def _levels(sample: NodeSample) -> dict[str, float]:
    scores = pressure_of(sample)
    levels = {"cpu": scores.cpu, "memory": scores.memory}
    if sample.has_gpu:  # a missing GPU is neither busy nor idle
        levels["gpu"] = scores.gpu
    return levels


def _limit(thresholds: Thresholds, resource: str) -> Threshold:
    return getattr(thresholds, resource)


def _busy(sample: NodeSample, thresholds: Thresholds) -> list[str]:
    """The resources above their ``high``, described: ['cpu 0.95 > 0.80']."""
    return [
        f"{name} {value:.2f} > {_limit(thresholds, name).high:.2f}"
        for name, value in _levels(sample).items()
        if value > _limit(thresholds, name).high
    ]


def _idle(sample: NodeSample, thresholds: Thresholds) -> bool:
    return all(value < _limit(thresholds, name).low for name, value in _levels(sample).items())


def _busy_streak(samples: list[NodeSample], thresholds: Thresholds) -> Optional[str]:
    """Why the last BUSY_SAMPLES samples are all busy, or None."""
    last = samples[-BUSY_SAMPLES:]
    if len(last) < BUSY_SAMPLES or not all(_busy(s, thresholds) for s in last):
        return None
    return f"above high in the last {BUSY_SAMPLES} samples ({', '.join(_busy(last[-1], thresholds))})"


def busy_reason(spec: ClusterSpec, history: MetricsHistory, node: str, now: datetime) -> str:
    """Why ``node`` counts as busy for ``dynamic_balancing`` (its last samples above a
    ``high`` threshold), or "" when it does not or its samples are stale.

    Example:
        >>> from datetime import datetime, timezone
        >>> spec = ClusterSpec.model_validate({"nodes": [{"name": "head", "role": "head"}]})
        >>> t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
        >>> history = MetricsHistory()
        >>> for second in (0, 10):
        ...     history.add(NodeSample("head", t0 + timedelta(seconds=second), 95, 20, 0))
        >>> busy_reason(spec, history, "head", t0 + timedelta(seconds=10))
        'above high in the last 2 samples (cpu 0.95 > 0.80)'
        >>> busy_reason(spec, history, "head", t0 + timedelta(minutes=5))  # stale (> 3 x 30 s): no say
        ''
    """
    sharing = spec.resource_sharing
    view = _View(history, now, stale_after(sharing))
    return _busy_streak(view.samples(node), sharing.thresholds) or ""


def _reclaims(view: _View, thresholds: Thresholds, active: list[Boost], notes: list[str]) -> list[Decision]:
    """Protect lenders: a busy lender gets back every non-critical boost it lent.

    All of them, not "just enough": what a boost's tasks use is unknown here, and a lender
    is a person's desktop. Lowest priority first, then the most recently granted first.
    """
    decisions = []
    for lender in sorted({b.source for b in active}):
        why = _busy_streak(view.samples(lender), thresholds)
        if why is None:
            continue
        lent = [b for b in active if b.source == lender]
        exempt = [b for b in lent if b.priority is Priority.critical]
        if exempt:
            notes.append(f"{lender} is {why} but keeps {len(exempt)} critical boost(s)")
        lent = [b for b in lent if b.priority is not Priority.critical]
        lent.sort(key=lambda b: (b.priority.rank, -(b.granted_at or b.created_at).timestamp()))
        for boost in lent:
            decisions.append(
                Decision(
                    "reclaim",
                    lender,
                    boost.id,
                    lender,
                    boost.resources,
                    boost.priority,
                    f"lender {lender} is {why}: reclaim {boost.priority.value} boost {boost.short_id} "
                    f"lent to {boost.target}",
                )
            )
    return decisions


def _releases(
    view: _View,
    thresholds: Thresholds,
    active: list[Boost],
    idle_samples: int,
    hold_seconds: float,
    now: datetime,
    notes: list[str],
) -> list[Decision]:
    """Release rebalance-made boosts whose borrower stayed idle, once held long enough."""
    decisions = []
    for boost in active:
        if boost.origin != REBALANCE_ORIGIN:
            continue  # a boost someone asked for ends when they release it or it expires
        last = view.samples(boost.target)[-idle_samples:]
        if len(last) < idle_samples or not all(_idle(s, thresholds) for s in last):
            continue
        held = (now - (boost.granted_at or boost.created_at)).total_seconds()
        if held < hold_seconds:
            notes.append(
                f"{boost.target} is idle but boost {boost.short_id} is held {held:.0f}s "
                f"of the minimum {hold_seconds:.0f}s"
            )
            continue
        decisions.append(
            Decision(
                "release",
                boost.target,
                boost.id,
                boost.source,
                boost.resources,
                boost.priority,
                f"{boost.target} below low in the last {idle_samples} samples after {held:.0f}s: "
                f"release boost {boost.short_id} from {boost.source}",
            )
        )
    return decisions


def _grants(spec: ClusterSpec, view: _View, live: list[Boost], notes: list[str]) -> list[Decision]:
    """At most one boost per busy borrower (the head, or a node already borrowing)."""
    sharing = spec.resource_sharing
    if sharing.mode is SharingMode.offload_only:
        notes.append("mode offload_only does not lend boosts")
        return []
    if sharing.policy is SharingPolicy.conservative:
        notes.append("policy conservative does not grant boosts")
        return []
    lent = held_by_lender(live, count_pending=True)  # pending: being admitted on that capacity now
    free = {lender.name: lender.share.minus(lent.get(lender.name, Resources())) for lender in spec.lenders()}
    borrowers = [spec.head.name] + sorted({b.target for b in live} - {spec.head.name})
    decisions = []
    for borrower in borrowers:
        held = next((b for b in live if b.target == borrower and b.origin == REBALANCE_ORIGIN), None)
        if held is not None:
            notes.append(f"{borrower} already holds rebalance boost {held.short_id}")
            continue
        samples = view.samples(borrower)
        if not samples:
            notes.append(f"{borrower} has no fresh sample")
            continue
        why = _busy_streak(samples, sharing.thresholds)
        if why is None and sharing.policy is SharingPolicy.predictive:
            why = _predicted_busy(samples, sharing.thresholds, view.now)
        if why is None:
            notes.append(f"{borrower} is not above high in the last {BUSY_SAMPLES} samples")
            continue
        choice = _pick_lender(spec, view, free, borrower, sharing.policy)
        if choice is None:
            notes.append(f"{borrower} is {why} but no idle-enough lender has free capacity")
            continue
        lender, amount, lender_total = choice
        free[lender] = free[lender].minus(amount)
        decisions.append(
            Decision(
                "grant",
                borrower,
                None,
                lender,
                amount,
                Priority.normal,
                f"{borrower} is {why}: borrow {amount.describe()} from {lender} "
                f"(least pressured lender, {lender_total:.2f}; policy {sharing.policy.value})",
            )
        )
    return decisions


def _predicted_busy(samples: list[NodeSample], thresholds: Thresholds, now: datetime) -> Optional[str]:
    window = timedelta(minutes=PREDICTION_MINUTES)
    for resource in _levels(samples[-1]):
        points = [(s.at, _levels(s)[resource]) for s in samples if resource in _levels(s)]
        line = trend(points, window, now)
        predicted = line.predict(PREDICTION_MINUTES)
        high = _limit(thresholds, resource).high
        if line.n_points >= MIN_TREND_POINTS and line.slope_per_minute > 0 and predicted > high:
            return f"predicted {resource} {predicted:.2f} > {high:.2f} within {PREDICTION_MINUTES} min"
    return None


def _pick_lender(
    spec: ClusterSpec, view: _View, free: dict[str, Resources], borrower: str, policy: SharingPolicy
) -> Optional[tuple[str, Resources, float]]:
    """The least-pressured fresh, not-busy lender with something to lend: (name, amount, total)."""
    candidates = []
    for lender in spec.lenders():
        samples = view.samples(lender.name)
        if lender.name == borrower or not samples or _busy(samples[-1], spec.resource_sharing.thresholds):
            continue
        amount = free[lender.name] if policy is SharingPolicy.aggressive else _half(free[lender.name])
        if amount.is_zero():
            continue
        total = pressure_of(samples[-1]).total
        candidates.append((total, lender.resource_sharing.priority, lender.name, amount))
    if not candidates:
        return None
    total, _, name, amount = min(candidates, key=lambda c: c[:3])
    return name, amount, total


def _half(resources: Resources) -> Resources:
    return Resources(cpu=resources.cpu / 2, gpu=resources.gpu / 2, memory=resources.memory // 2)
