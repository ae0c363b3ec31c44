"""BoostRayTaskRunner: prefect-ray's RayTaskRunner with a boost-aware scheduler per task.

Every submitted task (each item of ``.map`` too) is placed by :func:`grid_flows.core.placement.place`:
on the flow's own node (the target) when it has room, inside one of the flow's boosts
(a placement group on the lender) when it does not, or offloaded within another node's
lendable share. When nothing has room the task waits in this runner's own queue, not in
Ray, and is dispatched as capacity frees, after the tasks it depends on were dispatched.

Lent capacity is used when the target is saturated, as the cluster's sharing mode says:

- ``share_and_offload``: queued tasks may also go into boosts granted to the target node
  by the rebalance flow (picked up within a second of being granted or activated while
  tasks wait; the flow's own boosts are tried first) and within other nodes' lendable share.
- ``dynamic_balancing``: the same, and the target also counts as saturated while the
  metrics history shows it above a ``high`` threshold, whatever the load is (this flow's
  own tasks count too); it still runs there what nothing else has room for.
- ``offload_only``: no boosts; tasks go to lenders within their share, the head's own
  capacity is never extended.

Example:
    ```python
    from prefect import flow, task
    from grid_flows import BoostRayTaskRunner, requires

    @task
    def square(x):
        return x * x

    @flow(task_runner=BoostRayTaskRunner(strategy="local_first"))
    def squares():
        with requires(cpu=1):
            return [f.result() for f in square.map(range(8))]
    ```
"""

from __future__ import annotations

import contextlib
import contextvars
import heapq
import json
import itertools
import logging
import operator
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional
from uuid import UUID, uuid4

from prefect.context import FlowRunContext
from prefect.logging import get_run_logger
from prefect.states import State, exception_to_crashed_state, exception_to_failed_state
from prefect.utilities.asyncutils import run_coro_as_sync
from prefect.task_runners import TaskRunner
from prefect.utilities.collections import visit_collection
from prefect.utilities.engine import collect_task_run_inputs_sync
from prefect_ray import RayTaskRunner
from prefect_ray.context import RemoteOptionsContext
from prefect_ray.task_runners import PrefectRayFuture

from grid_flows.adapters.ray import cluster as rc
from grid_flows.core.models import Boost, BoostState, Priority, Resources, SharingMode, utcnow
from grid_flows.runner.requirements import Need, current_need
from grid_flows.core.placement import (
    BoostView,
    ClusterView,
    NodeView,
    OffloadIndex,
    Placement,
    PlacementKind,
    Requirement,
    Strategy,
    place,
)
from grid_flows.adapters.prefect.settings import RAY_NAMESPACE, prefect_env_for_workers, ray_address
from grid_flows.adapters.prefect.task_context import serialize_task_context, worker_context

logger = logging.getLogger("grid_flows.runner.task_runner")
_REFRESH_SECONDS = 1.0
_SORT_KEY = operator.attrgetter("sort_key")  # plain tuples: sorting compares in C
_EXAMPLE_REASONS = 5
_REMOTE_ONLY_OPTIONS = frozenset({"max_calls"})  # ray.remote() takes them; .options() raises
_PREEMPTION_NOTICE = "it is being preempted by boost"  # why_unusable while a preemption is under way


class GridFuture(PrefectRayFuture):
    """A future for a task that may still wait in the runner's queue (no Ray object yet)."""

    def __init__(self, task_run_id: UUID):
        super().__init__(task_run_id=task_run_id, wrapped_future=None)
        self._dispatched = threading.Event()
        self._early_callbacks: list[Callable] = []
        self._callback_lock = threading.Lock()
        self._finished = threading.Event()
        self.placement: Optional[Placement] = None
        self.dispatched_at: Optional[float] = None  # wall-clock time of the latest dispatch

    def _set_ref(self, ref: Any, placement: Placement) -> None:
        self.placement = placement
        self.dispatched_at = time.time()
        with self._callback_lock:
            self._wrapped_future = ref
            self._dispatched.set()
            callbacks, self._early_callbacks = self._early_callbacks, []
        for fn in callbacks:
            super().add_done_callback(fn)

    @property
    def dispatched(self) -> bool:
        return self._dispatched.is_set()

    @property
    def finished(self) -> bool:
        """True once the runner saw the task's last attempt end (it will not be re-run)."""
        return self._finished.is_set()

    def _retried(self, ref: Any, deadline: float | None) -> bool:
        """After ``ref`` failed: wait for the runner to re-run the task elsewhere (True) or give up."""
        while not self._finished.is_set() and self._wrapped_future is ref:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            self._finished.wait(0.05)
        return self._wrapped_future is not ref

    def wait(self, timeout: float | None = None) -> None:
        import ray

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if not self._dispatched.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
                return
            ref = self._wrapped_future
            try:
                result = ray.get(ref, timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                return
            except Exception as exc:
                if (is_lost_with_node(exc) or _is_cancelled(exc)) and self._retried(ref, deadline):
                    continue
                result = run_coro_as_sync(exception_to_crashed_state(exc))
            if isinstance(result, State):
                self._final_state = result
            return

    def result(self, timeout: float | None = None, raise_on_failure: bool = True) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if not self._dispatched.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"Task run {self.task_run_id} is still queued after {timeout} seconds")
            ref = self._wrapped_future
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return super().result(timeout=remaining, raise_on_failure=raise_on_failure)
            except Exception as exc:
                if (is_lost_with_node(exc) or _is_cancelled(exc)) and self._retried(ref, deadline):
                    self._final_state = None
                    continue
                raise

    def add_done_callback(self, fn: Callable) -> None:
        with self._callback_lock:
            if not self._dispatched.is_set():
                self._early_callbacks.append(fn)
                return
        super().add_done_callback(fn)

    def __reduce__(self):
        # Only dispatched futures cross into Ray workers (a task waits for its upstream's
        # dispatch), and there a plain PrefectRayFuture is all that is needed.
        return (PrefectRayFuture, (self.task_run_id, self.wrapped_future))


