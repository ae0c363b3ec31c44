"""Rebalance and cluster status as Prefect flows.

``grid-rebalance`` samples every node (a ``num_cpus=0`` probe per node, see
:mod:`grid_flows.adapters.ray.metrics`), adds the samples to the persisted metrics history, asks
:func:`grid_flows.core.policy.decide` what to do, and carries the decisions out through
:mod:`grid_flows.control.boosts`, the one code path for boost changes:

- ``grant``: ``boosts.request(..., origin="rebalance")`` from the chosen lender;
- ``release``: ``boosts.release`` of a rebalance-made boost whose borrower calmed down;
- ``reclaim``: a busy lender gets its boost back: it ends as ``preempted`` and the event
  ``grid.lender.reclaimed`` is emitted.

Both end the record first, so runners that adopted the boost stop routing to it within a
second, and give its running tasks up to the cluster's ``grace_seconds`` before the group
is removed.

Every run publishes the table artifact ``grid-pressure`` (pressure and trends per node,
the decisions and their reasons) and the markdown artifact ``grid-rebalance``.
``grid-cluster-status`` publishes the table artifact ``grid-cluster``.

Tests inject metrics with :func:`set_metrics_source` (not a flow parameter: a source is
a Python object, and a deployment always uses the real probe).

Example:
    ```python
    from grid_flows.flows.rebalance import rebalance, cluster_status_snapshot
    rebalance()                      # one round; `grid maintenance serve` runs it every 30 s
    cluster_status_snapshot()
    ```
"""

from __future__ import annotations

import math
from typing import Any, Optional

from prefect import flow, get_run_logger
from prefect.states import Failed

from grid_flows.control import boosts
from grid_flows.adapters.ray import cluster as rc
from grid_flows.core.ledger import Event, held_by_borrower, held_by_lender
from grid_flows.adapters.ray.metrics import DEFAULT_PROBE_TIMEOUT_SECONDS, RayProbeSource
from grid_flows.adapters.prefect.metrics_store import BlockHistoryStore, load_history
from grid_flows.core.metrics import (
    MetricsCollector, MetricsSource, NodeReading, check_history_name, node_pressure,
)
from grid_flows.core.models import Boost, ClusterSpec, Resources, cluster_scoped, describe_size, utcnow
from grid_flows.errors import GridError, InvalidRequest
from grid_flows.core.policy import Decision, decide
from grid_flows.adapters.prefect.store import BoostStore
from grid_flows.core.units import NO_VALUE

# The default cluster's keys; another cluster's end in -<its name> (core.models.cluster_scoped).
PRESSURE_ARTIFACT_KEY = "grid-pressure"
SUMMARY_ARTIFACT_KEY = "grid-rebalance"
CLUSTER_ARTIFACT_KEY = "grid-cluster"
RECLAIMED_EVENT = "grid.lender.reclaimed"

_metrics_source: Optional[MetricsSource] = None


def set_metrics_source(source: Optional[MetricsSource]) -> None:
    """Make the flows read metrics from ``source`` (tests); ``None`` restores the Ray probe."""
    global _metrics_source
    if source is not None and not isinstance(source, MetricsSource):
        raise InvalidRequest(f"metrics source: {source!r} has no read(nodes, now) method")
    _metrics_source = source


def _check_parameters(idle_samples: Any, probe_timeout_seconds: Any, history: Any) -> None:
    if isinstance(idle_samples, bool) or not isinstance(idle_samples, int) or idle_samples < 1:
        raise InvalidRequest(f"idle_samples: must be a whole number >= 1, got {idle_samples!r}")
    if (
        isinstance(probe_timeout_seconds, bool)
        or not isinstance(probe_timeout_seconds, (int, float))
        or not math.isfinite(probe_timeout_seconds)
        or not 0 < probe_timeout_seconds <= 300
    ):
        raise InvalidRequest(
            f"probe_timeout_seconds: must be a number of seconds in (0, 300], got {probe_timeout_seconds!r}"
        )
    if history is not None:
        check_history_name(history)


