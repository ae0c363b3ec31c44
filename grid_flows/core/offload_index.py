"""The offload index: step (c) of :func:`~grid_flows.core.placement.place` without scanning every node.

A runner keeps one index in step with its cluster view (``update`` on every change of a
node); ``place(..., index=index)`` then finds the best lender for a task in time that
grows with the number of node *shapes*, not nodes. The placement is the same with or
without it (tests compare both on random clusters).

Example:
    ```python
    from grid_flows.core.offload_index import OffloadIndex
    from grid_flows.core.placement import place

    index = OffloadIndex.from_view(view)
    placement = place(requirement, view, boosts=[], strategy="best_fit", index=index)
    ```
"""

from __future__ import annotations

from bisect import bisect_left, insort
from typing import NamedTuple, Optional

from grid_flows.core.models import Resources
from grid_flows.core.placement import _EPS, _SCORES, ClusterView, NodeView, Strategy, _leftover_score


class _Have(NamedTuple):
    """A node's lendable_free as a plain tuple: hashable, sorts by CPU first, and has the
    ``cpu``/``gpu``/``memory`` attributes the score functions read."""

    cpu: float
    gpu: float
    memory: int


class _Shape:
    """The offload candidates that share one lendable_free, each list sorted, (key, view position)."""

    __slots__ = ("by_pos", "by_pressure", "by_in_flight")

    def __init__(self) -> None:
        self.by_pos: list[int] = []
        self.by_pressure: list[tuple[float, int]] = []
        self.by_in_flight: list[tuple[int, int]] = []


def _discard(items: list, item) -> None:
    i = bisect_left(items, item)
    if i == len(items) or items[i] != item:  # e.g. a NaN pressure: fail loudly, never drop a neighbour
        raise ValueError(f"OffloadIndex out of step: {item!r} not found")
    del items[i]


# How each strategy ranks offload nodes: by the node's own state, or by its lendable_free
# alone (then every node of one shape scores the same and the earliest one wins).
_BY_PRESSURE, _BY_IN_FLIGHT, _BY_SHAPE = 0, 1, 2
_RANK = {
    Strategy.local_first: _BY_PRESSURE,
    Strategy.node_specific: _BY_PRESSURE,
    Strategy.load_balanced: _BY_PRESSURE,
    Strategy.spread: _BY_IN_FLIGHT,
    Strategy.best_fit: _BY_SHAPE,
    Strategy.performance_optimized: _BY_SHAPE,
}


