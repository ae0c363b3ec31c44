"""The task runner's dispatch as a state machine: events in, instructions out (pure).

In the style of Dask's worker state machine: :class:`Dispatcher` holds what one runner
knows (its queue, the capacity each node gives it, the boosts it routes into, the tasks
in flight) and each event method returns the instructions the runner must carry out
(submit to Ray, fail a task, cancel stranded ones, say something in the run's log). It
never talks to Ray or Prefect; ``grid_flows.runner.task_runner`` does, and tells the
dispatcher what happened. Every decision here is a plain call that tests make directly.

Example:
    >>> from grid_flows.core.models import Resources
    >>> from grid_flows.core.placement import Requirement
    >>> d = Dispatcher("head", budget={"head": Resources(cpu=2)}, alive={"head": True})
    >>> d.submit(Task(key=1, sort_key=(0, 1), requirement=Requirement(Resources(cpu=2)), name="a"))
    >>> d.submit(Task(key=2, sort_key=(0, 2), requirement=Requirement(Resources(cpu=1)), name="b"))
    >>> [(type(i).__name__, i.key) for i in d.dispatch_ready(now=None)]
    [('Dispatch', 1)]
    >>> [(type(i).__name__, i.key) for i in d.task_done(1)] + [(type(i).__name__, i.key) for i in d.dispatch_ready(None)]
    [('Finish', 1), ('Dispatch', 2)]
"""

from __future__ import annotations

import heapq
import logging
import operator
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Optional, Union

from grid_flows.core.models import Resources
from grid_flows.core.offload_index import OffloadIndex
from grid_flows.core.placement import (
    BoostView, ClusterView, NodeView, Placement, PlacementKind, Pressure, Requirement, Strategy, place,
)

_SORT_KEY = operator.attrgetter("sort_key")  # plain tuples: sorting compares in C
# A plain Ray cluster without grid labels: the runner behaves like prefect-ray on its node.
UNLIMITED = Resources(cpu=1e9, gpu=1e9, memory=2**62)


@dataclass(order=True)
class Task:
    """A task as the dispatcher sees it; ``key`` is the runner's handle for it."""

    sort_key: tuple  # (-priority rank, submission order): the smallest goes first
    key: int = field(compare=False)
    requirement: Requirement = field(compare=False)
    upstream: tuple = field(default=(), compare=False)  # keys of this runner's tasks it waits for
    name: str = field(default="", compare=False)
    attempts: int = field(default=0, compare=False)


@dataclass
class Flight:
    task: Task
    kind: PlacementKind
    node: str
    boost_id: Optional[str]
    resources: Resources


@dataclass
class BoostUse:
    """A boost this runner routes tasks into, and what its tasks hold of it."""

    boost_id: str
    source: str
    resources: Resources
    expires_at: datetime
    shared: bool = False  # granted to the target node (rebalance), not to this flow
    in_flight: Resources = field(default_factory=Resources)
    count: int = 0
    usable: bool = True
    why_unusable: str = ""


# -- instructions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Dispatch:
    """Submit task ``key`` to Ray as ``placement`` says; the capacity is already counted."""

    key: int
    placement: Placement
    resources: Resources


@dataclass(frozen=True)
class Fail:
    """Task ``key`` never reached Ray: resolve its future to a Failed state naming ``error``."""

    key: int
    error: BaseException
    what: str


@dataclass(frozen=True)
class Finish:
    """Task ``key``'s last attempt ended; its dependents may go."""

    key: int


@dataclass(frozen=True)
class Rerun:
    """Task ``key`` was lost with ``node`` and is queued again: run it as a new task run."""

    key: int
    node: str
    error: str


@dataclass(frozen=True)
class Cancel:
    """Cancel these tasks (stranded on a dead node or in a removed group); they come back
    through :meth:`Dispatcher.task_done` and run again elsewhere."""

    keys: tuple


@dataclass(frozen=True)
class Say:
    level: int
    message: str


Instruction = Union[Dispatch, Fail, Finish, Rerun, Cancel, Say]