@flow(name="grid-rebalance")
def rebalance(
    idle_samples: int = 3,
    probe_timeout_seconds: float = DEFAULT_PROBE_TIMEOUT_SECONDS,
    history: Optional[str] = None,
) -> dict[str, Any]:
    """Sample every node, then grant, release or reclaim boosts by pressure (one round).

    ``idle_samples``: how many calm samples in a row release a rebalance-made boost.
    ``probe_timeout_seconds``: how long a node may take to answer the probe.
    ``history``: the ``GridMetricsHistory`` block document that keeps the samples (default: named
    like the cluster).
    """
    _check_parameters(idle_samples, probe_timeout_seconds, history)
    logger = get_run_logger()
    with BoostStore() as store:
        spec = store.load_cluster()
        source = _metrics_source or RayProbeSource(timeout_seconds=probe_timeout_seconds)
        collector = MetricsCollector(source, BlockHistoryStore(history or spec.name))
        now = utcnow()
        collector.load(now)
        readings = collector.collect([n.name for n in spec.nodes], now)
        collector.save()
        for reading in readings.values():
            if not reading.reachable:
                logger.warning("%s is unreachable: %s", reading.node, reading.error)
        if not any(r.reachable for r in readings.values()):
            # Not "no rebalance needed": nothing was seen, so the run must not look like a calm one.
            _publish_pressure(spec, collector, readings, [], [], now)
            why = "; ".join(f"{r.node}: {r.error}" for r in readings.values())
            return Failed(message=f"could sample no node, so nothing was judged ({why})")
        live = store.list()
        decisions = decide(spec, collector.history, live, now, idle_samples=idle_samples)
        outcomes = [_carry_out(store, spec, d, live, logger) for d in decisions]
    _publish_pressure(spec, collector, readings, decisions, outcomes, now)
    return {
        "decisions": [
            {"action": d.action, "node": d.node, "boost_id": d.boost_id or o.get("boost_id"),
             "source": d.source, "reason": d.reason, "outcome": o["outcome"]}
            for d, o in zip(decisions, outcomes)
        ],
        "unreachable": sorted(n for n, r in readings.items() if not r.reachable),
    }


def _carry_out(store: BoostStore, spec: ClusterSpec, d: Decision, live: list[Boost], logger) -> dict[str, Any]:
    """Do one decision; a failure is reported in the outcome (and the log), not raised."""
    try:
        if d.action == "grant":
            r = d.resources or Resources()
            boost = boosts.request(
                d.node, cpu=r.cpu, gpu=r.gpu, memory=r.memory or None, source=d.source,
                priority=d.priority or "normal", origin="rebalance",
            )
            logger.info("Granted boost %s: %s -> %s, %s. %s", boost.id, boost.source, boost.target,
                        boost.resources.describe(), d.reason)
            return {"outcome": f"granted boost {boost.short_id}", "boost_id": boost.id}
        if d.action == "release":
            # Runners that adopted it stop routing at once; running tasks get the grace to finish.
            boost = boosts.release(d.boost_id, reason=f"rebalance: {d.reason}",
                                   drain_seconds=spec.resource_sharing.grace_seconds)
            logger.info("Released boost %s: %s", boost.id, d.reason)
            return {"outcome": f"{boost.state.value}", "boost_id": boost.id}
        if d.action == "reclaim":
            boost = _reclaim(store, spec, d)
            logger.info("Reclaimed boost %s for lender %s: %s", boost.id, d.node, d.reason)
            return {"outcome": f"{boost.state.value}", "boost_id": boost.id}
        logger.info("No rebalance needed: %s", d.reason)
        return {"outcome": "nothing to do"}
    except GridError as exc:
        logger.warning("Could not %s for %s: %s", d.action, d.node, exc)
        return {"outcome": f"failed: {exc}"}


