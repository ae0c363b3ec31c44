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


_REMOTE_PROBE = None


def _remote_probe():
    """The probe as a Ray remote function, made once per process (each new one is exported anew)."""
    import ray

    global _REMOTE_PROBE
    if _REMOTE_PROBE is None:
        # num_cpus=0: runs even when every CPU of the node is reserved by boosts.
        _REMOTE_PROBE = ray.remote(num_cpus=0, max_retries=0)(probe_host)
    return _REMOTE_PROBE


class RayProbeSource:
    """Runs :func:`probe_host` on each node as a ``num_cpus=0`` Ray task pinned by label.

    Nodes Ray does not know, dead nodes, and nodes that do not answer within
    ``timeout_seconds`` (one deadline for the whole read) are reported unreachable.
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
        from grid_flows.adapters.ray.cluster import NODE_LABEL

        rc.connect(self.address)
        live = rc.grid_nodes()
        readings: dict[str, NodeReading] = {}
        pending: dict[Any, str] = {}
        remote = _remote_probe()
        for name in nodes:
            info = live.get(name)
            if info is None:
                readings[name] = unreachable(name, "not running (no Ray node with this grid.node label)")
            elif not info.alive:
                readings[name] = unreachable(name, "down (Ray marks the node dead)")
            else:
                ref = remote.options(label_selector={NODE_LABEL: name}).remote(self.cpu_interval_seconds)
                pending[ref] = name
        if pending:
            ready, not_ready = ray.wait(list(pending), num_returns=len(pending), timeout=self.timeout_seconds)
            for ref in ready:
                name = pending[ref]
                try:
                    data = ray.get(ref, timeout=self.timeout_seconds)
                except Exception as exc:  # the task failed on the node: report it, do not raise
                    readings[name] = unreachable(name, f"probe failed: {type(exc).__name__}: {exc}".splitlines()[0])
                    continue
                readings[name] = sample_from_probe(name, now, data)
            for ref in not_ready:
                readings[pending[ref]] = unreachable(
                    pending[ref], f"no answer within {self.timeout_seconds:g} s"
                )
                try:
                    ray.cancel(ref, force=True)
                except Exception:
                    pass
        return {name: readings[name] for name in nodes}