class Dispatcher:
    """What one runner has queued, in flight and bound, and where its next tasks go.

    ``budget``: per node, the capacity this runner may use there (the target: its size;
    a lender: its lendable share). Call every method under the runner's lock.
    """

    def __init__(self, target: str, budget: dict[str, Resources], alive: dict[str, bool], *,
                 strategy: Strategy | str = Strategy.local_first, allow_offload: bool = False) -> None:
        self.target = target
        self.strategy = Strategy.parse(strategy)
        self.allow_offload = allow_offload
        self.budget = dict(budget)
        self.alive = {name: bool(alive.get(name, False)) for name in self.budget} | dict(alive)
        self.used: dict[str, Resources] = {name: Resources() for name in self.budget}
        self.node_in_flight: Counter = Counter()
        self.target_busy = ""  # dynamic_balancing: why the metrics call the target busy ("" = not)
        self.pressure: dict[str, Pressure] = {}  # from the metrics history; a node without one reads as calm
        self.queue: list[Task] = []
        self.in_flight: dict[int, Flight] = {}
        self.boosts: dict[str, BoostUse] = {}
        self.finished: set[int] = set()
        self.stranded: set[int] = set()
        self.nodes: dict[str, NodeView] = {name: self._node_view(name) for name in self.budget}
        self.index = OffloadIndex.from_view(self.view())

    # -- what place() sees ----------------------------------------------------------------

    def _node_view(self, name: str) -> NodeView:
        free = self.budget[name].minus(self.used[name])
        return NodeView(
            name=name,
            alive=self.alive.get(name, False),
            free=free if name == self.target else Resources(),
            lendable_free=free if name != self.target else Resources(),
            pressure=self.pressure.get(name, Pressure()),
            in_flight=self.node_in_flight[name],
        )

    def _node_changed(self, name: str) -> None:
        """Keep the view and its offload index in step after one node changed (never a rebuild)."""
        if name in self.budget:
            view = self.nodes[name] = self._node_view(name)
            self.index.update(view)

    def view(self) -> ClusterView:
        return ClusterView(target=self.target, nodes=self.nodes, allow_offload=self.allow_offload,
                           lent_when_target_full=True, target_busy=self.target_busy)

    def boost_views(self, now: Optional[datetime]) -> tuple[list[BoostView], list[Instruction]]:
        """The boosts as place() sees them (the flow's own first); a boost past its end
        stops taking new tasks here, with a line for the run's log."""
        said: list[Instruction] = []
        views = []
        for b in sorted(self.boosts.values(), key=lambda use: use.shared):
            if b.usable and now is not None and now >= b.expires_at:
                b.usable, b.why_unusable = False, "expired"
                said.append(Say(logging.WARNING, f"Boost {b.boost_id[:8]} expired at {b.expires_at:%H:%M:%S} UTC; "
                                                 "new tasks run elsewhere"))
            views.append(BoostView(id=b.boost_id, source=b.source, free=b.resources.minus(b.in_flight),
                                   usable=b.usable, in_flight=b.count, shared=b.shared))
        return views, said

    # -- events ---------------------------------------------------------------------------

    def submit(self, task: Task) -> None:
        heapq.heappush(self.queue, task)

    def dispatch_ready(self, now: Optional[datetime]) -> list[Instruction]:
        """Place every queued task that has room now, in priority order.

        A requirement that found no room is not placed again in the same pass (room only
        shrinks within a pass), so a long queue of like tasks costs one place() per
        distinct requirement, not one per task. A task whose upstream has not finished waits."""
        if not self.queue:
            return []
        boosts, out = self.boost_views(now)
        view = self.view()
        no_room: set[Requirement] = set()
        waiting: list[Task] = []
        pending = sorted(self.queue, key=_SORT_KEY, reverse=True)  # next task last: pop() is O(1)
        try:
            while pending:
                task = pending.pop()
                if task.requirement in no_room or not all(k in self.finished for k in task.upstream):
                    waiting.append(task)
                    continue
                try:
                    placement = place(task.requirement, view, boosts, self.strategy, index=self.index)
                except Exception as exc:  # a bug in placing one task must not stall the others
                    self.finished.add(task.key)
                    out.append(Fail(task.key, exc, "could not place"))
                    continue
                if placement.kind is PlacementKind.queue:
                    no_room.add(task.requirement)
                    waiting.append(task)
                    continue
                out.append(self._take(task, placement))
                view, boosts = self.view(), self.boost_views(now)[0]
        finally:  # a pass that raised half way leaves what it dispatched off the queue
            self.queue = waiting + pending[::-1]  # sorted by priority, so already a heap
        return out

    def _take(self, task: Task, placement: Placement) -> Dispatch:
        need = task.requirement.resources
        node = placement.node or self.target
        self.in_flight[task.key] = Flight(task, placement.kind, node, placement.boost_id, need)
        if placement.kind is PlacementKind.boost:
            use = self.boosts[placement.boost_id]
            use.in_flight, use.count = use.in_flight + need, use.count + 1
        else:
            self.used[node] = self.used[node] + need
            self.node_in_flight[node] += 1
            self._node_changed(node)
        return Dispatch(task.key, placement, need)

    def _give_back(self, flight: Flight) -> None:
        if flight.kind is PlacementKind.boost:
            use = self.boosts.get(flight.boost_id)
            if use:
                use.in_flight, use.count = use.in_flight.minus(flight.resources), use.count - 1
        else:
            self.used[flight.node] = self.used[flight.node].minus(flight.resources)
            self.node_in_flight[flight.node] -= 1
            self._node_changed(flight.node)

    def dispatch_failed(self, key: int, error: BaseException) -> list[Instruction]:
        """Ray refused the submission (e.g. options it rejects): this task fails, the others go on."""
        flight = self.in_flight.pop(key, None)
        if flight is not None:
            self._give_back(flight)
        self.finished.add(key)
        return [Fail(key, error, "could not submit")]

    def task_done(self, key: int, *, lost_with_node: bool = False, cancelled: bool = False,
                  error: str = "") -> list[Instruction]:
        """Task ``key`` ended. One lost with its node (or cancelled because it was stranded
        there) runs once more elsewhere, unless it ran on the target."""
        flight = self.in_flight.pop(key, None)
        if flight is None:
            return []
        self._give_back(flight)
        stranded = key in self.stranded
        self.stranded.discard(key)
        lost = lost_with_node or (stranded and cancelled)
        if lost and flight.kind is not PlacementKind.target and flight.task.attempts < 1:
            return self._rerun(flight, error)
        self.finished.add(key)
        return [Finish(key)]

    def _rerun(self, flight: Flight, error: str) -> list[Instruction]:
        out: list[Instruction] = []
        if flight.kind is PlacementKind.boost:
            use = self.boosts.get(flight.boost_id)
            if use and use.usable:
                use.usable, use.why_unusable = False, f"lender {flight.node} is gone"
        else:
            out += self.node_died(flight.node)
        task = flight.task
        task.attempts += 1
        heapq.heappush(self.queue, task)
        out.append(Rerun(task.key, flight.node, error))
        out.append(Say(logging.WARNING, f"Task {task.name} was lost with {flight.node} ({error}); "
                                        "running it again elsewhere"))
        return out

    def node_died(self, name: str) -> list[Instruction]:
        """Place nothing on ``name``; cancel (then re-place) the tasks offloaded there that
        have not reported: one still waiting for its lease would wait for the dead node's label."""
        if self.alive.get(name) is not False:
            self.alive[name] = False
            self._node_changed(name)
        keys = tuple(k for k, f in self.in_flight.items()
                     if f.node == name and f.kind is PlacementKind.offload and k not in self.stranded)
        self.stranded.update(keys)
        return [Cancel(keys)] if keys else []

    def set_pressures(self, pressures: dict[str, Pressure]) -> None:
        """The nodes' pressures as the metrics history last saw them (load_balanced ranks by them)."""
        changed = set(self.pressure) | set(pressures)
        self.pressure = dict(pressures)
        for name in changed:
            self._node_changed(name)

    def node_up(self, name: str) -> None:
        if not self.alive.get(name):
            self.alive[name] = True
            self._node_changed(name)

    def strand_boost(self, boost_id: str) -> list[Instruction]:
        """The boost's group is gone or homeless: its tasks still waiting in it would wait for ever."""
        keys = tuple(k for k, f in self.in_flight.items() if f.boost_id == boost_id)
        self.stranded.update(keys)
        return [Cancel(keys)] if keys else []

    # -- boosts ---------------------------------------------------------------------------

    def attach(self, use: BoostUse) -> None:
        self.boosts[use.boost_id] = use

    def stop_routing(self, boost_id: str, why: str, level: int = logging.WARNING) -> list[Instruction]:
        """No new task goes into the boost; tasks running in it continue."""
        use = self.boosts.get(boost_id)
        if use is None or not use.usable:
            return []
        use.usable, use.why_unusable = False, why
        return [Say(level, f"Boost {boost_id[:8]}: {why}; new tasks run elsewhere")]

    def resume_routing(self, boost_id: str, *, expires_at: Optional[datetime] = None, now: Optional[datetime] = None,
                       only_if: str = "") -> bool:
        """Route into the boost again: after it was kept in a new group (``only_if`` the
        preemption notice stopped it) or extended past ``now`` (``only_if="expired"``)."""
        use = self.boosts.get(boost_id)
        if use is None:
            return False
        if expires_at is not None:
            use.expires_at = expires_at
        if use.usable or not use.why_unusable.startswith(only_if):
            return False
        if now is not None and now >= use.expires_at:
            return False
        use.usable, use.why_unusable = True, ""
        return True

    def forget(self, boost_id: str) -> None:
        self.boosts.pop(boost_id, None)

    @property
    def idle(self) -> bool:
        return not self.queue and not self.in_flight