def _reclaim(store: BoostStore, spec: ClusterSpec, d: Decision) -> Boost:
    """Give the lender its capacity back: the record ends first (runners stop routing to it), its
    running tasks get ``grace_seconds`` to finish, then the group goes."""
    rc.connect()
    ended = boosts.end_boost(d.boost_id, Event.preempt, f"reclaimed by lender {d.node}: {d.reason}",
                             drain_seconds=spec.resource_sharing.grace_seconds)
    store.emit(RECLAIMED_EVENT, ended, lender=d.node, reason=d.reason)
    return ended


# -- artifacts ------------------------------------------------------------------------


def _pct(value: Optional[float]) -> str:
    return NO_VALUE if value is None else f"{value:.0f} %"


def _score(value: Optional[float]) -> str:
    return NO_VALUE if value is None else f"{value:.2f}"


def _decision_text(d: Decision, outcome: dict[str, Any]) -> str:
    what = {
        "grant": f"grant {d.resources.describe() if d.resources else ''} from {d.source}",
        "release": f"release boost {(d.boost_id or '')[:8]} from {d.source}",
        "reclaim": f"reclaim boost {(d.boost_id or '')[:8]}",
    }.get(d.action, d.action)
    return f"{what} ({outcome['outcome']})"


def pressure_rows(spec: ClusterSpec, history, readings: dict[str, NodeReading], decisions: list[Decision],
                  outcomes: list[dict[str, Any]], now) -> list[dict[str, str]]:
    rows = []
    for node in spec.nodes:
        reading = readings.get(node.name)
        sample = reading.sample if reading else None
        p = node_pressure(history, node.name, now)
        mine = [(d, o) for d, o in zip(decisions, outcomes) if d.node == node.name and d.action != "none"]
        rows.append({
            "Node": node.name,
            "Role": node.role.value,
            "Reachable": "yes" if sample else f"no: {reading.error if reading else 'not sampled'}",
            "CPU": _pct(sample.cpu_percent if sample else None),
            "Memory": _pct(sample.memory_percent if sample else None),
            "Swap": _pct(sample.swap_percent if sample else None),
            "Load 1 min": f"{sample.load_1m:.2f}" if sample else NO_VALUE,
            "GPU": (f"{_pct(sample.gpu_util_percent)} util, {_pct(sample.gpu_memory_percent)} memory"
                    if sample and sample.has_gpu else (reading.gpu if reading and sample else NO_VALUE)),
            "Pressure (0-1)": _score(p.total) if sample else NO_VALUE,
            "Trend 5 min": p.trends.get(5, NO_VALUE),
            "Trend 15 min": p.trends.get(15, NO_VALUE),
            "Trend 60 min": p.trends.get(60, NO_VALUE),
            "Decision": "; ".join(_decision_text(d, o) for d, o in mine) or "none",
            "Reason": "; ".join(d.reason for d, _ in mine) or NO_VALUE,
        })
    return rows


def _publish_pressure(spec, collector, readings, decisions, outcomes, now) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    rows = pressure_rows(spec, collector.history, readings, decisions, outcomes, now)
    acted = [(d, o) for d, o in zip(decisions, outcomes) if d.action != "none"]
    sharing = spec.resource_sharing
    header = (f"Pressure at {now:%Y-%m-%d %H:%M:%S} UTC (0 = idle, 1 = saturated; trends in pressure per minute). "
              f"Policy {sharing.policy.value}, mode {sharing.mode.value}.")
    if not acted:
        header += " No rebalance decision: " + "; ".join(d.reason for d in decisions)
    create_table_artifact(table=rows, key=cluster_scoped(PRESSURE_ARTIFACT_KEY, spec.name), description=header)

    lines = [f"# Rebalance at {now:%Y-%m-%d %H:%M:%S} UTC", "",
             f"Policy **{sharing.policy.value}**, mode **{sharing.mode.value}**, "
             f"sharing {'enabled' if sharing.enabled else 'disabled'}.", ""]
    if acted:
        lines.append(f"{len(acted)} decision(s):")
        lines.append("")
        for d, o in acted:
            lines.append(f"- **{d.action}** {d.node}: {_decision_text(d, o)}. {d.reason}")
    else:
        lines.append("Nothing to do: " + "; ".join(d.reason for d in decisions) + ".")
    unreachable = [r for r in readings.values() if not r.reachable]
    if unreachable:
        lines += ["", "Unreachable: " + "; ".join(f"{r.node} ({r.error})" for r in unreachable) + "."]
    lines += ["", "| Node | Pressure | Trend 5 min |", "|---|---|---|"]
    lines += [f"| {r['Node']} | {r['Pressure (0-1)']} | {r['Trend 5 min']} |" for r in rows]
    create_markdown_artifact(markdown="\n".join(lines), key=cluster_scoped(SUMMARY_ARTIFACT_KEY, spec.name),
                             description="What the last rebalance round decided and why.")


