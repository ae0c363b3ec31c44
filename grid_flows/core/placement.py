"""Pure placement: where should a flow's next task run right now?

``place`` takes what one task needs, a snapshot of the cluster as seen by one
runner, and that flow's own boosts, and returns a ``Placement``: run it on the
flow's own node (target), inside one of its boosts, offloaded to another node's
lendable share, or queue it. No Ray, no Prefect and no clock here, so every
decision is a plain function call that tests can make in microseconds.

The scheduler only ever uses capacity the flow may use: the target's free
capacity, a boost's free capacity, and other nodes' ``lendable_free``. A
worker's private capacity is never touched.

Lent capacity is a fallback when ``ClusterView.lent_when_target_full`` is set (the
runner sets it in every sharing mode): offloading and the node's shared boosts (granted
to the node by the rebalancer, not to this flow) are considered only when the target
cannot take the task, or when ``target_busy`` says the target is under pressure
(``dynamic_balancing``); a busy target still takes the task when nothing else can.

Example:
    >>> from grid_flows.core.models import Resources
    >>> view = ClusterView(target="gpu-master", nodes={
    ...     "gpu-master": NodeView("gpu-master", free=Resources(cpu=1)),
    ...     "gpu1": NodeView("gpu1", lendable_free=Resources(cpu=4)),
    ... })
    >>> boost = BoostView(id="1a2b3c4d-0000", source="gpu1", free=Resources(cpu=2))
    >>> place(Requirement(), view, [boost]).reason
    'target gpu-master has 1 CPU free'
    >>> p = place(Requirement(Resources(cpu=2)), view, [boost])
    >>> p.kind.value, p.node, p.boost_id
    ('boost', 'gpu1', '1a2b3c4d-0000')
    >>> p.reason
    'boost 1a2b3c4d on gpu1 has 2 CPU free; target gpu-master lacks 2 CPU (has 1)'
    >>> place(Requirement(Resources(cpu=8)), view, [boost], "best-fit").reason
    'nothing fits 8 CPU: target gpu-master lacks 8 CPU (has 1); boost 1a2b3c4d on gpu1 lacks 8 CPU (has 2); no other node can lend it (1 checked)'
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Sequence

from grid_flows.core.models import Resources
from grid_flows.core.pressure import weighted_total

if TYPE_CHECKING:  # place() takes an index; the index module builds on this one
    from grid_flows.core.offload_index import OffloadIndex

__all__ = [
    "BoostView",
    "ClusterView",
    "NodeView",
    "Placement",
    "PlacementKind",
    "Pressure",
    "Requirement",
    "Strategy",
    "confidence",
    "place",
]

_EPS = 1e-9  # same tolerance as Resources.fits_in, so both agree on what fits
_GIB = 1024**3
# performance_optimized counts headroom in CPU-equivalents: 4 GiB of memory is
# worth one CPU, and a GPU is worth 8 CPUs to a task that asks for one.
_MEMORY_PER_CPU = 4 * _GIB
_GPU_WEIGHT_NEEDED = 8.0
_NAMED_MAX = 3  # how many down nodes a queue reason names before "+N more"


class Strategy(str, Enum):
    local_first = "local_first"
    best_fit = "best_fit"
    load_balanced = "load_balanced"
    performance_optimized = "performance_optimized"
    spread = "spread"
    node_specific = "node_specific"

    @classmethod
    def parse(cls, text: "Strategy | str") -> "Strategy":
        """``Strategy`` from user text; ``best-fit`` and ``Best_Fit`` are accepted too."""
        if isinstance(text, cls):
            return text
        try:
            return cls(str(text).strip().lower().replace("-", "_"))
        except ValueError:
            choices = ", ".join(s.value for s in cls)
            raise ValueError(f"unknown strategy {text!r}; expected one of: {choices}") from None


class PlacementKind(str, Enum):
    target = "target"  # on the flow's own node
    boost = "boost"  # in a boost's placement group, physically on its source node
    offload = "offload"  # on another node, within its lendable share
    queue = "queue"  # nothing fits now; the runner holds the task


@dataclass(frozen=True)
class Pressure:
    """How busy a node is, each in [0, 1]."""

    cpu: float = 0.0
    memory: float = 0.0
    gpu: float = 0.0
    has_gpu: bool = True  # False: the GPU's weight goes to CPU and memory (core.pressure.weighted_total)

    @property
    def score(self) -> float:
        """One number for ranking nodes; GPU weighs most because it is the scarcest."""
        return weighted_total(self.cpu, self.memory, self.gpu, self.has_gpu)


@dataclass(frozen=True)
class NodeView:
    name: str
    alive: bool = True
    free: Resources = Resources()  # used for the target node only
    lendable_free: Resources = Resources()  # used for offload to this node
    pressure: Pressure = Pressure()
    in_flight: int = 0  # this runner's target/offload tasks on the node


@dataclass(frozen=True)
class BoostView:
    id: str
    source: str  # the lending node, where boosted tasks physically run
    free: Resources  # free inside the placement group, in-flight tasks already taken off
    usable: bool = True  # False while draining, expired or preempted
    in_flight: int = 0
    shared: bool = False  # granted to the target node (rebalance), not to this flow: lent capacity


@dataclass(frozen=True)
class ClusterView:
    target: str
    nodes: Mapping[str, NodeView]
    allow_offload: bool = True
    lent_when_target_full: bool = False  # offload and shared boosts only when the target cannot take it
    target_busy: str = ""  # why the target counts as saturated although it has room ("" = it does not)


@dataclass(frozen=True)
class Requirement:
    resources: Resources = Resources(cpu=1)
    node: Optional[str] = None  # required for node_specific


@dataclass(frozen=True)
class Placement:
    kind: PlacementKind
    node: Optional[str]
    boost_id: Optional[str]
    confidence: float
    reason: str


def confidence(pressure: Pressure, available: Resources, required: Resources) -> float:
    """How sure we are the task runs well there: calm node times room for the task.

    >>> confidence(Pressure(cpu=0.5), Resources(cpu=1), Resources(cpu=2))
    0.4
    """
    calm = 0.4 * (1 - pressure.cpu) + 0.3 * (1 - pressure.memory) + 0.3 * (1 - pressure.gpu)
    room = 1.0
    # Only kinds the task asks for limit the room; asking for nothing means full room.
    if required.cpu > 0:
        room = min(room, available.cpu / required.cpu)
    if required.gpu > 0:
        room = min(room, available.gpu / required.gpu)
    if required.memory > 0:
        room = min(room, available.memory / required.memory)
    return min(1.0, max(0.0, round(calm * room, 12)))


# --- strategy scores: lower is better; ties keep candidate order (target, boosts, offload)

ScoreFn = Callable[[Resources, Resources, Pressure, int], float]


def _pressure_score(need: Resources, have: Resources, pressure: Pressure, in_flight: int) -> float:
    return pressure.score


def _leftover_score(need: Resources, have: Resources, pressure: Pressure, in_flight: int) -> float:
    # Leftover measured in units of the request ("how many more such tasks would
    # still fit"), summed over the kinds the task asks for, so CPU cores and
    # memory bytes compare fairly. A task that asks for nothing scores 0 everywhere.
    left = 0.0
    if need.cpu > 0:
        left += (have.cpu - need.cpu) / need.cpu
    if need.gpu > 0:
        left += (have.gpu - need.gpu) / need.gpu
    if need.memory > 0:
        left += (have.memory - need.memory) / need.memory
    return left


def _headroom_score(need: Resources, have: Resources, pressure: Pressure, in_flight: int) -> float:
    gpu_weight = _GPU_WEIGHT_NEEDED if need.gpu > 0 else 1.0
    return -(have.cpu + have.memory / _MEMORY_PER_CPU + gpu_weight * have.gpu)


def _in_flight_score(need: Resources, have: Resources, pressure: Pressure, in_flight: int) -> float:
    return in_flight


_SCORES: dict[Strategy, ScoreFn] = {
    # local_first/node_specific take the first target or boost that fits (they
    # return early) and only rank offload nodes, by pressure.
    Strategy.local_first: _pressure_score,
    Strategy.node_specific: _pressure_score,
    Strategy.best_fit: _leftover_score,
    Strategy.load_balanced: _pressure_score,
    Strategy.performance_optimized: _headroom_score,
    Strategy.spread: _in_flight_score,
}
_WHY = {
    Strategy.best_fit: "tightest fit",
    Strategy.load_balanced: "lowest pressure",
    Strategy.performance_optimized: "most headroom",
    Strategy.spread: "fewest tasks in flight",
}
_FIRST_FIT = (Strategy.local_first, Strategy.node_specific)


def place(
    requirement: Requirement,
    view: ClusterView,
    boosts: Sequence[BoostView],
    strategy: Strategy | str = Strategy.local_first,
    index: Optional["OffloadIndex"] = None,
) -> Placement:
    """Choose where one task runs. Raises ValueError for an unknown strategy, or
    for node_specific without ``requirement.node``.

    ``index``, an ``OffloadIndex`` kept in step with ``view``, answers the offload
    step without scanning every node; the placement is the same either way."""
    strategy = Strategy.parse(strategy)
    if index is not None and index.target != view.target:
        raise ValueError(f"index is for target {index.target!r}, view for {view.target!r}")
    only = requirement.node if strategy is Strategy.node_specific else None
    if strategy is Strategy.node_specific and only is None:
        raise ValueError("strategy node_specific needs requirement.node")
    need = requirement.resources
    # Plain locals: the offload loop below runs once per node and must stay cheap
    # (a pydantic attribute read costs ~35 ns); ngpu < 0 means "no GPU asked".
    ncpu, ngpu, nmem = need.cpu - _EPS, need.gpu - _EPS, need.memory
    nodes = view.nodes
    target = nodes.get(view.target)
    first_fit = strategy in _FIRST_FIT
    score = _SCORES[strategy]
    best: Optional[tuple] = None  # (score, kind, node name, boost, available, pressure)
    count = 0
    busy = view.target_busy if only is None else ""  # a named node is the user's choice
    target_fits = (
        (only is None or only == view.target) and target is not None and target.alive
        and _fits(target.free, ncpu, ngpu, nmem)
    )
    lent_ok = not (view.lent_when_target_full and target_fits and not busy)

    # (a) the flow's own node; a busy one only when nothing else fits (below)
    if target_fits and not busy:
        have = target.free
        if first_fit:
            return _chosen(need, view, strategy, PlacementKind.target, target.name, None, have, target.pressure, 1)
        best = (score(need, have, target.pressure, target.in_flight), PlacementKind.target,
                target.name, None, have, target.pressure)
        count = 1

    # (b) the flow's boosts, in the order given
    for b in boosts:
        if not b.usable or (only is not None and b.source != only) or (b.shared and not lent_ok):
            continue
        source = nodes.get(b.source)
        have = b.free
        if source is None or not source.alive or not _fits(have, ncpu, ngpu, nmem):
            continue
        if first_fit:
            return _chosen(need, view, strategy, PlacementKind.boost, b.source, b, have, source.pressure, 1)
        s = score(need, have, source.pressure, b.in_flight)
        count += 1
        if best is None or s < best[0]:
            best = (s, PlacementKind.boost, b.source, b, have, source.pressure)

    # (c) other nodes' lendable share
    if view.allow_offload and lent_ok and only is None and index is not None:
        found = index.best(need, strategy)
        if found is not None:
            fitting, s, n = found
            count += fitting
            # Offload candidates come after target and boosts, so only a strictly lower score wins.
            if best is None or s < best[0]:
                best = (s, PlacementKind.offload, n.name, None, n.lendable_free, n.pressure)
    elif view.allow_offload and lent_ok:
        if only is None:
            others = nodes.values()
        else:
            others = () if only == view.target or only not in nodes else (nodes[only],)
        for n in others:
            if n is target or not n.alive:
                continue
            have = n.lendable_free
            if have.cpu >= ncpu and (ngpu < 0 or have.gpu >= ngpu) and have.memory >= nmem:  # _fits, inlined
                s = score(need, have, n.pressure, n.in_flight)
                count += 1
                if best is None or s < best[0]:
                    best = (s, PlacementKind.offload, n.name, None, have, n.pressure)

    if best is None and target_fits:  # busy, but nothing else has room: better than waiting
        placement = _chosen(need, view, strategy, PlacementKind.target, target.name, None, target.free,
                            target.pressure, 1)
        return Placement(placement.kind, placement.node, None, placement.confidence,
                         f"{placement.reason}; it is busy ({busy}) but nothing else fits")
    if best is None:
        return Placement(PlacementKind.queue, None, None, 0.0, _queue_reason(need, view, boosts, only))
    _, kind, name, boost, have, pressure = best
    return _chosen(need, view, strategy, kind, name, boost, have, pressure, count)


def _fits(have: Resources, ncpu: float, ngpu: float, nmem: int) -> bool:
    return have.cpu >= ncpu and (ngpu < 0 or have.gpu >= ngpu) and have.memory >= nmem


def _chosen(
    need: Resources,
    view: ClusterView,
    strategy: Strategy,
    kind: PlacementKind,
    node: str,
    boost: Optional[BoostView],
    have: Resources,
    pressure: Pressure,
    count: int,
) -> Placement:
    if kind is PlacementKind.target:
        reason = f"target {node} has {have.describe()} free"
    elif kind is PlacementKind.boost:
        reason = f"boost {boost.id[:8]} on {node} has {have.describe()} free"
    else:
        reason = f"offload to {node}: {have.describe()} free to lend"
    if kind is not PlacementKind.target and strategy is not Strategy.node_specific:
        why_not = _target_problem(need, view)
        if why_not:
            reason += f"; {why_not}"
    if count > 1 and strategy in _WHY:
        reason += f"; {strategy.value}: {_WHY[strategy]} of {count} candidates"
    return Placement(
        kind, node, boost.id if boost else None, confidence(pressure, have, need), reason
    )


def _target_problem(need: Resources, view: ClusterView) -> str:
    """Why the task cannot run on the flow's own node, or "" if it can."""
    target = view.nodes.get(view.target)
    if target is None or not target.alive:
        return f"target {view.target} is down"
    if view.target_busy and need.fits_in(target.free):
        return f"target {view.target} is busy ({view.target_busy})"
    if target.free.is_zero() and not need.is_zero():
        return f"target {view.target} is full"
    lacking = need.shortfall(target.free)
    return f"target {view.target} lacks {', '.join(lacking)}" if lacking else ""


