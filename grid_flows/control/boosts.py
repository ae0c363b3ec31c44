"""Boost operations: the one code path behind the Python API, the CLI and the flows.

Why one module of ~860 lines: request, activate, end and preempt share the ledger lock and
the crash-safe ordering of docs/architecture.md section 4; kept together, that ordering can
be read (and reviewed) in one place, with the few lines that send each operation to the
boost controller in front of it. The decisions themselves are in ``grid_flows.core``; the
controller and its client are ``control.controller`` and ``control.client``.

Each operation validates everything before it touches anything, so a rejected request
leaves no record and no placement group behind. Ray arbitrates capacity (a placement
group with lend tokens is placed atomically or not at all); Prefect keeps the record.

Example:
    ```python
    from grid_flows.control.boosts import request, release
    boost = request("gpu-master", cpu=2, duration="30m")
    release(boost.id)
    ```
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterable, Iterator

from grid_flows.core import ledger
from grid_flows import errors
from grid_flows.adapters.ray import cluster as rc
from grid_flows.adapters.ray.tokens import bundle
from grid_flows.core.ledger import Event
from grid_flows.core.models import (
    Boost, BoostState, ClusterSpec, NodeSpec, Priority, Resources, SharingMode, utcnow,
)
from grid_flows.errors import BoostsDisabled, ForeignBoost, GridError, InvalidRequest, NoCapacity, UnknownBoost
from grid_flows.adapters.prefect.settings import GridSettings
from grid_flows.adapters.prefect import store as store_module
from grid_flows.adapters.prefect.store import BoostStore
from grid_flows.core.units import format_duration, parse_duration

logger = logging.getLogger("grid_flows.control.boosts")
MIN_UNIT_AMOUNT = 0.001  # CPU or GPU
MIN_MEMORY_BYTES = 1024**2
_ATTEMPTS = uuid.UUID("6f1c1d52-6a55-4b0e-9a4e-3c1f0e2b7d10")  # namespace of a request's attempt ids

# -- where operations run ------------------------------------------------------------------
#
# The public operations below (request, release, extend, end_boost, expire_due, reconcile,
# hold, unhold) are sent to the cluster's boost controller (control.controller) through its
# client, unless the controller is switched off. Inside the controller's process they run
# here, on its in-memory store and its lock; elsewhere (controller off) on a BoostStore and
# the cluster-wide ledger lock, as every process did before the controller existed.

_controller = None  # set in the controller's own process


def _tell_controller(cluster: str) -> None:
    from grid_flows.control import client

    if _controller is None:
        client.tell_cluster_changed(cluster)


store_module.CLUSTER_SAVED_LISTENERS.append(_tell_controller)


def run_operations_here(controller) -> None:
    """Called by the controller when it starts: operations in this process run on its store."""
    global _controller
    _controller = controller


def _store() -> BoostStore:
    return _controller.store() if _controller is not None else BoostStore()


def _lock():
    return _controller.lock() if _controller is not None else rc.ledger_lock()


_HERE: contextvars.ContextVar[bool] = contextvars.ContextVar("grid_operations_here", default=False)


@contextlib.contextmanager
def operations_here() -> Iterator[None]:
    """Run operations in this process (the maintenance flows' backstop when the controller
    cannot be reached), on a BoostStore and the cluster-wide ledger lock."""
    token = _HERE.set(True)
    try:
        yield
    finally:
        _HERE.reset(token)


def _send() -> bool:
    """True when operations go to the controller: it is on and this process is not it."""
    from grid_flows.control import client

    return _controller is None and not _HERE.get() and client.enabled()


def _call(operation: str, *args, address: str | None = None, **kwargs):
    from grid_flows.control import client

    rc.connect(address)
    return client.call(operation, *args, **kwargs)


def parse_priority(value: str | Priority) -> Priority:
    try:
        return Priority(value.lower() if isinstance(value, str) else value)
    except (ValueError, AttributeError):
        choices = ", ".join(p.value for p in Priority)
        raise InvalidRequest(f"priority: unknown value {value!r}; expected one of {choices}") from None


def parse_request_resources(cpu: float | str = 0, gpu: float | str = 0, memory: str | int | None = None) -> Resources:
    try:
        resources = Resources.parse(cpu=_number(cpu, "cpu"), gpu=_number(gpu, "gpu"), memory=memory)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    if resources.is_zero():
        raise InvalidRequest("a boost must ask for some cpu, gpu or memory (all were zero)")
    # Lend tokens count thousandths of a CPU/GPU and whole MiB: a smaller amount cannot be held.
    for what, amount in (("cpu", resources.cpu), ("gpu", resources.gpu)):
        if 0 < amount < MIN_UNIT_AMOUNT:
            raise InvalidRequest(f"{what}: {amount:g} is below the smallest amount a boost can hold ({MIN_UNIT_AMOUNT:g})")
    if 0 < resources.memory < MIN_MEMORY_BYTES:
        raise InvalidRequest(f"memory: {resources.memory} bytes is below the smallest amount a boost can hold "
                             "(1 MiB); give a unit, e.g. '8GiB'")
    return resources


def _number(value: float | str, what: str) -> float:
    from grid_flows.core.units import parse_number

    try:
        return parse_number(value, what)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def _positive_duration(value: str | float) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    if seconds <= 0:
        raise InvalidRequest(f"duration must be greater than zero, got {value!r}")
    return seconds


def parse_boost_duration(value: str | float | None, spec: ClusterSpec) -> float:
    sharing = spec.resource_sharing
    if value is None:
        return sharing.default_boost_duration_seconds
    seconds = _positive_duration(value)
    if seconds > sharing.max_boost_duration_seconds:
        raise InvalidRequest(
            f"duration {format_duration(seconds)} is longer than the limit of "
            f"{format_duration(sharing.max_boost_duration_seconds)}"
        )
    return seconds


def why_no_boosts(spec: ClusterSpec) -> str:
    """The setting that stops the cluster granting boosts, or "" when it grants them."""
    sharing = spec.resource_sharing
    if not sharing.enabled:
        return "resource_sharing.enabled is false"
    if sharing.mode is SharingMode.offload_only:
        return "resource_sharing.mode is offload_only"
    return ""


def check_boosts_allowed(spec: ClusterSpec) -> None:
    """Raise BoostsDisabled (an InvalidRequest) when the cluster's sharing settings grant no boosts."""
    why = why_no_boosts(spec)
    if not why:
        return
    if not spec.resource_sharing.enabled:
        raise BoostsDisabled(f"{why} in the cluster: no node lends capacity, "
                             "so no boost can be granted (set it to true and run `grid blocks apply`)")
    raise BoostsDisabled(f"{why}: boosts are off, and tasks go to lenders "
                         "within their share instead; set the mode to share_and_offload or "
                         "dynamic_balancing to borrow capacity")