# -- cluster status -----------------------------------------------------------------------


def cluster_status(spec: ClusterSpec, live_boosts: list[Boost], history, nodes: dict | None, now) -> list[dict[str, Any]]:
    """Plain per-node status: role, liveness, total, lendable, lent, free, pressure and trends.

    ``nodes`` is ``ray_cluster.grid_nodes()`` or None when Ray could not be asked.
    """
    result = []
    lent_by = held_by_lender(live_boosts, count_pending=True)  # a pending boost may hold its group already
    borrowed_by = held_by_borrower(live_boosts, count_pending=True)
    for node in spec.nodes:
        info = (nodes or {}).get(node.name)
        lent = lent_by.get(node.name, Resources())
        borrowed = borrowed_by.get(node.name, Resources())
        if nodes is None:
            status = "unknown (Ray not reachable)"
        elif info is None:
            status = "not running"
        else:
            status = "alive" if info.alive else "down"
        free = info.free if info is not None and info.alive else None
        p = node_pressure(history, node.name, now)
        result.append({
            "node": node.name,
            "role": node.role.value,
            "status": status,
            "total": node.size,
            "lendable": node.share,
            "lent": lent,
            "lendable_free": node.share.minus(lent),
            "borrowed": borrowed,
            "free": free,
            "pressure": p.total,
            "pressure_at": p.at,
            "trends": p.trends,
        })
    return result


def describe_resources(r: Optional[Resources]) -> str:
    return NO_VALUE if r is None else describe_size(r)


def status_rows(status: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [
        {
            "Node": s["node"],
            "Role": s["role"],
            "Status": s["status"],
            "Total": describe_resources(s["total"]),
            "Lendable": describe_resources(s["lendable"]) if not s["lendable"].is_zero() else NO_VALUE,
            "Lent": s["lent"].describe() if not s["lent"].is_zero() else NO_VALUE,
            "Borrowed": s["borrowed"].describe() if not s["borrowed"].is_zero() else NO_VALUE,
            "Free (unreserved)": describe_resources(s["free"]),
            "Pressure (0-1)": _score(s["pressure"]),
            "Trend 5/15/60 min": " / ".join(s["trends"].get(m, NO_VALUE) for m in (5, 15, 60)),
        }
        for s in status
    ]


@flow(name="grid-cluster-status")
def cluster_status_snapshot(history: Optional[str] = None) -> list[dict[str, str]]:
    """Publish the ``grid-cluster`` table: every node's role, liveness, capacity, lending and pressure.

    ``history``: the ``GridMetricsHistory`` block document with the pressure samples (default:
    named like the cluster).
    """
    from prefect.artifacts import create_table_artifact

    if history is not None:
        check_history_name(history)
    now = utcnow()
    with BoostStore() as store:
        spec = store.load_cluster()
        live = store.list()
    try:
        rc.connect()
        nodes = rc.grid_nodes()
    except GridError as exc:
        get_run_logger().warning("Ray is not reachable: %s", exc)
        nodes = None
    rows = status_rows(cluster_status(spec, live, load_history(history, now), nodes, now))
    create_table_artifact(
        table=rows,
        key=cluster_scoped(CLUSTER_ARTIFACT_KEY, spec.name),
        description=f"Grid nodes of cluster {spec.name} at {now:%Y-%m-%d %H:%M:%S} UTC. Lent = held by live boosts "
        "(boosted tasks run on the lender). Pressure from the last rebalance sample.",
    )
    return rows
