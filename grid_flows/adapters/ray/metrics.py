"""The real metrics source: :func:`~grid_flows.adapters.host.probe.probe_host` on every grid node.

Each read runs a Ray task with ``num_cpus=0`` pinned to each node by its ``grid.node``
label, so it runs even when every CPU of the node is reserved by boosts. Every
``ray.get`` has a timeout: a node that does not answer in time is reported unreachable,
never raised.

Example:
    ```python
    from grid_flows.adapters.ray.metrics import RayProbeSource
    from grid_flows.core.metrics import MetricsCollector

    readings = MetricsCollector(RayProbeSource(timeout_seconds=5)).collect(["gpu1", "gpu2"])
    ```
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Sequence

from grid_flows.adapters.host.probe import probe_host
from grid_flows.core.metrics import NodeReading, sample_from_probe, unreachable
from grid_flows.errors import InvalidRequest


DEFAULT_PROBE_TIMEOUT_SECONDS = 5.0
PROBE_ACTOR_PREFIX = "grid-probe-"


class _Prober:
    """The body of a node's probe actor: one warm process that reads the host when asked."""

    def probe(self, cpu_interval_seconds: float) -> dict[str, Any]:
        return probe_host(cpu_interval_seconds)


_actor_class: Any = None


def probe_actor(node: str):
    """The node's probe actor: named, detached, in the grid namespace, using no CPU, pinned
    by its ``grid.node`` label and restarted if it dies.

    Why an actor and not a task: each scheduled rebalance run is a new process, and its first
    task on a node needs a cold Ray worker (20-25 s on a loaded 2-core machine, more than the
    probe timeout). The actor outlives the run, so later runs find it warm (~ms a read)."""
    import ray

    from grid_flows.adapters.prefect.settings import RAY_NAMESPACE
    from grid_flows.adapters.ray.cluster import NODE_LABEL

    global _actor_class
    if _actor_class is None:
        _actor_class = ray.remote(_Prober)
    return _actor_class.options(
        name=f"{PROBE_ACTOR_PREFIX}{node}", namespace=RAY_NAMESPACE, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_restarts=-1, max_task_retries=0, label_selector={NODE_LABEL: node},
    ).remote()


class RayProbeSource:
    """Reads each node through its probe actor (:func:`probe_actor`).

    Nodes Ray does not know, dead nodes, and nodes that do not answer within
    ``timeout_seconds`` (one deadline for the whole read) are reported unreachable. A probe
    actor that is still starting answers a later read: it is not killed on a timeout.
    """

    def __init__(self, timeout_seconds: float = DEFAULT_PROBE_TIMEOUT_SECONDS, address: str | None = None,
                 cpu_interval_seconds: float = 0.2) -> None:
        if not (isinstance(timeout_seconds, (int, float)) and math.isfinite(timeout_seconds) and timeout_seconds > 0):
            raise InvalidRequest(f"probe timeout: must be a number of seconds > 0, got {timeout_seconds!r}")
        self.timeout_seconds = float(timeout_seconds)
        self.address = address
        self.cpu_interval_seconds = cpu_interval_seconds

    def read(self, nodes: Sequence[str], now: datetime) -> dict[str, NodeReading]:
        import ray

        from grid_flows.adapters.ray import cluster as rc

        rc.connect(self.address)
        live = rc.grid_nodes()
        readings: dict[str, NodeReading] = {}
        pending: dict[Any, str] = {}
        for name in nodes:
            info = live.get(name)
            if info is None:
                readings[name] = unreachable(name, "not running (no Ray node with this grid.node label)")
            elif not info.alive:
                readings[name] = unreachable(name, "down (Ray marks the node dead)")
            else:
                pending[probe_actor(name).probe.remote(self.cpu_interval_seconds)] = name
        if pending:
            ready, not_ready = ray.wait(list(pending), num_returns=len(pending), timeout=self.timeout_seconds)
            for ref in ready:
                name = pending[ref]
                try:
                    data = ray.get(ref, timeout=self.timeout_seconds)
                except Exception as exc:  # the actor failed or died on the node: report it, do not raise
                    readings[name] = unreachable(name, f"probe failed: {type(exc).__name__}: {exc}".splitlines()[0])
                    continue
                readings[name] = sample_from_probe(name, now, data)
            for ref in not_ready:
                readings[pending[ref]] = unreachable(
                    pending[ref], f"no answer within {self.timeout_seconds:g} s (its probe actor may still be "
                                  "starting: the next read finds it warm)"
                )
        return {name: readings[name] for name in nodes}