def request(
    target: str,
    *,
    cpu: float | str = 0,
    gpu: float | str = 0,
    memory: str | int | None = None,
    priority: str | Priority = Priority.normal,
    duration: str | float | None = None,
    source: str | None = None,
    address: str | None = None,
    origin: str = "api",
    requester: str | None = None,
    request_key: str | None = None,
) -> Boost:
    """Grant a boost or raise: InvalidRequest for bad input, NoCapacity when no node can lend.

    A request that fails, for any reason, leaves no record and no placement group behind.
    ``request_key`` makes a request safe to send again (its attempts have ids derived from
    it): a retry after the controller restarted returns the boost granted the first time."""
    if not isinstance(target, str) or not target.strip():
        raise InvalidRequest("target: a node name is required")
    if source is not None and not isinstance(source, str):
        raise InvalidRequest(f"source: a node name is required, got {source!r}")
    resources = parse_request_resources(cpu, gpu, memory)
    prio = parse_priority(priority)
    if _send():
        return _call("request", target, cpu=cpu, gpu=gpu, memory=memory, priority=prio, duration=duration,
                     source=source, origin=origin, requester=requester or requested_by(),
                     request_key=request_key or uuid.uuid4().hex, address=address)
    key = request_key or uuid.uuid4().hex
    requester = requester or requested_by()
    with _store() as store:
        spec = store.load_cluster()
        check_boosts_allowed(spec)
        seconds = parse_boost_duration(duration, spec)
        spec.node(target)
        if source is not None:
            lender = spec.node(source)
            if source == target:
                raise InvalidRequest(f"source and target are both '{source}': a node cannot lend to itself")
            _check_share(lender, resources)
        rc.connect(address)
        live = store.list()
        already = _granted_earlier(key, len(spec.nodes))
        if already is not None:
            return already
        # Elsewhere, whoever touches the ledger ends what is due; in the controller its timer does.
        gone = {b.id for b in expire_overdue(store, boosts=live)} if _controller is None else set()
        # The controller sees every claim in flight: counting them, it sends a request only to a
        # lender with room, instead of queueing a group Ray cannot place (which would hold up
        # every group created after it for the grant timeout).
        lent = ledger.held_by_lender((b for b in live if b.id not in gone), count_pending=_controller is not None)
        nodes = rc.grid_nodes()
        timeout = GridSettings().grant_timeout_seconds
        candidates = _candidates(spec, target, source, resources, nodes, lent)
        if not candidates and _controller is not None and _controller.resync(store, at_most_every=1.0):
            # Nothing fits by the records in memory: a process with the controller off may have
            # ended some. Read them again (at most once a second) before saying no.
            lent = ledger.held_by_lender(store.list(), count_pending=True)
            candidates = _candidates(spec, target, source, resources, nodes, lent)
        if not candidates:
            nodes, candidates = _await_ray_view(spec, target, source, resources, nodes, lent)
        for attempt, lender in enumerate(candidates):
            boost = ledger.new_boost(
                _attempt_id(key, attempt), source=lender, target=target, resources=resources, priority=prio,
                duration_seconds=seconds, now=utcnow(), origin=origin, requested_by=requester, cluster=spec.name,
                ray_session=rc.session_name(),
            )
            # Ray's lend tokens arbitrate only while they match the share; after an admin
            # lowered the share without restarting the node, the share is checked under the lock.
            share_check = spec.node(lender).share if _tokens_exceed_share(spec.node(lender), nodes.get(lender)) else None
            granted = _grant_on(store, boost, timeout, share_check)
            if granted is None:
                continue
            store.publish_boosts_table()
            store.emit("grid.boost.granted", granted)
            return granted
        if prio.rank > Priority.low.rank:
            granted = _preempt_and_grant(store, spec, target, source, resources, prio, seconds, origin,
                                         _attempt_id(key, len(spec.nodes)), requester)
            if granted is not None:
                return granted
    raise NoCapacity(_no_capacity_message(spec, target, source, resources, lent))