@dataclass
class _Binding:
    """A boost this runner routes tasks into."""

    boost: Boost
    handle: Any
    in_flight: Resources = field(default_factory=Resources)
    count: int = 0
    usable: bool = True
    why_unusable: str = ""
    ended_here: bool = False  # this runner already ended the boost (expiry)
    shared: bool = False  # granted to the target node by the rebalancer, adopted by this runner


@dataclass(order=True)
class _Queued:
    sort_key: tuple
    future: GridFuture = field(compare=False)
    submit: Callable[[dict, UUID, dict], Any] = field(compare=False)
    need: Need = field(compare=False)
    requirement: Requirement = field(compare=False)
    upstream: list = field(compare=False)
    task_name: str = field(compare=False)
    context: dict = field(compare=False)
    attempts: int = field(default=0, compare=False)


@dataclass
class _InFlight:
    item: _Queued
    kind: PlacementKind
    node: str
    boost_id: Optional[str]
    resources: Resources


class BoostRayTaskRunner(RayTaskRunner):
    """A Ray task runner that places each task with the boost-aware scheduler.

    Args:
        address: Ray address; default ``PREFECT_INTEGRATIONS_GRID_RAY_ADDRESS``, then ``RAY_ADDRESS``.
        strategy: local_first, best_fit, load_balanced, performance_optimized, spread or node_specific.
        target: the node whose capacity the flow uses first; default the node this process runs on.
        boost_ids: boosts to route into from the start (``@boosted`` and ``boost()`` attach theirs).
        allow_offload: use other nodes' lendable share without a boost; default from the cluster's
            sharing settings (on unless sharing is disabled).
        init_kwargs: extra ``ray.init`` arguments.

    Example:
        ```python
        @flow(task_runner=BoostRayTaskRunner(strategy="best_fit"))
        def my_flow(): ...
        ```
    """

    def __init__(
        self,
        address: Optional[str] = None,
        strategy: Strategy | str = Strategy.local_first,
        *,
        target: Optional[str] = None,
        boost_ids: Iterable[str] = (),
        allow_offload: Optional[bool] = None,
        init_kwargs: Optional[dict] = None,
    ):
        self.strategy = Strategy.parse(strategy)
        self.target = target
        self.boost_ids = tuple(boost_ids)
        self.allow_offload = allow_offload
        init_kwargs = dict(init_kwargs or {})
        init_kwargs.setdefault("namespace", RAY_NAMESPACE)
        super().__init__(address=address, init_kwargs=init_kwargs)
        self._reset_runtime_state()

    def _reset_runtime_state(self) -> None:
        self._cond = threading.Condition(threading.RLock())
        self._queue: list[_Queued] = []
        self._seq = itertools.count()
        self._bindings: dict[str, _Binding] = {}
        self._in_flight: dict[Any, _InFlight] = {}
        self._budget: dict[str, Resources] = {}  # target: its size; others: lendable share
        self._nodes: dict[str, NodeView] = {}  # the view place() sees, one NodeView per budgeted node
        self._index: Optional[OffloadIndex] = None  # offload candidates of _nodes, kept in step
        self._alive: dict[str, bool] = {}
        self._node_in_flight: Counter = Counter()
        self._node_used: dict[str, Resources] = {}
        self._counts: Counter = Counter()
        self._reasons: list[str] = []
        self._flow_run_id: Optional[UUID] = None
        self._dispatcher: Optional[threading.Thread] = None
        self._stopping = False
        self._in_worker = False
        self._remote_fn = None
        self._labelled = False
        self._task_env: dict = {}
        self._run_logger = None
        self._crashed_runs: list[tuple[UUID, str]] = []
        self._stranded: set = set()
        self._to_cancel: list = []  # refs of tasks stranded on a dead node, cancelled by the dispatcher
        self._node_specs: dict = {}
        self._grace_seconds = 30.0
        self._spec = None
        self._sharing_mode = SharingMode.share_and_offload
        self._adopt_node_boosts = False
        self._target_busy = ""
        self._busy_checked_at = float("-inf")

    # -- prefect's TaskRunner contract -----------------------------------------------------

    def duplicate(self) -> "BoostRayTaskRunner":
        return type(self)(
            address=self.address,
            strategy=self.strategy,
            target=self.target,
            boost_ids=self.boost_ids,
            allow_offload=self.allow_offload,
            init_kwargs=self.init_kwargs,
        )

    def __reduce__(self):
        # Live queues, threads and locks never travel; a copy is rebuilt from its settings.
        return (
            _rebuild_runner,
            (type(self), self.address, self.strategy.value, self.target, self.boost_ids, self.allow_offload,
             self.init_kwargs),
        )

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, BoostRayTaskRunner)
            and super().__eq__(other)
            and (self.strategy, self.target, self.boost_ids, self.allow_offload)
            == (other.strategy, other.target, other.boost_ids, other.allow_offload)
        )

    def __hash__(self) -> int:
        return id(self)

    def __enter__(self) -> "BoostRayTaskRunner":
        import ray

        if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
            # Inside a Ray worker Prefect re-enters a copy of the runner: no driver work here.
            TaskRunner.__enter__(self)
            self._in_worker = True
            return self
        self.address = ray_address(self.address)
        worker_env = prefect_env_for_workers()
        if ray.is_initialized():
            # Someone else connected this driver: pass the API URL with every task instead.
            self._task_env = {"runtime_env": {"env_vars": worker_env}} if worker_env else {}
        else:
            self.init_kwargs.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(worker_env)
            self._task_env = {}
        super().__enter__()
        self._remote_fn = ray.remote(_run_guarded_task)
        self._remote_fns: dict[tuple, Any] = {}
        self._load_cluster()
        for boost_id in self.boost_ids:
            from grid_flows.adapters.prefect.store import BoostStore

            with BoostStore() as store:
                self.attach_boost(store.get(boost_id))
        self._first_refresh()
        # The dispatcher reads boost records: it must see this thread's Prefect settings (a
        # temporary_settings() API URL lives in a context variable, which threads do not inherit).
        self._dispatcher = threading.Thread(target=contextvars.copy_context().run, args=(self._dispatch_loop,),
                                            name="grid-dispatcher", daemon=True)
        self._dispatcher.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if not self._in_worker and self._dispatcher is not None:
            self.drain()
            with self._cond:
                self._stopping = True
                self._cond.notify_all()
            self._dispatcher.join(timeout=5)
            self._publish_placements()
        super().__exit__(*exc_info)

    def submit(self, task, parameters: dict[str, Any], wait_for=None, dependencies=None):
        if not self._started:
            raise RuntimeError("The task runner must be started before submitting work.")
        if self._in_worker:
            return super().submit(task, parameters, wait_for, dependencies)
        if self._flow_run_id is None:
            ctx = FlowRunContext.get()
            self._flow_run_id = ctx.flow_run.id if ctx and ctx.flow_run else None
            with contextlib.suppress(Exception):  # the flow run's logger reaches the Prefect UI
                self._run_logger = get_run_logger()

        remote_options = dict(RemoteOptionsContext.get().current_remote_options or {})
        need = current_need(task.tags, remote_options)
        task_run_id = uuid4()
        task_inputs = {
            k: collect_task_run_inputs_sync(v, future_cls=PrefectRayFuture) for k, v in parameters.items()
        }
        # The context is captured here, in the submitting thread, even if dispatch is later.
        context = serialize_task_context(
            {
                "task": task,
                "task_run_id": task_run_id,
                "task_inputs": task_inputs,
                "copy_to_child_ctx": True,
            }
        )
        future = GridFuture(task_run_id=task_run_id)
        upstream = _futures_in(parameters) + [f for f in (wait_for or []) if isinstance(f, GridFuture)]

        remote_fn, call_options = self._remote_for(remote_options)
        call_options = _with_worker_env(call_options, self._task_env)

        def submit_to_ray(options: dict, run_id: UUID, run_context: dict, guard: Any) -> Any:
            params, upstream_refs = self._exchange_prefect_for_ray_futures(parameters)
            return (
                remote_fn.options(name=task.name, **{**call_options, **options})
                .remote(
                    *upstream_refs,
                    task=task,
                    task_run_id=run_id,
                    parameters=params,
                    wait_for=wait_for,
                    dependencies=dependencies,
                    context=run_context,
                    grid_guard=guard,
                )
            )

        priority = need.priority or Priority.normal
        queued = _Queued(
            (-priority.rank, next(self._seq)), future, submit_to_ray, need,
            Requirement(resources=need.resources(), node=need.node), upstream, task.name, context,
        )
        with self._cond:
            heapq.heappush(self._queue, queued)
            self._dispatch_ready()
        return future

    def _remote_for(self, remote_options: dict) -> tuple[Any, dict]:
        """The remote function for these options, and the options left for ``.options()``.
        Ray takes some options (``max_calls``) only in ``ray.remote()``, as prefect-ray passes them."""
        import ray

        only = {k: v for k, v in remote_options.items() if k in _REMOTE_ONLY_OPTIONS}
        if not only:
            return self._remote_fn, remote_options
        key = tuple(sorted(only.items()))
        with self._cond:
            if key not in self._remote_fns:
                self._remote_fns[key] = ray.remote(**only)(_run_guarded_task)
            return self._remote_fns[key], {k: v for k, v in remote_options.items() if k not in only}

    # -- boosts ----------------------------------------------------------------------------

    def attach_boost(self, boost: Boost, *, shared: bool = False) -> None:
        """Route tasks into ``boost`` from now on; tasks already waiting move into it at once.

        ``shared``: the boost was granted to the target node, not to this flow; it is used
        only while the target is saturated, and this runner never releases it.
        """
        handle = rc.group_handle(boost.placement_group_id)
        with self._cond:
            self._bindings[boost.id] = _Binding(boost=boost, handle=handle, shared=shared)
            self._dispatch_ready()
            self._cond.notify_all()
        if shared:
            self._say(logging.INFO, f"Boost {boost.short_id} ({boost.resources.describe()} from {boost.source}) "
                                    f"was granted to {boost.target}; queued tasks may run in it while "
                                    f"{boost.target} is saturated")
        logger.info("Routing tasks into boost %s on %s (%s)", boost.short_id, boost.source, boost.resources.describe())

    def _adopt_new_node_boosts(self, live: Iterable[Boost]) -> None:
        """Attach active boosts granted to the target node by the rebalancer (sharing modes)."""
        from grid_flows.core.policy import REBALANCE_ORIGIN

        with self._cond:
            known = set(self._bindings)
        for boost in live:
            if (boost.id not in known and boost.target == self.target and boost.origin == REBALANCE_ORIGIN
                    and boost.state is BoostState.active and boost.placement_group_id
                    and utcnow() < boost.expires_at):
                self.attach_boost(boost, shared=True)

    def _check_target_pressure(self) -> None:
        """dynamic_balancing: is the target busy by the metrics history? At most once per
        monitoring interval; no history or stale samples mean "not busy"."""
        sharing = self._spec.resource_sharing
        if time.monotonic() - self._busy_checked_at < sharing.monitoring_interval_seconds:
            return
        self._busy_checked_at = time.monotonic()
        from grid_flows.adapters.prefect.metrics_store import load_history
        from grid_flows.core.policy import busy_reason

        now = utcnow()
        busy = busy_reason(self._spec, load_history(now=now), self.target, now)
        if busy != self._target_busy:
            with self._cond:
                self._target_busy = busy
                self._cond.notify_all()
            self._say(logging.INFO, f"Target {self.target} is busy ({busy}): tasks move to lent capacity first"
                      if busy else f"Target {self.target} is no longer busy: tasks run there first again")

    def _rebind(self, binding: _Binding, record: Boost) -> None:
        """The boost holds its capacity in a new group (a preemption that could not complete
        gave it back): route into the new group, and again at all if only the notice stopped it."""
        with self._cond:
            binding.boost = record
            binding.handle = rc.group_handle(record.placement_group_id)
            if binding.why_unusable.startswith(_PREEMPTION_NOTICE):
                binding.usable, binding.why_unusable = True, ""
            self._dispatch_ready()
            self._cond.notify_all()
        self._say(logging.INFO, f"Boost {record.short_id} was kept ({record.reason}); tasks go into it again")

    def stop_routing(self, boost_id: str, why: str, level: int = logging.WARNING) -> None:
        """No new task goes into the boost; tasks running in it continue."""
        with self._cond:
            binding = self._bindings.get(boost_id)
            if binding and binding.usable:
                binding.usable = False
                binding.why_unusable = why
                self._say(level, f"Boost {boost_id[:8]}: {why}; new tasks run elsewhere")

    def detach_boost(self, boost_id: str, timeout: float | None = None) -> bool:
        """Stop routing to the boost and wait until none of its tasks runs; True if they all ended."""
        self.stop_routing(boost_id, "being released", level=logging.INFO)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._bindings.get(boost_id) and self._bindings[boost_id].count:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(timeout=0.5 if remaining is None else min(0.5, remaining))
            self._bindings.pop(boost_id, None)
        return True

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until no task is queued or running; True if that happened within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._in_flight:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                if self._queue and not (self._dispatcher and self._dispatcher.is_alive()):
                    gone = RuntimeError("the grid-flows dispatcher thread is gone")
                    for item in self._queue:  # resolve their futures: nobody waits on them for ever
                        self._fail_undispatched(item, gone, "could not start")
                    self._queue = []
                    return False
                self._cond.wait(timeout=0.5 if remaining is None else min(0.5, remaining))
        return True

    # -- placing ---------------------------------------------------------------------------

    def _load_cluster(self) -> None:
        import ray

        from grid_flows.adapters.prefect.store import BoostStore
        from grid_flows.errors import ClusterNotConfigured

        spec = None
        try:
            with BoostStore() as store:
                spec = store.load_cluster()
        except ClusterNotConfigured:
            logger.warning("No GridCluster block: tasks run on the target and in boosts only (no offload)")
        nodes = rc.grid_nodes()
        self._labelled = bool(nodes)
        if self.target is None:
            here = ray.get_runtime_context().get_node_id()
            self.target = next((n.name for n in nodes.values() if n.node_id == here), None)
            if self.target is None and spec is not None:
                self.target = spec.head.name
        if self.allow_offload is None:
            self.allow_offload = bool(spec and spec.resource_sharing.enabled)
        if spec is not None:
            self._grace_seconds = spec.resource_sharing.grace_seconds
            self._node_specs = {n.name: n for n in spec.nodes}
        self._spec = spec
        sharing = spec.resource_sharing if spec else None
        self._sharing_mode = sharing.mode if sharing else SharingMode.share_and_offload
        from grid_flows.control.boosts import why_no_boosts

        self._adopt_node_boosts = spec is not None and not why_no_boosts(spec)
        for name, info in nodes.items():
            self._alive[name] = info.alive
            if name == self.target:
                self._budget[name] = info.size
            elif spec is not None and name in {n.name for n in spec.lenders()}:
                self._budget[name] = info.lendable_free
            self._node_used[name] = Resources()
        if self.target not in self._budget:
            # A plain Ray cluster without grid labels: behave like prefect-ray on this node.
            self._budget[self.target or "local"] = Resources(cpu=1e9, gpu=1e9, memory=2**62)
            self.target = self.target or "local"
            self._alive[self.target] = True
            self._node_used[self.target] = Resources()
        self._rebuild_nodes()

    def _node_view(self, name: str) -> NodeView:
        free = self._budget[name].minus(self._node_used[name])
        return NodeView(
            name=name,
            alive=self._alive.get(name, False),
            free=free if name == self.target else Resources(),
            lendable_free=free if name != self.target else Resources(),
            in_flight=self._node_in_flight[name],
        )

    def _rebuild_nodes(self) -> None:
        self._nodes = {name: self._node_view(name) for name in self._budget}
        self._index = OffloadIndex.from_view(self._view())

    def _node_changed(self, name: str) -> None:
        """Keep the view and its offload index in step after one node's use or liveness changed.
        Under the lock. One node per dispatch: a decision never rebuilds the whole view."""
        if name in self._budget:
            view = self._nodes[name] = self._node_view(name)
            self._index.update(view)

    def _view(self) -> ClusterView:
        return ClusterView(target=self.target, nodes=self._nodes, allow_offload=bool(self.allow_offload),
                           lent_when_target_full=True, target_busy=self._target_busy)

    def _boost_views(self) -> list[BoostView]:
        now = utcnow()
        views = []
        # The flow's own boosts first: first-fit strategies try them before the node's shared ones.
        for b in sorted(self._bindings.values(), key=lambda binding: binding.shared):
            if b.usable and now >= b.boost.expires_at:
                b.usable, b.why_unusable = False, "expired"
                self._say(logging.WARNING, f"Boost {b.boost.short_id} expired at {b.boost.expires_at:%H:%M:%S} UTC; "
                                           "new tasks run elsewhere")
            views.append(
                BoostView(
                    id=b.boost.id,
                    source=b.boost.source,
                    free=b.boost.resources.minus(b.in_flight),
                    usable=b.usable,
                    in_flight=b.count,
                    shared=b.shared,
                )
            )
        return views

    def _dispatch_ready(self) -> None:
        """Dispatch every queued task that has room now, in priority order. Call under the lock.

        Runs on every task end, over the whole queue: a requirement that found no room is
        not placed again in the same pass (room only shrinks within a pass), so a long queue
        of like tasks costs one place() per distinct requirement, not one per task."""
        if not self._queue:
            return
        view, boosts = self._view(), self._boost_views()
        no_room: set[Requirement] = set()
        waiting = []
        pending = sorted(self._queue, key=_SORT_KEY, reverse=True)  # next task last: pop() is O(1)
        try:
            self._dispatch_pass(pending, waiting, no_room, view, boosts)
        finally:  # a pass that raised half way leaves what it dispatched off the queue
            self._queue = waiting + pending[::-1]  # sorted by priority, so already a heap

    def _dispatch_pass(self, pending: list, waiting: list, no_room: set, view, boosts) -> None:
        while pending:
            item = pending.pop()
            requirement = item.requirement
            if requirement in no_room or not all(f.finished for f in item.upstream):
                waiting.append(item)
                continue
            try:
                placement = place(requirement, view, boosts, self.strategy, index=self._index)
            except Exception as exc:  # a bug in placing one task must not stall the others
                self._fail_undispatched(item, exc, "could not place")
                continue
            if placement.kind is PlacementKind.queue:
                no_room.add(requirement)
                waiting.append(item)
                continue
            self._dispatch(item, placement, requirement.resources)
            view, boosts = self._view(), self._boost_views()

    def _dispatch(self, item: _Queued, placement: Placement, need: Resources) -> None:
        options = self._ray_options(placement, need)
        node = placement.node or self.target
        node_spec = self._node_specs.get(node)
        # The node's resource mode, and the VRAM need (None: unstated) its guard admits the task for.
        guard = (node_spec, need.gpu, item.need.vram) if node_spec is not None else None
        try:
            ref = item.submit(options, item.future.task_run_id, item.context, guard)
        except Exception as exc:  # e.g. options Ray refuses: this task fails, the others go on
            self._fail_undispatched(item, exc, "could not submit")
            return
        self._in_flight[ref] = _InFlight(item, placement.kind, node, placement.boost_id, need)
        if placement.kind is PlacementKind.boost:
            binding = self._bindings[placement.boost_id]
            binding.in_flight = binding.in_flight + need
            binding.count += 1
        else:
            self._node_used[node] = self._node_used[node] + need
            self._node_in_flight[node] += 1
            self._node_changed(node)
        self._counts[f"{placement.kind.value}:{node}"] += 1
        if len(self._reasons) < _EXAMPLE_REASONS or placement.kind.value not in " ".join(self._reasons):
            self._reasons.append(f"{item.task_name}: {placement.kind.value} -> {placement.reason}")
        logger.debug("%s -> %s on %s (%.2f): %s", item.task_name, placement.kind.value, node,
                     placement.confidence, placement.reason)
        item.future._set_ref(ref, placement)
        ref._on_completed(lambda result, ref=ref: self._task_done(ref, result))

    def _ray_options(self, placement: Placement, need: Resources) -> dict:
        # A task lost with its group or lender is re-placed by _task_done (Ray does not retry it).
        group = self._bindings[placement.boost_id].handle if placement.kind is PlacementKind.boost else None
        return rc.task_options(placement.kind, need, placement.node, group=group, labelled=self._labelled)

    def _fail_undispatched(self, item: _Queued, exc: BaseException, what: str) -> None:
        """End a task that never reached Ray: its future resolves to a Failed state naming
        the error, the flow run's log says so, and tasks waiting on it may go on. Under the lock."""
        import ray

        message = f"grid-flows {what} task {item.task_name} on Ray: {type(exc).__name__}: {exc}"
        state = run_coro_as_sync(exception_to_failed_state(exc, message=message))
        item.future._set_ref(ray.put(state), None)
        item.future._finished.set()
        self._say(logging.ERROR, message)
        self._cond.notify_all()

    def _task_done(self, ref: Any, result: Any = None) -> None:
        with self._cond:
            flight = self._in_flight.pop(ref, None)
            if flight is None:
                return
            if flight.kind is PlacementKind.boost:
                binding = self._bindings.get(flight.boost_id)
                if binding:
                    binding.in_flight = binding.in_flight.minus(flight.resources)
                    binding.count -= 1
            else:
                self._node_used[flight.node] = self._node_used[flight.node].minus(flight.resources)
                self._node_in_flight[flight.node] -= 1
                self._node_changed(flight.node)
            stranded = ref in self._stranded
            self._stranded.discard(ref)
            lost = is_lost_with_node(result) or (stranded and _is_cancelled(result))
            if lost and flight.kind is not PlacementKind.target and flight.item.attempts < 1:
                self._retry_elsewhere(flight, result)
            else:
                flight.item.future._finished.set()
            self._cond.notify_all()  # the dispatcher thread submits what now fits

    def _retry_elsewhere(self, flight: _InFlight, error: BaseException) -> None:
        """A task lost with its node (or its boost's group) runs again, as a new task run. Under the lock."""
        if flight.kind is PlacementKind.boost:
            binding = self._bindings.get(flight.boost_id)
            if binding and binding.usable:
                binding.usable, binding.why_unusable = False, f"lender {flight.node} is gone"
        else:
            self._node_died(flight.node)
        item = flight.item
        old_run_id, new_run_id = item.future.task_run_id, uuid4()
        item.context = _with_task_run_id(item.context, new_run_id)
        item.future._task_run_id = new_run_id
        item.attempts += 1
        self._crashed_runs.append((old_run_id, f"lost with {flight.node} ({type(error).__name__}); re-run as {new_run_id}"))
        heapq.heappush(self._queue, item)
        self._say(logging.WARNING, f"Task {item.task_name} was lost with {flight.node} ({type(error).__name__}); "
                                   "running it again elsewhere")

    def _node_died(self, name: str) -> None:
        """``name`` is gone: place nothing there, and cancel (then re-place) the tasks sent
        there that have not reported, since one still waiting for its lease would wait for
        the dead node's label for ever. Under the lock; the dispatcher does the cancelling."""
        if self._alive.get(name) is not False:
            self._alive[name] = False
            self._node_changed(name)
        refs = [ref for ref, f in self._in_flight.items()
                if f.node == name and f.kind is PlacementKind.offload and ref not in self._stranded]
        self._stranded.update(refs)
        self._to_cancel.extend(refs)

    def _cancel_stranded(self, binding: _Binding) -> None:
        """Tasks still waiting inside a removed or homeless group would wait forever: cancel
        them, and _task_done runs them again elsewhere."""
        with self._cond:
            refs = [ref for ref, f in self._in_flight.items() if f.boost_id == binding.boost.id]
            self._stranded.update(refs)
        _cancel(refs)

    def _say(self, level: int, message: str) -> None:
        """Log to this module and, when known, to the flow run's log in the Prefect UI."""
        logger.log(level, message)
        if self._run_logger is not None:
            with contextlib.suppress(Exception):
                self._run_logger.log(level, message)

    def _dispatch_loop(self) -> None:
        from grid_flows.adapters.prefect.store import BoostStore

        last_refresh = time.monotonic()
        with BoostStore() as store:
            while True:
                with self._cond:
                    if self._stopping:
                        return
                    self._cond.wait(timeout=0.2)
                    if self._stopping:
                        return
                    try:
                        self._dispatch_ready()
                    except Exception as exc:  # never die silently: tasks would wait for ever
                        self._say(logging.ERROR, f"grid-flows dispatcher error (it keeps going): "
                                                 f"{type(exc).__name__}: {exc}")
                    crashed, self._crashed_runs = self._crashed_runs, []
                    to_cancel, self._to_cancel = self._to_cancel, []
                for run_id, message in crashed:
                    _mark_crashed(store, run_id, message)
                _cancel(to_cancel)
                if time.monotonic() - last_refresh > _REFRESH_SECONDS:
                    last_refresh = time.monotonic()
                    try:
                        self._refresh(store)
                    except Exception as exc:  # keep placing on the last known view
                        logger.warning("could not refresh boosts and node liveness: %s", exc)

    def _first_refresh(self) -> None:
        """Node boosts and target pressure as they are at the start, so the first tasks see them.
        Placing works without them; the refresh loop tries again."""
        from grid_flows.adapters.prefect.store import BoostStore

        try:
            with BoostStore() as store:
                self._refresh_sharing(store, at_start=True)
        except Exception as exc:
            logger.warning("could not reach the Prefect API for boosts granted to %s: %s", self.target, exc)

    def _refresh(self, store) -> None:
        """Node liveness and the records of bound boosts: preempted, released elsewhere,
        extended, lender down, or expired (then this runner ends it as soon as it is idle)."""
        from grid_flows.control import boosts as boost_ops
        from grid_flows.core.ledger import Event

        alive = {name: info.alive for name, info in rc.grid_nodes().items()}
        with self._cond:
            for name, up in alive.items():
                if not up:
                    self._node_died(name)
                elif not self._alive.get(name):
                    self._alive[name] = True
                    self._node_changed(name)
            bindings = list(self._bindings.values())
        if any(not b.usable for b in bindings):
            groups = rc.grid_groups()
            for binding in bindings:
                group = groups.get(binding.boost.placement_group)
                if not binding.usable and binding.count and (group is None or group.state != "CREATED"):
                    self._cancel_stranded(binding)
        now = utcnow()
        for binding in bindings:
            b = binding.boost
            if not alive.get(b.source, False) and not binding.ended_here:
                self.stop_routing(b.id, f"lender {b.source} is down")
                binding.ended_here = True
                boost_ops.end(store, b.id, Event.node_lost, f"lender {b.source} is down")
                continue
            record = store.get(b.id)
            if record.state.ended:
                if not binding.ended_here:
                    self.stop_routing(b.id, f"it was {record.state.value} ({record.reason or 'no reason given'})",
                                      level=logging.INFO if binding.shared else logging.WARNING)
                if binding.shared and binding.count == 0:
                    with self._cond:  # the node's boost, not ours: forget it once nothing runs there
                        self._bindings.pop(b.id, None)
            elif record.preempted_by:
                self.stop_routing(b.id, f"{_PREEMPTION_NOTICE} {record.preempted_by[:8]}")
            elif record.placement_group_id != b.placement_group_id or \
                    binding.why_unusable.startswith(_PREEMPTION_NOTICE):  # kept, in a new group or its own
                self._rebind(binding, record)
            elif record.expires_at != b.expires_at:
                with self._cond:
                    binding.boost = record
                    if binding.why_unusable == "expired" and now < record.expires_at:
                        binding.usable, binding.why_unusable = True, ""
                self._say(logging.INFO, f"Boost {b.short_id} now expires at {record.expires_at:%H:%M:%S} UTC")
            elif binding.why_unusable == "expired" and not binding.ended_here:
                overdue = (now - b.expires_at).total_seconds()
                if binding.count == 0 or overdue >= self._grace_seconds:
                    binding.ended_here = True
                    boost_ops.end(store, b.id, Event.expire, "expired while a flow used it" if binding.shared
                                  else "expired while its flow ran")
        self._refresh_sharing(store)

    def _refresh_sharing(self, store, at_start: bool = False) -> None:
        """The mode's extras, after the checks above; one failing does not stop the other."""
        with self._cond:
            waiting = bool(self._queue)
        if self._adopt_node_boosts and (waiting or at_start):  # only a saturated target can use them
            try:
                self._adopt_new_node_boosts(store.list())
            except Exception as exc:
                logger.warning("could not look for boosts granted to %s: %s", self.target, exc)
        if self._spec is not None and self._sharing_mode is SharingMode.dynamic_balancing:
            try:
                self._check_target_pressure()
            except Exception as exc:
                logger.warning("could not read the pressure of %s: %s", self.target, exc)

    # -- what the UI shows -----------------------------------------------------------------

    def _publish_placements(self) -> None:
        if self._flow_run_id is None or not self._counts:
            return
        rows = []
        for key, count in sorted(self._counts.items()):
            kind, node = key.split(":", 1)
            rows.append({"Placement": kind, "Node": node, "Tasks": count, "Strategy": self.strategy.value})
        description = (
            f"Where the tasks of flow run {self._flow_run_id} ran (strategy {self.strategy.value}). "
            "'boost' tasks ran inside a boost's placement group on the lender.\n\nExample reasons:\n"
            + "\n".join(f"- {r}" for r in self._reasons)
        )
        try:
            # The flow run context is gone by __exit__: name the run explicitly, so the
            # artifact shows on the flow run's page in the UI.
            from prefect.client.schemas.actions import ArtifactCreate

            from grid_flows.adapters.prefect.store import api_client

            with api_client() as client:
                client.create_artifact(
                    ArtifactCreate(
                        key=f"grid-placements-{self._flow_run_id}",
                        type="table",
                        data=json.dumps(rows),
                        description=description,
                        flow_run_id=self._flow_run_id,
                    )
                )
        except Exception as exc:
            logger.warning("could not publish the placements artifact: %s", exc)


