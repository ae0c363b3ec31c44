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

Why one module of ~970 lines: it is the one TaskRunner class and the threads that serve it
(dispatch, completions, the controller watch), which share its lock and state. The decisions
are in ``core.dispatch`` and ``core.placement``, the placements report in
``core.placement_report``; futures and the worker side are in ``runner.future`` and
``runner.worker``.

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
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional
from uuid import UUID, uuid4

from prefect.context import FlowRunContext
from prefect.logging import get_run_logger
from prefect.states import exception_to_failed_state
from prefect.utilities.asyncutils import run_coro_as_sync
from prefect.task_runners import TaskRunner
from prefect.utilities.engine import collect_task_run_inputs_sync
from prefect_ray import RayTaskRunner
from prefect_ray.context import RemoteOptionsContext
from prefect_ray.task_runners import PrefectRayFuture

from grid_flows.adapters.prefect.settings import RAY_NAMESPACE, GridSettings, prefect_env_for_workers, ray_address
from grid_flows.adapters.prefect.task_context import serialize_task_context
from grid_flows.adapters.ray import cluster as rc
from grid_flows.core.dispatch import (
    UNLIMITED, BoostUse, Cancel, Dispatch, Dispatcher, Fail, Finish, Rerun, Say, Task,
)
from grid_flows.core.models import Boost, BoostState, Priority, Resources, SharingMode, utcnow
from grid_flows.core.placement import PlacementKind, Requirement, Strategy
from grid_flows.core.placement_report import Placed, PlacementReport
from grid_flows.runner.future import GridFuture, _futures_in, is_cancelled, is_lost_with_node
from grid_flows.runner.requirements import Need, current_need
from grid_flows.runner.worker import _run_guarded_task

logger = logging.getLogger("grid_flows.runner.task_runner")
_REFRESH_SECONDS = 1.0
WATCH_SECONDS = 1.0  # one long poll of the controller waits at most this long for a change
_PUBLISH_EVERY_SECONDS = 5.0  # the dispatcher republishes placements at most this often (each is a new version)
_REMOTE_ONLY_OPTIONS = frozenset({"max_calls"})  # ray.remote() takes them; .options() raises
_PREEMPTION_NOTICE = "it is being preempted by boost"  # why_unusable while a preemption is under way


@dataclass
class _Binding:
    """A boost this runner routes tasks into: its record and its group's handle. What its
    tasks hold of it, and whether it takes new ones, is the dispatcher's (core.dispatch.BoostUse)."""

    boost: Boost
    handle: Any
    ended_here: bool = False  # this runner already ended the boost (expiry)
    shared: bool = False  # granted to the target node by the rebalancer, adopted by this runner