def _attempt_id(request_key: str, attempt: int) -> str:
    """The boost id of a request's ``attempt``-th try (one per lender, then preemption)."""
    return uuid.uuid5(_ATTEMPTS, f"{request_key}/{attempt}").hex


def _granted_earlier(request_key: str, lenders: int) -> Boost | None:
    """In the controller: the live boost a first sending of this request got (its answer was
    lost to a restart; the rebuild read the record back). Elsewhere a request is never resent."""
    if _controller is None:
        return None
    ids = [_attempt_id(request_key, attempt) for attempt in range(lenders + 1)]
    with _controller.memory.cond:
        found = [_controller.memory.live.get(boost_id) for boost_id in ids]
    return next((b for b in found if b is not None and b.state is BoostState.active), None)


def requested_by() -> str:
    """Who asks for a boost: the flow run when there is one, else user@host."""
    import getpass
    import socket

    try:
        from prefect.context import FlowRunContext

        run = FlowRunContext.get()
        if run is not None and run.flow_run is not None:
            return f"flow run {run.flow_run.name} ({run.flow_run.id})"
    except Exception:  # no Prefect context: fall through to the user
        pass
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def lend_token_mismatches(spec: ClusterSpec, nodes: dict[str, rc.NodeInfo]) -> list[str]:
    """One line per running node whose lend tokens differ from its definition, with the fix."""
    lines = []
    for node in spec.nodes:
        info = nodes.get(node.name)
        if info is None or not info.alive:
            continue
        running = info.lendable_total
        if running != node.share:
            head = "" if node.role.value == "head" else " --address HEAD_IP:6379"
            lines.append(
                f"{node.name} runs with lend tokens for {running.describe()} but its definition lends "
                f"{node.share.describe()}; boosts are held to the smaller. Restart its Ray node with "
                f"`ray start $(grid node ray-args {node.name}{head})` to apply the definition"
            )
    return lines


def _tokens_exceed_share(node: NodeSpec, info: rc.NodeInfo | None) -> bool:
    """True when the node runs with more lend tokens than its definition allows."""
    return info is not None and not info.lendable_total.fits_in(node.share)


def _grant_on(store: BoostStore, boost: Boost, timeout: float, share: Resources | None) -> Boost | None:
    """Claim (record), reserve (group), activate; None when the lender could not hold it.
    Whatever fails after the claim, the record and the group are removed again."""
    store.create(boost)
    group_id = None
    try:
        group_id = rc.create_boost_group(boost.placement_group, boost.source, boost.resources, timeout)
        if group_id is None:
            logger.info("boost on %s not placed within %.1f s; trying the next lender", boost.source, timeout)
            _abandon(store, boost, None)  # never held anything: leave no trace
            return None
        return _activate(store, boost, group_id, share)
    except _OverShare as exc:
        logger.info("%s; trying the next lender", exc)
        _abandon(store, boost, group_id)
        return None
    except BaseException:
        _abandon(store, boost, group_id)
        raise


class _OverShare(GridError):
    """Granting would lend past the lender's current share (checked under the lock)."""


def _abandon(store: BoostStore, boost: Boost, group_id: str | None) -> None:
    """Undo a claim that was not granted: remove its group (if any; found by name when its id
    is unknown) and its pending record."""
    try:
        _remove(boost.model_copy(update={"placement_group_id": group_id}))
    finally:
        store.delete(boost.id)