def _rebuild_runner(cls, address, strategy, target, boost_ids, allow_offload, init_kwargs):
    return cls(address=address, strategy=strategy, target=target, boost_ids=boost_ids,
               allow_offload=allow_offload, init_kwargs=init_kwargs)


def _run_guarded_task(*upstream_refs: Any, grid_guard: Any = None, **kwargs: Any) -> Any:
    """Runs in the Ray worker: apply the node's resource mode, then prefect-ray's task body
    under the worker's cached settings and open API client (task_context.py).

    ``grid_guard`` is (NodeSpec, GPUs needed, VRAM bytes needed or None): priority is lowered
    as the mode says, and a GPU task waits for the node's throttle and its VRAM cap before it
    starts (guard.py).
    """
    if grid_guard is not None:
        from grid_flows.runner.worker import guard_task

        node, need_gpu, need_vram = grid_guard
        guard_task(node, need_gpu, need_vram)
    context = kwargs.get("context") or {}
    if not context.get("settings_context"):
        return RayTaskRunner._run_prefect_task(*upstream_refs, **kwargs)
    # Prefect would rebuild the settings model and two clients for every task; enter the
    # worker's cached ones, and hydrated_context, finding no settings in the context, keeps them.
    with worker_context(context["settings_context"]):
        return RayTaskRunner._run_prefect_task(*upstream_refs, **{**kwargs, "context": {**context,
                                                                                         "settings_context": {}}})