def _queue_reason(
    need: Resources, view: ClusterView, boosts: Sequence[BoostView], only: Optional[str]
) -> str:
    # Only runs when nothing fits, so clarity beats speed here.
    nodes = view.nodes
    head = f"nothing fits {need.describe()}" + (f" on {only}" if only else "")
    if only is not None and only not in nodes:
        return f"{head}: node {only} is unknown (not in the cluster view)"
    if only is not None and not nodes[only].alive:
        return f"{head}: node {only} is down"
    parts = []
    if only is None or only == view.target:
        target = nodes.get(view.target)
        if target is None or not target.alive:
            parts.append(f"target {view.target} is down")
        else:
            parts.append(f"target {view.target} lacks {', '.join(need.shortfall(target.free))}")
    for b in boosts:
        if only is not None and b.source != only:
            continue
        label = f"boost {b.id[:8]} on {b.source}"
        source = nodes.get(b.source)
        if not b.usable:
            parts.append(f"{label} is not usable")
        elif source is None or not source.alive:
            parts.append(f"{label}: source is down")
        else:
            parts.append(f"{label} lacks {', '.join(need.shortfall(b.free))}")
    if only is not None:
        if only != view.target:
            if not view.allow_offload:
                parts.append(f"offload to {only} is not allowed")
            else:
                parts.append(f"offload to {only} lacks {', '.join(need.shortfall(nodes[only].lendable_free))}")
    elif not view.allow_offload:
        parts.append("offload is not allowed")
    else:
        others = [n for name, n in nodes.items() if name != view.target]
        down = [n.name for n in others if not n.alive]
        if not others:
            parts.append("no other nodes")
        else:
            text = f"no other node can lend it ({len(others) - len(down)} checked"
            if down:
                named = ", ".join(down[:_NAMED_MAX])
                more = f" +{len(down) - _NAMED_MAX} more" if len(down) > _NAMED_MAX else ""
                text += f"; down: {named}{more}"
            parts.append(text + ")")
    return f"{head}: {'; '.join(parts)}"