def _preempt_and_grant(
    store: BoostStore, spec: ClusterSpec, target: str, source: str | None, resources: Resources,
    prio: Priority, seconds: float, origin: str, boost_id: str, requester: str,
) -> Boost | None:
    """Take the capacity from strictly lower-priority boosts, gracefully; None if no plan exists."""

    from grid_flows.core.preemption import plan_preemption

    sharing = spec.resource_sharing
    nodes = rc.grid_nodes()
    lenders = {
        n.name: (n.share, nodes[n.name].lendable_free)
        for n in spec.lenders()
        if n.name in nodes and nodes[n.name].alive
    }
    live = [b for b in store.list() if b.state is BoostState.active and not b.preempted_by]
    plan = plan_preemption(resources, prio, target=target, lenders=lenders, active=live, now=utcnow(),
                           min_runtime_seconds=sharing.min_runtime_seconds, source=source)
    if plan is None or not plan.victims:
        return None
    boost = ledger.new_boost(boost_id, source=plan.lender, target=target, resources=resources,
                             priority=prio, duration_seconds=seconds, now=utcnow(), origin=origin,
                             requested_by=requester, cluster=spec.name, ray_session=rc.session_name())
    # Claim first: Ray queues this group ahead of any request made after it.
    store.create(boost)
    group = None
    victims: list[Boost] = []  # filled as each is noticed, so a failure restores exactly those
    try:
        group = rc.start_boost_group(boost.placement_group, plan.lender, resources)
        _notify_victims(store, plan.victims, boost, victims)
        logger.info("%s; waiting up to %g s for their tasks", plan.reason, sharing.grace_seconds)
        # Grace: tasks running in a victim get time to finish; their runners stop routing now.
        deadline = time.monotonic() + sharing.grace_seconds
        while time.monotonic() < deadline and not all(
            rc.group_idle(v.placement_group_id, bundle(v.resources)) for v in victims if v.placement_group_id
        ):
            time.sleep(0.1)  # polling Ray's view of the groups, bounded by the grace period
        for victim in victims:
            _remove(victim, wait=False)  # the new group, queued first, takes the capacity as it frees
        placed = group.wait(timeout_seconds=_preemption_wait_seconds())
    except BaseException:
        _give_up_preemption(store, boost, group, victims)
        raise
    if not placed:
        _give_up_preemption(store, boost, group, victims)
        return None
    reason = f"preempted by a {prio.value} boost {boost.short_id} for {target}"
    for victim in victims:
        end(store, victim.id, Event.preempt, reason, publish=False)  # before the grant: never both hold it
    try:
        granted = _activate(store, boost, group.id.hex())
    except BaseException:
        _abandon(store, boost, group.id.hex())
        raise
    store.publish_boosts_table()
    store.emit("grid.boost.granted", granted, preempted=",".join(v.id for v in victims))
    return granted


def _preemption_wait_seconds() -> float:
    """How long a group placed as capacity frees (a preemptor's, a restored victim's) may take."""
    return max(5.0, GridSettings().grant_timeout_seconds)


def _give_up_preemption(store: BoostStore, boost: Boost, group, victims: list[Boost]) -> None:
    """Both or neither: the request gets nothing and its victims hold their capacity again.
    Its record goes last: while it lives, reconcile leaves the victims' notices alone."""
    try:
        if group is not None:
            rc.remove_group(group.id.hex())
        if victims:
            _restore_victims(store, victims, boost)
    finally:
        _abandon(store, boost, group.id.hex() if group is not None else None)


def _notify_victims(store: BoostStore, victims: Iterable[Boost], preemptor: Boost, noticed: list[Boost]) -> None:
    """Put each victim still active and unclaimed under a preemption notice, appending it to
    ``noticed`` as soon as its record says so."""
    for victim in victims:
        with _lock():
            current = store.get(victim.id)
            if current.state is not BoostState.active or current.preempted_by:
                continue  # ended meanwhile (its capacity frees anyway), or another preemption has it
            current = ledger.transition(current, Event.notice, utcnow(), preempted_by=preemptor.id,
                                        reason=f"being preempted by a {preemptor.priority.value} boost "
                                               f"{preemptor.short_id} for {preemptor.target}")
            store.save(current)
        noticed.append(current)
    if noticed:
        store.publish_boosts_table()