def is_lost_with_node(error: Any) -> bool:
    """Errors that mean the task's node or placement group went away, not that the task failed."""
    import ray.exceptions as rex

    if isinstance(
        error,
        (rex.NodeDiedError, rex.LocalRayletDiedError, rex.WorkerCrashedError, rex.TaskPlacementGroupRemoved,
         rex.ObjectLostError),
    ):
        return True
    # A worker killed while its group is removed may die with SystemExit inside the task,
    # which then surfaces wrapped (e.g. in a pydantic serialization error). The cost of
    # also catching a task's own sys.exit() is one re-run.
    return isinstance(error, rex.RayTaskError) and "SystemExit" in str(error)


def _is_cancelled(error: Any) -> bool:
    import ray.exceptions as rex

    return isinstance(error, rex.TaskCancelledError)


def _cancel(refs: list) -> None:
    """Cancel tasks (not forced: one already running finishes or fails on its own)."""
    import ray

    for ref in refs:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=False)


def _with_worker_env(options: dict, task_env: dict) -> dict:
    """``options`` with the runner's worker environment merged in: a user's
    ``remote_options(runtime_env=...)`` keeps its keys and env vars, and adds the API URL."""
    ours = task_env.get("runtime_env")
    if not ours:
        return options
    theirs = options.get("runtime_env") or {}
    env_vars = {**ours.get("env_vars", {}), **(theirs.get("env_vars") or {})}
    return {**options, "runtime_env": {**ours, **theirs, "env_vars": env_vars}}


def _with_task_run_id(context: dict, task_run_id: UUID) -> dict:
    """A copy of a serialized task context that names another task run."""
    context = dict(context)
    if isinstance(context.get("asset_context"), dict):
        context["asset_context"] = {**context["asset_context"], "task_run_id": str(task_run_id)}
    return context


def _mark_crashed(store, task_run_id: UUID, message: str) -> None:
    from prefect.states import Crashed

    with contextlib.suppress(Exception):  # the run may not exist yet if the node died early
        store.client.set_task_run_state(task_run_id, Crashed(message=message), force=True)


def _futures_in(parameters: dict[str, Any]) -> list[GridFuture]:
    found: list[GridFuture] = []

    def collect(expr: Any) -> Any:
        if isinstance(expr, GridFuture):
            found.append(expr)
        return expr

    visit_collection(parameters, visit_fn=collect, return_data=False)
    return found