class OffloadIndex:
    """The offload candidates of one view (live nodes other than the target), grouped by
    their exact ``lendable_free`` ("shape"), so ``place`` does not scan every node.

    Whether a node fits a task depends only on its shape, and within a shape the best
    node per strategy is kept at the front of a sorted list, so a decision visits each
    fitting shape once: O(log n + fitting shapes) instead of O(nodes). It also counts
    the fitting nodes, which the placement reason reports. For best_fit with a CPU-only
    need the leftover grows with lendable CPU, so a bisect finds the tightest fit and
    the count directly. Clusters have few shapes (a few node sizes minus a few task
    sizes); if every node had a different lendable_free this is a scan again, cheaper
    per node than ``place``'s own.

    Ties break by the node's position in ``view.nodes``, as the scan does. Keep the
    index in step with the view: ``update`` a node whenever its NodeView changes
    (O(log n) plus a short list shift), ``remove`` one that left the view.

    >>> from grid_flows.core.models import Resources
    >>> from grid_flows.core.placement import Requirement, place
    >>> view = ClusterView(target="head", nodes={
    ...     "head": NodeView("head"),
    ...     "w1": NodeView("w1", lendable_free=Resources(cpu=4), in_flight=2),
    ...     "w2": NodeView("w2", lendable_free=Resources(cpu=4)),
    ... })
    >>> index = OffloadIndex.from_view(view)
    >>> place(Requirement(Resources(cpu=2)), view, [], "spread", index=index).node
    'w2'
    >>> w2 = NodeView("w2", lendable_free=Resources(cpu=2), in_flight=3)  # after a dispatch to w2
    >>> view = ClusterView(target="head", nodes={**view.nodes, "w2": w2})
    >>> index.update(w2)
    >>> place(Requirement(Resources(cpu=2)), view, [], "spread", index=index).node
    'w1'
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self._nodes: dict[str, NodeView] = {}  # every node in the view, dead ones too
        self._pos: dict[str, int] = {}  # view order, for ties; new names go last, like a dict
        self._next_pos = 0
        self._name_at: dict[int, str] = {}
        self._shape_of: dict[str, _Have] = {}  # candidates only: alive and not the target
        self._shapes: dict[_Have, _Shape] = {}
        self._keys: list[_Have] = []  # sorted, so a bisect skips shapes with too little CPU
        self._cpus: list[float] = []  # every candidate's lendable CPU, sorted: CPU-only counts

    @classmethod
    def from_view(cls, view: ClusterView) -> "OffloadIndex":
        index = cls(view.target)
        for n in view.nodes.values():
            index.update(n)
        return index

    def __len__(self) -> int:
        """How many nodes are offload candidates (alive, not the target)."""
        return len(self._shape_of)

    def update(self, node: NodeView) -> None:
        """Take ``node``'s new state (lendable_free, pressure, in_flight, alive), or add it."""
        name = node.name
        if name in self._shape_of:
            self._drop(name)
        if name not in self._pos:
            self._pos[name] = pos = self._next_pos
            self._name_at[pos] = name
            self._next_pos += 1
        self._nodes[name] = node
        if node.alive and name != self.target:
            self._add(node)

    def remove(self, name: str) -> None:
        """Forget a node that is no longer in the view."""
        if name in self._shape_of:
            self._drop(name)
        if name in self._nodes:
            del self._nodes[name], self._name_at[self._pos.pop(name)]
        # Positions are never reused: the others keep their order, and a node that
        # comes back goes last, as it would in a re-filled dict.

    def best(self, need: Resources, strategy: Strategy) -> Optional[tuple[int, float, NodeView]]:
        """(fitting nodes, best score, best node) for offloading ``need``, or None if none fits."""
        ncpu, ngpu, nmem = need.cpu - _EPS, need.gpu - _EPS, need.memory
        keys, shapes = self._keys, self._shapes
        i = bisect_left(keys, (ncpu,))  # the first shape with enough CPU
        if i == len(keys):
            return None
        rank = _RANK[strategy]
        if strategy is Strategy.best_fit and ngpu < 0 and nmem <= 0 and need.cpu > 0:
            # CPU-only best_fit: leftover rises with CPU, so the tightest fit is the first
            # shape; later ones tie only with the same CPU (other GPU/memory) or by rounding.
            first = _leftover_score(need, keys[i], None, 0)
            pos = shapes[keys[i]].by_pos[0]
            j = i + 1  # walk by index: slicing would copy the rest of the keys
            while j < len(keys) and _leftover_score(need, keys[j], None, 0) == first:
                pos = min(pos, shapes[keys[j]].by_pos[0])
                j += 1
            fitting = len(self._cpus) - bisect_left(self._cpus, ncpu)
            return fitting, first, self._nodes[self._name_at[pos]]
        score = _SCORES[strategy]
        plain = _Have(need.cpu, need.gpu, need.memory)  # same numbers, cheaper to read than pydantic fields
        fitting = 0
        top: Optional[tuple] = None  # (score, view position): ties go to the earlier node
        for key in keys[i:]:
            if not ((ngpu < 0 or key.gpu >= ngpu) and key.memory >= nmem):
                continue
            shape = shapes[key]
            fitting += len(shape.by_pos)
            if rank == _BY_PRESSURE:
                candidate = shape.by_pressure[0]
            elif rank == _BY_IN_FLIGHT:
                candidate = shape.by_in_flight[0]
            else:
                candidate = (score(plain, key, None, 0), shape.by_pos[0])
            if top is None or candidate < top:
                top = candidate
        if top is None:
            return None
        return fitting, top[0], self._nodes[self._name_at[top[1]]]

    def _add(self, node: NodeView) -> None:
        have = node.lendable_free
        key = _Have(have.cpu, have.gpu, have.memory)
        shape = self._shapes.get(key)
        if shape is None:
            shape = self._shapes[key] = _Shape()
            insort(self._keys, key)
        pos = self._pos[node.name]
        insort(shape.by_pos, pos)
        insort(shape.by_pressure, (node.pressure.score, pos))
        insort(shape.by_in_flight, (node.in_flight, pos))
        insort(self._cpus, key.cpu)
        self._shape_of[node.name] = key

    def _drop(self, name: str) -> None:
        key = self._shape_of.pop(name)
        node, pos = self._nodes[name], self._pos[name]
        shape = self._shapes[key]
        _discard(shape.by_pos, pos)
        # The stored scores came from the same NodeView, so recomputing finds them exactly.
        _discard(shape.by_pressure, (node.pressure.score, pos))
        _discard(shape.by_in_flight, (node.in_flight, pos))
        _discard(self._cpus, key.cpu)
        if not shape.by_pos:
            del self._shapes[key]
            _discard(self._keys, key)