def _restore_victims(store: BoostStore, victims: Iterable[Boost], preemptor: Boost) -> None:
    """The preemptor could not be placed: give each victim a group again and lift its notice;
    a victim whose capacity is gone meanwhile ends as preempted after all."""
    timeout = _preemption_wait_seconds()
    groups = rc.grid_groups()
    for victim in victims:
        kept = groups.get(victim.placement_group)
        if kept is not None and kept.group_id == victim.placement_group_id:
            group_id = kept.group_id  # given up before its group went: it keeps its own
        else:
            # Recreating a shape Ray has not freed yet costs ~1 s of its backoff: wait for it first.
            rc.wait_group_freed(victim.placement_group_id)
            group_id = rc.create_boost_group(victim.placement_group, victim.source, victim.resources, timeout)
        if group_id is None:
            end(store, victim.id, Event.preempt,
                f"preempted by boost {preemptor.short_id}, which could not be placed; its capacity was taken meanwhile")
            continue
        with _lock():
            current = store.get(victim.id)
            if current.state is BoostState.active and current.preempted_by in (preemptor.id, ""):
                if current.preempted_by:
                    store.save(ledger.transition(current, Event.restore, utcnow(), placement_group_id=group_id,
                                                 reason=f"kept: the preemption by {preemptor.short_id} could not complete"))
                elif current.placement_group_id != group_id:  # reconcile lifted the notice already
                    store.save(current.model_copy(update={"placement_group_id": group_id}))
                continue
        rc.remove_group(group_id)  # ended meanwhile: it needs no group
    store.publish_boosts_table()


def _activate(store: BoostStore, boost: Boost, group_id: str, share: Resources | None = None) -> Boost:
    """pending -> active under the lock; with ``share``, refuse (_OverShare) to lend past it."""
    with _lock():
        current = store.get(boost.id)
        if current.state is not BoostState.pending:  # reconcile gave up on it meanwhile
            raise GridError(f"boost {boost.id} was marked {current.state.value} while it was being granted")
        if share is not None:
            held = ledger.held_by_lender(store.list()).get(boost.source, Resources())
            if not (held + boost.resources).fits_in(share):
                raise _OverShare(f"{boost.source} already lends {held.describe()} of its share {share.describe()}")
        granted = ledger.transition(current, Event.grant, utcnow(), placement_group_id=group_id)
        store.save(granted)
    return granted


def _check_share(lender: NodeSpec, resources: Resources) -> None:
    if not lender.resource_sharing.can_share:
        raise NoCapacity(f"no node can lend {resources.describe()}: {lender.name} does not share (can_share is false)")
    missing = resources.shortfall(lender.share)
    if missing:
        raise NoCapacity(
            f"no node can lend {resources.describe()}: {lender.name} lends at most "
            f"{lender.share.describe()} (asked {'; '.join(missing)})"
        )


def _running_lenders(spec: ClusterSpec, target: str, source: str | None, nodes: dict[str, rc.NodeInfo],
                     lent: dict[str, Resources]):
    """(node, Ray's view of it, its unlent share by the records) of each running lender asked
    of: ``source``, or every lender but the target."""
    names = [source] if source else [n.name for n in spec.lenders() if n.name != target]
    for name in names:
        info = nodes.get(name)
        if info is not None and info.alive:
            node = spec.node(name)
            yield node, info, node.share.minus(lent.get(name, Resources()))  # the share, as defined now


def _candidates(spec: ClusterSpec, target: str, source: str | None, resources: Resources,
                nodes: dict[str, rc.NodeInfo], lent: dict[str, Resources]) -> list[str]:
    """Lenders that can hold the whole request now: most free lendable capacity, then node priority."""
    scored = []
    for node, info, unlent in _running_lenders(spec, target, source, nodes, lent):
        free = info.lendable_free
        if not resources.fits_in(unlent) or not resources.fits_in(free):
            continue
        size = node.share
        # Normalise by the share so CPU counts and bytes are comparable.
        headroom = sum(
            f / s for f, s in ((free.cpu, size.cpu), (free.gpu, size.gpu), (free.memory, size.memory)) if s
        )
        scored.append((-headroom, node.resource_sharing.priority, node.name))
    return [name for _, _, name in sorted(scored)]


RAY_VIEW_CATCHUP_SECONDS = 3.0  # a removed group's lend tokens reach Ray's view of its node a moment later


def _await_ray_view(spec: ClusterSpec, target: str, source: str | None, resources: Resources,
                    nodes: dict[str, rc.NodeInfo], lent: dict[str, Resources]) -> tuple[dict[str, rc.NodeInfo], list[str]]:
    """When the records leave a lender room that Ray does not show free yet (a group removed
    just now: Ray's view of the node catches up shortly after), read Ray again for a moment
    rather than refuse a request the cluster can hold. Lend tokens are held only by boost
    groups, so this wait is short and happens only on the refusal path."""
    deadline = time.monotonic() + RAY_VIEW_CATCHUP_SECONDS
    while _lagging_lenders(spec, target, source, resources, nodes, lent) and time.monotonic() < deadline:
        time.sleep(0.2)  # polling Ray's view of the node (a remote task over ray://), bounded by the deadline
        nodes = rc.grid_nodes()
        candidates = _candidates(spec, target, source, resources, nodes, lent)
        if candidates:
            return nodes, candidates
    return nodes, []