@dataclass
class _Queued:
    """What the runner needs to submit a task the dispatcher placed."""

    future: GridFuture
    submit: Callable[[dict, UUID, dict, Any], Any]
    need: Need
    context: dict
    name: str
    ref: Any = None
    submitted_at: float = field(default_factory=time.monotonic)  # for the queue wait the report shows


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
        warm_up: start Ray workers on the target when the runner enters, and inside each boost
            when it is attached, so the first tasks do not wait for Python to start and import
            Prefect (``runner.warmup``). Default: on for ``@boosted`` flows, off otherwise.

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
        warm_up: Optional[bool] = None,
    ):
        if warm_up is not None and not isinstance(warm_up, bool):
            raise TypeError(f"warm_up: expected True, False or None, got {warm_up!r}")
        self.strategy = Strategy.parse(strategy)
        self.warm_up = warm_up
        self.target = target
        self.boost_ids = tuple(boost_ids)
        self.allow_offload = allow_offload
        init_kwargs = dict(init_kwargs or {})
        init_kwargs.setdefault("namespace", RAY_NAMESPACE)
        super().__init__(address=address, init_kwargs=init_kwargs)
        self._reset_runtime_state()

    def _reset_runtime_state(self) -> None:
        self._cond = threading.Condition(threading.RLock())
        self._seq = itertools.count()
        self._state: Optional[Dispatcher] = None  # the dispatch decisions (core.dispatch); set on __enter__
        self._items: dict[int, _Queued] = {}  # task key -> what submitting it takes
        # (task key, Ray object ref, result) of each finished task, for the completions thread.
        self._completed: queue.SimpleQueue = queue.SimpleQueue()
        self._completions: Optional[threading.Thread] = None
        self._bindings: dict[str, _Binding] = {}
        self._report = PlacementReport()  # one row per task run handed to Ray
        self._published_total = 0  # the task runs the placements artifact last showed
        self._published_at = 0.0  # monotonic time of that publication
        self._flow_run_id: Optional[UUID] = None
        self._dispatcher: Optional[threading.Thread] = None
        self._watcher: Optional[threading.Thread] = None
        self._records: Optional[dict[str, Boost]] = None  # bound boosts' records as the controller pushes them
        self._stopping = False
        self._in_worker = False
        self._remote_fn = None
        self._labelled = False
        self._task_env: dict = {}
        self._run_logger = None
        self._crashed_runs: list[tuple[UUID, str]] = []
        self._to_cancel: list = []  # refs of stranded tasks, cancelled by the dispatcher thread
        self._node_specs: dict = {}
        self._grace_seconds = 30.0
        self._spec = None
        self._sharing_mode = SharingMode.share_and_offload
        self._adopt_node_boosts = False
        self._busy_checked_at = float("-inf")
        self._warm_refs: list = []  # warm-up tasks started by this runner (runner.warmup)

    # -- prefect's TaskRunner contract -----------------------------------------------------

    def duplicate(self) -> "BoostRayTaskRunner":
        return type(self)(
            address=self.address,
            strategy=self.strategy,
            target=self.target,
            boost_ids=self.boost_ids,
            allow_offload=self.allow_offload,
            init_kwargs=self.init_kwargs,
            warm_up=self.warm_up,
        )

    def __reduce__(self):
        # Live queues, threads and locks never travel; a copy is rebuilt from its settings.
        return (
            _rebuild_runner,
            (type(self), self.address, self.strategy.value, self.target, self.boost_ids, self.allow_offload,
             self.init_kwargs, self.warm_up),
        )

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, BoostRayTaskRunner)
            and super().__eq__(other)
            and (self.strategy, self.target, self.boost_ids, self.allow_offload, self.warm_up)
            == (other.strategy, other.target, other.boost_ids, other.allow_offload, other.warm_up)
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
        try:
            self._start_driver()
        except BaseException:
            self._undo_enter()
            raise
        return self

    def _start_driver(self) -> None:
        """The driver's part of ``__enter__``, once Ray is connected."""
        import ray

        self._remote_fn = ray.remote(_run_guarded_task)
        self._remote_fns: dict[tuple, Any] = {}
        self._load_cluster()
        self._warm(self.target, self._state.budget.get(self.target, Resources()))
        self._start_watching()  # before the first boost is bound: no change to it can be missed
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
        self._completions = threading.Thread(target=contextvars.copy_context().run, args=(self._completion_loop,),
                                             name="grid-completions", daemon=True)
        self._completions.start()

    def _undo_enter(self) -> None:
        """An ``__enter__`` that failed half way leaves nothing behind: the controller watch, the
        holds on attached boosts, and the Ray connection the runner opened (a ``ray://`` client
        connection too); the boosts themselves stay the caller's."""
        with contextlib.suppress(Exception):
            with self._cond:
                self._stopping = True
                self._cond.notify_all()
            self._stop_watching()
        self._stop_completions()
        for binding in list(self._bindings.values()):
            if not binding.shared:
                self._hold(binding.boost.id, False)
        if getattr(self, "_owns_ray", False):
            with contextlib.suppress(Exception):
                rc.shutdown()
            self._owns_ray = False
        TaskRunner.__exit__(self, None, None, None)

    def __exit__(self, *exc_info: Any) -> None:
        if not self._in_worker and self._dispatcher is not None:
            wait = GridSettings().exit_wait_seconds
            if not self.drain(timeout=wait):
                self._give_up_waiting(wait)
            with self._cond:
                self._stopping = True
                self._cond.notify_all()
            self._dispatcher.join(timeout=5)
            self._stop_completions()
            self._stop_watching()
            self.publish_placements()
        if getattr(self, "_owns_ray", False):
            rc.collect_object_refs()  # prefect-ray's __exit__ shuts Ray down next
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
        # Only this runner's futures carry a key: one from elsewhere was resolved before it got here.
        upstream = [f for f in _futures_in(parameters) + list(wait_for or [])
                    if isinstance(f, GridFuture) and hasattr(f, "_grid_key")]

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
        key = next(self._seq)
        future._grid_key = key
        upstream_keys = tuple(getattr(f, "_grid_key", -1) for f in upstream)
        with self._cond:
            self._items[key] = _Queued(future, submit_to_ray, need, context, task.name)
            self._state.submit(Task((-priority.rank, key), key, Requirement(resources=need.resources(), node=need.node),
                                    upstream_keys, task.name))
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
            if self._records is not None:
                self._records[boost.id] = boost  # later changes come from the controller
            self._bindings[boost.id] = _Binding(boost=boost, handle=handle, shared=shared)
            self._state.attach(BoostUse(boost.id, boost.source, boost.resources, boost.expires_at, shared=shared))
            self._dispatch_ready()
            self._cond.notify_all()
        if shared:
            self._say(logging.INFO, f"Boost {boost.short_id} ({boost.resources.describe()} from {boost.source}) "
                                    f"was granted to {boost.target}; queued tasks may run in it while "
                                    f"{boost.target} is saturated")
        logger.info("Routing tasks into boost %s on %s (%s)", boost.short_id, boost.source, boost.resources.describe())
        if not shared:
            self._warm(boost.source, boost.resources, group=handle)
            self._hold(boost.id, True)

    def _warm(self, node: str, room: Resources, *, group: Any = None) -> None:
        """With ``warm_up``, start Ray workers where tasks will run: on ``node`` (the target), or
        inside ``group`` (a boost) on it. Warming is an optimisation: a failure is logged, not raised."""
        if not self.warm_up:
            return
        from grid_flows.adapters.prefect.task_context import settings_for_workers
        from grid_flows.core.warmup import warm_plan
        from grid_flows.runner.warmup import start_warm_up

        if room.cpu >= UNLIMITED.cpu:  # a plain Ray cluster's node: warm as many as it has CPUs
            import ray

            room = Resources(cpu=ray.available_resources().get("CPU", 1))
        plan = warm_plan(room)
        if not plan.workers:
            return
        kind = PlacementKind.boost if group is not None else PlacementKind.target
        try:
            options = rc.task_options(kind, plan.hold, node, group=group, labelled=self._labelled)
            refs = start_warm_up(self._remote_fn, plan.workers, _with_worker_env(options, self._task_env),
                                 settings_for_workers())
        except Exception as exc:
            logger.warning("could not warm workers on %s: %s", node, exc)
            return
        with self._cond:
            self._warm_refs.extend(refs)
        logger.debug("warming %d Ray workers on %s%s", plan.workers, node, " in a boost" if group is not None else "")

    def wait_for_warm_up(self, timeout: float) -> list[int]:
        """Wait for this runner's warm-up tasks; the process ids of the workers they left ready.
        For tests and benchmarks: a flow never needs to wait (its tasks queue behind them in Ray)."""
        import ray

        with self._cond:
            refs = list(self._warm_refs)
        return ray.get(refs, timeout=timeout)

    def _hold(self, boost_id: str, held: bool) -> None:
        """Tell the controller this flow routes tasks into the boost: at its deadline it gets
        the cluster's grace instead of ending at once (the runner ends it once idle)."""
        from grid_flows.control import boosts as boost_ops

        try:
            (boost_ops.hold if held else boost_ops.unhold)(boost_id)
        except Exception as exc:  # routing works without it; the boost just ends on time
            logger.warning("could not tell the boost controller about boost %s: %s", boost_id[:8], exc)

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

    def _refresh_pressure(self) -> None:
        """The nodes' pressure from the metrics history (the rebalance flow records it), at most
        once per monitoring interval: strategies that rank by pressure see it, and in
        ``dynamic_balancing`` a busy target sends work to lent capacity first. No history or
        stale samples read as calm."""
        sharing = self._spec.resource_sharing
        if time.monotonic() - self._busy_checked_at < sharing.monitoring_interval_seconds:
            return
        self._busy_checked_at = time.monotonic()
        from grid_flows.adapters.prefect.metrics_store import load_history
        from grid_flows.core.policy import busy_reason, placement_pressures

        now = utcnow()
        history = load_history(self._spec.name, now=now)
        pressures = placement_pressures(self._spec, history, now)
        busy = busy_reason(self._spec, history, self.target, now) \
            if self._sharing_mode is SharingMode.dynamic_balancing else ""
        with self._cond:
            self._state.set_pressures(pressures)
            changed, self._state.target_busy = busy != self._state.target_busy, busy
            self._cond.notify_all()
        if changed:
            self._say(logging.INFO, f"Target {self.target} is busy ({busy}): tasks move to lent capacity first"
                      if busy else f"Target {self.target} is no longer busy: tasks run there first again")

    def _rebind(self, binding: _Binding, record: Boost) -> None:
        """The boost holds its capacity in a new group (a preemption that could not complete
        gave it back): route into the new group, and again at all if only the notice stopped it."""
        with self._cond:
            binding.boost = record
            binding.handle = rc.group_handle(record.placement_group_id)
            self._state.resume_routing(record.id, expires_at=record.expires_at, only_if=_PREEMPTION_NOTICE)
            self._dispatch_ready()
            self._cond.notify_all()
        self._say(logging.INFO, f"Boost {record.short_id} was kept ({record.reason}); tasks go into it again")

    def stop_routing(self, boost_id: str, why: str, level: int = logging.WARNING) -> None:
        """No new task goes into the boost; tasks running in it continue."""
        with self._cond:
            self._carry_out(self._state.stop_routing(boost_id, why, level))

    def detach_boost(self, boost_id: str, timeout: float | None = None) -> bool:
        """Stop routing to the boost and wait until none of its tasks runs; True if they all ended."""
        self.stop_routing(boost_id, "being released", level=logging.INFO)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while (use := self._state.boosts.get(boost_id)) is not None and use.count:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(timeout=0.5 if remaining is None else min(0.5, remaining))
            binding = self._bindings.pop(boost_id, None)
            self._state.forget(boost_id)
        if binding is not None and not binding.shared:
            self._hold(boost_id, False)
        return True

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until no task is queued or running; True if that happened within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._state.idle:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                if self._state.queue and not (self._dispatcher and self._dispatcher.is_alive()):
                    self._fail_queued(RuntimeError("the grid-flows dispatcher thread is gone"), "could not start")
                    return False
                self._cond.wait(timeout=0.5 if remaining is None else min(0.5, remaining))
        return True

    def _give_up_waiting(self, waited: float) -> None:
        """At exit, after ``waited`` seconds: fail the tasks never started and leave the running
        ones to Ray (as RayTaskRunner does with tasks nobody waited on), naming both."""
        gone = TimeoutError(f"the flow run ended and the task runner stopped waiting after {waited:.0f} s "
                            f"(PREFECT_INTEGRATIONS_GRID_EXIT_WAIT_SECONDS)")
        with self._cond:
            running = sorted(self._items[k].name for k in self._state.in_flight if k in self._items)
            self._fail_queued(gone, "did not start")
        if running:
            self._say(logging.WARNING, f"the flow run ends with {len(running)} task(s) still running on Ray after "
                                       f"{waited:.0f} s: {', '.join(running[:10])}; nobody waited on them")

    def _fail_queued(self, exc: BaseException, what: str) -> None:
        """Resolve every queued task's future to Failed (nobody waits on them for ever). Under the lock."""
        for task in self._state.queue:
            self._state.finished.add(task.key)
            self._fail_undispatched(task.key, exc, what)
        self._state.queue = []

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
        budget: dict[str, Resources] = {}
        lenders = {n.name for n in spec.lenders()} if spec is not None else set()
        for name, info in nodes.items():
            if name == self.target:
                budget[name] = info.size
            elif name in lenders:
                budget[name] = info.lendable_free
        alive = {name: info.alive for name, info in nodes.items()}
        if self.target not in budget:
            # A plain Ray cluster without grid labels: behave like prefect-ray on this node.
            self.target = self.target or "local"
            budget[self.target], alive[self.target] = UNLIMITED, True
        self._state = Dispatcher(self.target, budget, alive, strategy=self.strategy,
                                 allow_offload=bool(self.allow_offload))

    def _dispatch_ready(self) -> None:
        """Dispatch every queued task that has room now. Call under the lock."""
        self._carry_out(self._state.dispatch_ready(utcnow()))

    def _carry_out(self, instructions: list) -> None:
        """Do what the dispatcher decided. Under the lock; Ray calls here only submit, never wait."""
        for instruction in instructions:
            if isinstance(instruction, Dispatch):
                self._submit(instruction)
            elif isinstance(instruction, Fail):
                self._fail_undispatched(instruction.key, instruction.error, instruction.what)
            elif isinstance(instruction, Finish):
                item = self._items.pop(instruction.key, None)
                if item is not None:
                    item.future._finished.set()
            elif isinstance(instruction, Rerun):
                self._rerun(instruction)
            elif isinstance(instruction, Cancel):
                self._to_cancel.extend(self._items[k].ref for k in instruction.keys if k in self._items)
            elif isinstance(instruction, Say):
                self._say(instruction.level, instruction.message)
        if instructions:
            self._cond.notify_all()

    def _submit(self, instruction: Dispatch) -> None:
        placement, need, item = instruction.placement, instruction.resources, self._items[instruction.key]
        node = placement.node or self.target
        group = self._bindings[placement.boost_id].handle if placement.kind is PlacementKind.boost else None
        # A task lost with its group or lender is re-placed by _task_done (Ray does not retry it).
        options = rc.task_options(placement.kind, need, placement.node, group=group, labelled=self._labelled)
        node_spec = self._node_specs.get(node)
        # The node's resource mode, and the VRAM need (None: unstated) its guard admits the task for.
        guard = (node_spec, need.gpu, item.need.vram) if node_spec is not None else None
        try:
            ref = item.submit(options, item.future.task_run_id, item.context, guard)
        except Exception as exc:  # e.g. options Ray refuses: this task fails, the others go on
            self._carry_out(self._state.dispatch_failed(instruction.key, exc))
            return
        item.ref = ref
        pressure = self._state.pressure.get(node)  # what this decision saw (None: no fresh sample)
        self._report.add(Placed(
            task=item.name, task_run=str(item.future.task_run_id)[:8], decision=placement.kind.value, node=node,
            boost=self._bindings[placement.boost_id].boost.short_id if group is not None else "",
            reason=placement.reason, queue_wait_seconds=time.monotonic() - item.submitted_at,
            pressure=pressure.score if pressure else None))
        logger.debug("%s -> %s on %s (%.2f): %s", item.name, placement.kind.value, node, placement.confidence,
                     placement.reason)
        item.future._set_ref(ref, placement)
        # Ray calls this on its own thread; over a ray:// connection that thread also delivers
        # object ids, which waiting for this runner's lock would stall: so it only hands over.
        ref._on_completed(lambda result, key=instruction.key, ref=ref: self._completed.put((key, ref, result)))

    def _fail_undispatched(self, key: int, exc: BaseException, what: str) -> None:
        """End a task that never reached Ray: its future resolves to a Failed state naming
        the error, the flow run's log says so, and tasks waiting on it may go on. Under the lock."""
        import ray

        item = self._items.pop(key)
        message = f"grid-flows {what} task {item.name} on Ray: {type(exc).__name__}: {exc}"
        state = run_coro_as_sync(exception_to_failed_state(exc, message=message))
        item.future._set_ref(ray.put(state), None)
        item.future._finished.set()
        self._say(logging.ERROR, message)
        self._cond.notify_all()

    def _completion_loop(self) -> None:
        while (done := self._completed.get()) is not None:
            try:
                self._task_done(*done)
            except Exception:  # one bad completion must not stop the others being seen
                logger.exception("grid-flows could not record a finished task")

    def _stop_completions(self) -> None:
        if self._completions is not None:
            self._completed.put(None)
            self._completions.join(timeout=5)

    def _task_done(self, key: int, ref: Any, result: Any = None) -> None:
        with self._cond:
            item = self._items.get(key)
            if item is None or item.ref is not ref:  # an earlier run of a task placed again since
                return
            self._carry_out(self._state.task_done(key, lost_with_node=is_lost_with_node(result),
                                                  cancelled=is_cancelled(result), error=type(result).__name__))
            self._cond.notify_all()  # the dispatcher thread submits what now fits

    def _rerun(self, instruction: Rerun) -> None:
        """A task lost with its node (or its boost's group) runs again, as a new task run. Under the lock."""
        item = self._items[instruction.key]
        old_run_id, new_run_id = item.future.task_run_id, uuid4()
        item.context = _with_task_run_id(item.context, new_run_id)
        item.future._task_run_id = new_run_id
        self._crashed_runs.append((old_run_id, f"lost with {instruction.node} ({instruction.error}); "
                                               f"re-run as {new_run_id}"))

    def _node_died(self, name: str) -> None:
        """``name`` is gone: place nothing there, and cancel (then re-place) the tasks sent
        there that have not reported. Under the lock; the dispatcher thread does the cancelling."""
        self._carry_out(self._state.node_died(name))

    def _cancel_stranded(self, binding: _Binding) -> None:
        """Tasks still waiting inside a removed or homeless group would wait forever: cancel
        them, and _task_done runs them again elsewhere."""
        with self._cond:
            self._carry_out(self._state.strand_boost(binding.boost.id))
            refs, self._to_cancel = self._to_cancel, []
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
        failed_at = float("-inf")  # the last refresh that raised: a due boost then waits for the regular one
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
                    idle = self._state.idle
                    # An expired boost nothing runs in any more is ended now, not at the next refresh:
                    # the flow may finish (and release it) within that second.
                    due = any((use := self._state.boosts.get(b.boost.id)) is not None and use.count == 0
                              and use.why_unusable == "expired" and not b.ended_here
                              for b in self._bindings.values())
                for run_id, message in crashed:
                    _mark_crashed(store, run_id, message)
                _cancel(to_cancel)
                if idle and time.monotonic() - self._published_at >= _PUBLISH_EVERY_SECONDS:
                    self.publish_placements()
                due = due and time.monotonic() - failed_at > _REFRESH_SECONDS  # no retry storm on a failing API
                if due or time.monotonic() - last_refresh > _REFRESH_SECONDS:
                    last_refresh = time.monotonic()
                    try:
                        self._refresh(store)
                    except Exception as exc:  # keep placing on the last known view
                        failed_at = time.monotonic()
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
                else:
                    self._state.node_up(name)
            bindings = [(b, self._state.boosts[b.boost.id]) for b in self._bindings.values()
                        if b.boost.id in self._state.boosts]
        if any(not use.usable for _, use in bindings):
            groups = rc.grid_groups()
            for binding, use in bindings:
                group = groups.get(binding.boost.placement_group)
                if not use.usable and use.count and (group is None or group.state != "CREATED"):
                    self._cancel_stranded(binding)
        now = utcnow()
        for binding, use in bindings:
            b = binding.boost
            if not alive.get(b.source, False) and not binding.ended_here:
                self.stop_routing(b.id, f"lender {b.source} is down")
                binding.ended_here = True
                boost_ops.end_boost(b.id, Event.node_lost, f"lender {b.source} is down")
                continue
            record = self._record_of(store, b.id)
            self._apply_record(binding, use, record, now)
        self._refresh_sharing(store)

    def _record_of(self, store, boost_id: str) -> Boost:
        """The bound boost's record: as the controller last pushed it, else read now."""
        with self._cond:
            pushed = None if self._records is None else self._records.get(boost_id)
        return pushed if pushed is not None else store.get(boost_id)

    def _apply_record(self, binding: _Binding, use, record: Boost, now) -> None:
        """Act on a bound boost's record: ended, under a preemption notice, kept in a new group,
        extended, or expired (then this runner ends it as soon as it is idle)."""
        from grid_flows.control import boosts as boost_ops
        from grid_flows.core.ledger import Event

        b = binding.boost
        if record.state.ended:
            if not binding.ended_here:
                self.stop_routing(b.id, f"it was {record.state.value} ({record.reason or 'no reason given'})",
                                  level=logging.INFO if binding.shared else logging.WARNING)
            if binding.shared and use.count == 0:
                with self._cond:  # the node's boost, not ours: forget it once nothing runs there
                    self._bindings.pop(b.id, None)
                    self._state.forget(b.id)
        elif record.preempted_by:
            self.stop_routing(b.id, f"{_PREEMPTION_NOTICE} {record.preempted_by[:8]}")
        elif record.placement_group_id != b.placement_group_id or \
                use.why_unusable.startswith(_PREEMPTION_NOTICE):  # kept, in a new group or its own
            self._rebind(binding, record)
        elif record.expires_at != b.expires_at:
            with self._cond:
                binding.boost = record
                self._state.resume_routing(b.id, expires_at=record.expires_at, now=now, only_if="expired")
            self._say(logging.INFO, f"Boost {b.short_id} now expires at {record.expires_at:%H:%M:%S} UTC")
        elif use.why_unusable == "expired" and not binding.ended_here:
            overdue = (now - b.expires_at).total_seconds()
            if use.count == 0 or overdue >= self._grace_seconds:
                binding.ended_here = True
                boost_ops.end_boost(b.id, Event.expire, "expired while a flow used it" if binding.shared
                                    else "expired while its flow ran")

    # -- pushed by the boost controller -------------------------------------------------------

    def _start_watching(self) -> None:
        """Follow the controller's changes (a long poll), so a preemption notice, a release
        elsewhere or an extension reaches this runner at once, not at its next refresh."""
        from grid_flows.control import client

        if not client.enabled():
            return  # each refresh reads the bound records instead
        try:
            import ray

            version = ray.get(client.controller().status.remote(), timeout=WATCH_SECONDS * 10)["version"]
        except Exception as exc:
            logger.warning("not following the boost controller (%s); reading the records each second", exc)
            return
        with self._cond:
            self._records = {}
        self._watch_token = uuid4().hex
        self._watcher = threading.Thread(target=contextvars.copy_context().run, args=(self._watch_loop, version),
                                         name="grid-watcher", daemon=True)
        self._watcher.start()

    def _stop_watching(self) -> None:
        """End the watch now (not at its next timeout): a Ray shutdown right after the flow must
        not find this thread waiting on the controller."""
        import ray

        from grid_flows.control import client

        if self._watcher is None:
            return
        with contextlib.suppress(Exception):
            ray.get(client.controller().stop_watch.remote(self._watch_token), timeout=WATCH_SECONDS * 10)
        self._watcher.join(timeout=WATCH_SECONDS * 10)

    def _watch_loop(self, version: int) -> None:
        import ray

        from grid_flows.control import client

        while not self._stopping:
            try:
                seen = ray.get(client.controller().watch.remote(version, WATCH_SECONDS, self._watch_token),
                               timeout=WATCH_SECONDS * 10)
            except BaseException as exc:  # the controller restarting: the refresh reads the records meanwhile
                if self._stopping or not ray.is_initialized() or isinstance(exc, (SystemExit, KeyboardInterrupt)):
                    return  # Ray is shutting down under us
                logger.info("boost controller watch: %s; trying again", exc)
                with self._cond:
                    self._records = {}
                    self._cond.wait(timeout=WATCH_SECONDS)
                continue
            version = seen["version"]
            now = utcnow()
            with self._cond:
                if not seen["complete"]:
                    self._records = {}  # too far behind: the refresh reads each bound record once
                if self._stopping:
                    return
                bound = {boost_id: (binding, self._state.boosts.get(boost_id))
                         for boost_id, binding in self._bindings.items()}
                for record in seen["boosts"]:
                    if record.id in bound:
                        self._records[record.id] = record
            for record in seen["boosts"]:
                binding, use = bound.get(record.id, (None, None))
                if binding is not None and use is not None:
                    try:
                        self._apply_record(binding, use, record, now)
                    except Exception as exc:
                        logger.warning("could not apply boost %s's change: %s", record.short_id, exc)

    def _refresh_sharing(self, store, at_start: bool = False) -> None:
        """The mode's extras, after the checks above; one failing does not stop the other."""
        with self._cond:
            waiting = bool(self._state.queue)
        if self._adopt_node_boosts and (waiting or at_start):  # only a saturated target can use them
            try:
                self._adopt_new_node_boosts(store.list())
            except Exception as exc:
                logger.warning("could not look for boosts granted to %s: %s", self.target, exc)
        if self._spec is not None:
            try:
                self._refresh_pressure()
            except Exception as exc:
                logger.warning("could not read the nodes' pressure from the metrics history: %s", exc)

    # -- what the UI shows -----------------------------------------------------------------

    def publish_placements(self) -> None:
        """Publish the placements artifact if it changed since last time. Called before the flow
        run's final state (``boost()`` when its block ends; the dispatcher when the runner goes
        idle), so whatever reacts to Completed finds it; ``__exit__`` publishes the rest."""
        with self._cond:
            if self._flow_run_id is None or self._report.total in (0, self._published_total):
                return
            self._published_total = self._report.total
            self._published_at = time.monotonic()
            rows, summary = self._report.rows(), self._report.summary(self.strategy.value)
        try:
            from grid_flows.adapters.prefect.store import PLACEMENTS_ARTIFACT_KEY, publish_run_table

            publish_run_table(PLACEMENTS_ARTIFACT_KEY, rows, summary, self._flow_run_id)
        except Exception as exc:
            logger.warning("could not publish the placements artifact: %s", exc)


def _rebuild_runner(cls, address, strategy, target, boost_ids, allow_offload, init_kwargs, warm_up=None):
    return cls(address=address, strategy=strategy, target=target, boost_ids=boost_ids,
               allow_offload=allow_offload, init_kwargs=init_kwargs, warm_up=warm_up)


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