def _lagging_lenders(spec: ClusterSpec, target: str, source: str | None, resources: Resources,
                     nodes: dict[str, rc.NodeInfo], lent: dict[str, Resources]) -> list[str]:
    """Running lenders whose unlent share (by the records) holds the request while Ray's free
    lend tokens do not."""
    return [node.name for node, info, unlent in _running_lenders(spec, target, source, nodes, lent)
            if resources.fits_in(unlent) and resources.fits_in(info.lendable_total)
            and not resources.fits_in(info.lendable_free)]


def _no_capacity_message(spec: ClusterSpec, target: str, source: str | None, resources: Resources,
                         lent: dict[str, Resources]) -> str:
    live = rc.grid_nodes()
    reasons = []
    names = [source] if source else [n.name for n in spec.nodes if n.name != target]
    for name in names:
        node = spec.node(name)
        info = live.get(name)
        held = lent.get(name, Resources())
        if not node.resource_sharing.can_share or node.share.is_zero():
            reasons.append(f"{name} does not lend")
        elif info is None or not info.alive:
            reasons.append(f"{name} is not running")
        elif resources.shortfall(node.share):
            reasons.append(f"{name} lends at most {node.share.describe()}")
        elif resources.shortfall(node.share.minus(held)):
            reasons.append(f"{name} already lends {held.describe()} of its share {node.share.describe()}")
        elif resources.shortfall(info.lendable_free):
            reasons.append(f"{name} has too little free to lend: needs {'; '.join(resources.shortfall(info.lendable_free))}")
        else:  # freed after the request looked: a retry may get it
            reasons.append(f"{name} was fully lent when asked and has room again now; try again")
    return f"no node can lend {resources.describe()} to {target}: " + ("; ".join(reasons) or "no lenders")


def release(
    boost_id: str, *, address: str | None = None, reason: str = "released by request", drain_seconds: float = 0.0
) -> Boost:
    """End a boost and free its capacity. Releasing an ended boost returns it unchanged.

    ``drain_seconds``: give tasks still running in it up to that long to finish (runners
    stop routing to it within a second of the record ending) before the group goes."""
    if _send():
        return _call("release", boost_id, reason=reason, drain_seconds=drain_seconds, address=address)
    with _store() as store:
        boost = store.resolve(boost_id)
        rc.connect(address)
        return end(store, boost.id, Event.release, reason, address=address, drain_seconds=drain_seconds)


def end(
    store: BoostStore, boost_id: str, event: Event, reason: str, *, address: str | None = None,
    drain_seconds: float = 0.0, publish: bool = True,
) -> Boost:
    """Move a live boost to an ended state, then remove its group (record first: see below).

    With ``drain_seconds``, wait (at most that long) for the group to be idle in between.
    ``publish=False`` leaves the grid-boosts table to a caller that ends several at once."""
    with _lock():
        boost = store.get(boost_id)
        if boost.state.ended:
            return boost
        ended = ledger.transition(boost, event, utcnow(), reason=reason)
        store.save(ended)
    # The record says ended before the group goes: a crash in between leaves a group
    # without a live record, which reconcile removes; never a live record without a group.
    rc.connect(address)
    if drain_seconds > 0 and ended.placement_group_id:
        _drain(ended, drain_seconds)
    _remove(ended)
    if publish:
        store.publish_boosts_table()
    store.emit(f"grid.boost.{ended.state.value}", ended)
    return ended


def end_boost(boost_id: str, event: Event, reason: str, *, drain_seconds: float = 0.0) -> Boost:
    """End a live boost (a runner whose lender died, a lender reclaiming): ``end`` wherever
    operations run."""
    if _send():
        return _call("end_boost", boost_id, event, reason, drain_seconds=drain_seconds)
    with _store() as store:
        return end(store, boost_id, event, reason, drain_seconds=drain_seconds)


def expire_due() -> list[Boost]:
    """End every boost whose time is up, wherever operations run (the grid-expire flow)."""
    if _send():
        return _call("expire_due")
    rc.connect()
    with _store() as store:
        return expire_overdue(store)


def hold(boost_id: str) -> None:
    """A running flow routes tasks into this boost: at its deadline it gets the cluster's
    grace, while the runner lets its tasks finish (the runner ends it as soon as it is idle).
    Known only to the controller: with it off, the grid-expire flow ends it when overdue."""
    if _send():
        return _call("hold", boost_id)
    if _controller is not None:
        _controller.hold(boost_id, True)


def unhold(boost_id: str) -> None:
    if _send():
        return _call("unhold", boost_id)
    if _controller is not None:
        _controller.hold(boost_id, False)


def _drain(boost: Boost, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    # Polling Ray's view of the group, bounded by ``seconds``.
    while time.monotonic() < deadline and not rc.group_idle(boost.placement_group_id, bundle(boost.resources)):
        time.sleep(0.1)


def _remove(boost: Boost, wait: bool = True) -> None:
    """Remove the boost's group; with ``wait``, return once Ray shows the group gone (up to
    2 s). The node's lend tokens may show free a moment later; a request waits for that
    (``_await_ray_view``)."""
    group_id = boost.placement_group_id
    if group_id is None:
        group = rc.grid_groups().get(boost.placement_group)
        group_id = group.group_id if group else None
    if group_id:
        rc.remove_group(group_id)
        if wait:
            rc.wait_group_freed(group_id)


def expire_overdue(store: BoostStore, now: datetime | None = None, boosts: Iterable[Boost] | None = None) -> list[Boost]:
    """End every boost whose time is up (``ledger.due_to_end``): inside the controller a boost
    a running flow holds gets the cluster's grace; elsewhere nothing is known to be held."""
    now = now or utcnow()
    boosts = list(boosts if boosts is not None else store.list())
    held, grace = frozenset(), 0.0
    if _controller is not None:
        held, grace = _controller.held(), _controller.grace_seconds()
    return [end(store, boost.id, Event.expire, reason)
            for boost, reason in ledger.due_to_end(boosts, now, held=held, grace_seconds=grace)]


def list_boosts(target: str | None = None, include_ended: bool = False) -> list[Boost]:
    with BoostStore() as store:
        boosts = store.list(include_ended=include_ended)
    return [
        b
        for b in boosts
        if (include_ended or not b.state.ended) and (target is None or b.target == target)
    ]


def extend(boost_id: str, duration: str | float) -> Boost:
    """Add ``duration`` to an active boost, within the cluster's maximum boost length."""
    seconds = _positive_duration(duration)
    if _send():
        return _call("extend", boost_id, duration)
    with _store() as store:
        spec = store.load_cluster()
        limit = spec.resource_sharing.max_boost_duration_seconds
        boost = store.resolve(boost_id)
        rc.connect()
        with _lock():
            boost = store.get(boost.id)
            if boost.state is not BoostState.active:
                raise InvalidRequest(f"boost {boost.id} is {boost.state.value}; only an active boost can be extended")
            if boost.is_overdue(utcnow()):  # its lease ran out: ending it is due, not reviving it
                raise InvalidRequest(f"boost {boost.id} expired at {boost.expires_at:%Y-%m-%d %H:%M:%S} UTC; "
                                     "an overdue boost cannot be extended (request a new one)")
            total = (boost.expires_at - (boost.granted_at or boost.created_at)).total_seconds() + seconds
            if total > limit:
                raise InvalidRequest(
                    f"boost {boost.id} would last {format_duration(total)} in all, more than the limit of "
                    f"{format_duration(limit)}"
                )
            extended = ledger.transition(boost, Event.extend, utcnow(), extra_seconds=seconds,
                                         reason=f"extended by {format_duration(seconds)}")
            store.save(extended)
        store.publish_boosts_table()
        store.emit("grid.boost.extended", extended)
    return extended


@dataclass
class ReconcileReport:
    """What one reconcile pass changed; empty lists mean Ray and the record already agreed."""

    removed_groups: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)  # preemption notices lifted: their preemptor is gone
    pruned: list[str] = field(default_factory=list)  # ended records deleted by the retention rule

    @property
    def changed(self) -> bool:
        return bool(self.removed_groups or self.lost or self.failed or self.expired or self.restored)

    def lines(self) -> list[str]:
        out = [f"removed orphan placement group {g}" for g in self.removed_groups]
        out += [f"boost {b}: lost" for b in self.lost]
        out += [f"boost {b}: failed (stuck pending)" for b in self.failed]
        out += [f"boost {b}: expired" for b in self.expired]
        out += [f"boost {b}: kept (its preemption did not complete)" for b in self.restored]
        out = out or ["Ray and the boost records agree; nothing to do"]
        if self.pruned:
            out.append(f"deleted {len(self.pruned)} ended boost record(s) past the history retention")
        return out


def reconcile(*, pending_timeout_seconds: float = ledger.PENDING_TIMEOUT_SECONDS, address: str | None = None) -> ReconcileReport:
    """Make Ray and the records agree, and trim the history to the cluster's retention.

    Idempotent, and safe while requests run, because of the order of the reads. A request
    writes its pending record before it creates its group, and ends the record before it
    removes the group. So:

    * groups are read *before* the records: a group seen then had its record written
      earlier, so a group with no live record in the later read is an orphan;
    * groups are read again *after* the records: an active record seen then had its
      group placed earlier, so an active record whose group is missing from the second
      read has truly lost it.

    In the controller the claim is its in-memory record, put before the group is created,
    and one reconcile runs at a time.
    """
    _check_pending_timeout(pending_timeout_seconds)
    if _send():
        return _call("reconcile", pending_timeout_seconds=pending_timeout_seconds, address=address)
    if _controller is not None:
        with _controller.reconciling:
            return _reconcile(pending_timeout_seconds, address)
    return _reconcile(pending_timeout_seconds, address)


def _reconcile(pending_timeout_seconds: float, address: str | None) -> ReconcileReport:
    from grid_flows.core.reconcile import ActionKind, Snapshot, plan

    report = ReconcileReport()
    rc.connect(address)
    with _store() as store:
        if _controller is not None:
            _controller.resync(store)  # records written while it was off or before it started
        groups_before = {name: g.group_id for name, g in rc.grid_groups().items()}
        live = store.list()
        history = store.history()
        alive = {name: info.alive for name, info in rc.grid_nodes().items()}
        snapshot = Snapshot(groups_before=groups_before, live=live, ended_ids={b.id for b in history},
                            alive=alive, groups_after=set(rc.grid_groups()), now=utcnow(), session=rc.session_name())
        changed = {Event.node_lost: report.lost, Event.expire: report.expired, Event.fail: report.failed}
        for action in plan(snapshot, pending_timeout_seconds):
            if action.kind is ActionKind.drop_live_copy:
                store.delete(action.target)
            elif action.kind is ActionKind.remove_group and _still_orphan(store, action.target):
                rc.remove_group(action.group_id)
                report.removed_groups.append(action.target)
            elif action.kind is ActionKind.end:
                _end_if_still(store, action.target, action.event, action.reason, changed[action.event])
            elif action.kind is ActionKind.lift_notice:
                _lift_stale_notice(store, action.target, action.reason, report.restored)
        report.pruned = _prune_history(store, history)
    return report


def _check_pending_timeout(seconds: float) -> None:
    import math

    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        raise InvalidRequest(f"pending timeout must be a finite number of seconds >= 0, got {seconds!r}")


def _prune_history(store: BoostStore, history: list[Boost]) -> list[str]:
    """Apply the cluster's history retention (defaults when no cluster is configured)."""
    from grid_flows.core.models import ClusterSharing
    from grid_flows.errors import ClusterNotConfigured

    try:
        sharing = store.load_cluster().resource_sharing
    except ClusterNotConfigured:
        sharing = ClusterSharing()
    return store.prune_history(history, sharing.history_keep_count, sharing.history_keep_days * 86400)


def _still_orphan(store: BoostStore, group_name: str) -> bool:
    """Re-read the record a group is named after before removing it: a listing read while
    records change may have skipped a live one."""
    boost_id = ledger.boost_id_of(group_name)
    if boost_id is None:
        return True
    try:
        return store.get(boost_id).state.ended
    except ForeignBoost as exc:
        # Another cluster's record names this group: a machine of this Ray cluster is set to
        # another cluster name (or records from before names). Never remove it: say so.
        logger.warning("placement group %s is not this cluster's to judge: %s", group_name, exc)
        return False
    except UnknownBoost:
        return True


def _lift_stale_notice(store: BoostStore, boost_id: str, reason: str, changed: list[str]) -> None:
    """A preemption notice whose preemptor no longer lives (its requester died half way):
    the boost keeps its group and runners may route into it again. Re-checked under the lock."""
    with _lock():
        current = store.get(boost_id)
        if current.state is not BoostState.active or not current.preempted_by:
            return
        with contextlib.suppress(UnknownBoost):
            if not store.get(current.preempted_by).state.ended:
                return  # the preemption is still under way
        store.save(ledger.transition(current, Event.restore, utcnow(), reason=reason))
    changed.append(boost_id)


def _end_if_still(store: BoostStore, boost_id: str, event: Event, reason: str, changed: list[str]) -> None:
    """End the boost unless its record moved on since it was read (then the next pass decides)."""
    try:
        ended = end(store, boost_id, event, reason)
    except errors.IllegalTransition:
        return
    if ended.reason == reason:  # this pass ended it (not somebody else meanwhile)
        changed.append(boost_id)


def release_everything(reason: str) -> None:
    """Release every live boost and remove every grid placement group (tests, benchmarks)."""
    with BoostStore() as store:
        for boost in store.list():
            release(boost.id, reason=reason)
    for group in rc.grid_groups().values():
        rc.remove_group(group.group_id)
        rc.wait_group_freed(group.group_id)
