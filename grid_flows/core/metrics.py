"""Node metrics as data: readings, sources for tests, a collector and its bounded history (pure).

A *source* reads one :class:`NodeReading` per node. The real one,
:class:`grid_flows.adapters.ray.metrics.RayProbeSource`, runs a Ray task with ``num_cpus=0`` pinned to each node by its
``grid.node`` label, so it runs even when every CPU of the node is reserved by boosts,
and reads CPU %, memory %, swap %, the 1-minute load average (psutil) and GPU
utilisation and memory (NVML through :class:`grid_flows.adapters.host.guard.NvmlProbe`; a node without
a GPU says "no GPU"). Every ``ray.get`` has a timeout: a node that does not answer in
time is reported unreachable, never raised.

On one machine every node sees the same host, so tests inject per-node numbers with
:class:`StaticSource` (fixed, changeable with ``set``) or :class:`ScriptedSource` (one
step per read).

:class:`MetricsCollector` adds every reachable reading to a bounded
:class:`grid_flows.core.pressure.MetricsHistory`. The history survives between flow runs in
a small Prefect block, ``GridMetricsHistory`` (through
:class:`grid_flows.adapters.prefect.metrics_store.BlockHistoryStore`) (document ``default`` unless told
otherwise), saved with ``Block.save(overwrite=True)``. It stays bounded: at most
``MAX_PERSISTED_PER_NODE`` points per node (the history's averaged older points plus the
newest full-resolution ones) are written, and nodes whose newest point is older than the
history's ``max_age`` are dropped.

Example:
    ```python
    from grid_flows.core.metrics import MetricsCollector
    from grid_flows.adapters.ray.metrics import RayProbeSource
    from grid_flows.adapters.prefect.metrics_store import BlockHistoryStore
    collector = MetricsCollector(RayProbeSource(timeout_seconds=5), BlockHistoryStore())
    collector.load()
    readings = collector.collect(["gpu-master", "gpu1", "gpu2"])
    collector.save()
    ```
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone  # noqa: F401  (used by the docstring examples)
from typing import Any, Mapping, Optional, Protocol, Sequence, runtime_checkable

from grid_flows.core.units import NO_VALUE
from grid_flows.core.models import utcnow
from grid_flows.errors import InvalidRequest
from grid_flows.core.pressure import MetricsHistory, NodeSample, Trend, pressure_of, trends

NO_GPU = "no GPU"
MAX_PERSISTED_PER_NODE = 240
_BLOCK_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


@dataclass(frozen=True)
class NodeReading:
    """What one read of one node gave: a sample, or why there is none.

    ``gpu`` is a person-readable GPU status ("no GPU", "1 NVIDIA GPU(s)", ...).
    """

    node: str
    sample: Optional[NodeSample]
    gpu: str = NO_GPU
    error: str = ""

    @property
    def reachable(self) -> bool:
        return self.sample is not None


def unreachable(node: str, why: str) -> NodeReading:
    return NodeReading(node, None, gpu="unknown", error=why)


@runtime_checkable
class MetricsSource(Protocol):
    """Reads the current metrics of the named nodes; one reading per name, never raises for a node."""

    def read(self, nodes: Sequence[str], now: datetime) -> dict[str, NodeReading]: ...


def sample_from_probe(node: str, at: datetime, data: Mapping[str, Any]) -> NodeReading:
    """Turn probe data into a reading; bad numbers make the node unreachable with the reason."""
    try:
        sample = NodeSample(
            node,
            at,
            cpu_percent=_clamp(data["cpu_percent"]),
            memory_percent=_clamp(data["memory_percent"]),
            swap_percent=_clamp(data["swap_percent"]),
            load_1m=float(data.get("load_1m") or 0.0),
            gpu_util_percent=_clamp(data.get("gpu_util_percent")),
            gpu_memory_percent=_clamp(data.get("gpu_memory_percent")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        return unreachable(node, f"probe returned unusable data: {exc}")
    return NodeReading(node, sample, gpu=str(data.get("gpu") or NO_GPU))


def _clamp(value: Any) -> Optional[float]:
    # psutil can report 100.1 % for a moment; a NaN stays NaN so NodeSample rejects it.
    if value is None:
        return None
    value = float(value)
    return value if math.isnan(value) else min(100.0, max(0.0, value))


# -- sources for tests and demos ----------------------------------------------------------


def _sample(node: str, at: datetime, values: Mapping[str, Any]) -> NodeSample:
    allowed = {"cpu_percent", "memory_percent", "swap_percent", "load_1m", "gpu_util_percent", "gpu_memory_percent"}
    unknown = set(values) - allowed
    if unknown:
        raise InvalidRequest(f"metrics for {node}: unknown field(s) {', '.join(sorted(unknown))}")
    return NodeSample(
        node,
        at,
        cpu_percent=values.get("cpu_percent", 0.0),
        memory_percent=values.get("memory_percent", 0.0),
        swap_percent=values.get("swap_percent", 0.0),
        load_1m=values.get("load_1m", 0.0),
        gpu_util_percent=values.get("gpu_util_percent"),
        gpu_memory_percent=values.get("gpu_memory_percent"),
    )


class StaticSource:
    """Fixed per-node metrics; ``set`` changes a node, ``drop`` makes it unreachable.

    Example:
        >>> source = StaticSource({"gpu1": {"cpu_percent": 10}})
        >>> source.set("gpu-master", cpu_percent=95)
        >>> at = datetime(2025, 1, 1, tzinfo=timezone.utc)
        >>> r = source.read(["gpu-master", "gpu1", "gpu2"], at)
        >>> r["gpu-master"].sample.cpu_percent, r["gpu2"].reachable
        (95.0, False)
    """

    def __init__(self, values: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.values: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (values or {}).items()}

    def set(self, node: str, **values: Any) -> None:
        self.values[node] = dict(values)

    def drop(self, node: str) -> None:
        self.values.pop(node, None)

    def read(self, nodes: Sequence[str], now: datetime) -> dict[str, NodeReading]:
        result = {}
        for name in nodes:
            values = self.values.get(name)
            if values is None:
                result[name] = unreachable(name, "no metrics given for this node")
            else:
                result[name] = NodeReading(name, _sample(name, now, values),
                                           gpu="simulated GPU" if "gpu_util_percent" in values else NO_GPU)
        return result


class ScriptedSource:
    """One step per read: each step maps node -> metrics; the last step repeats."""

    def __init__(self, steps: Sequence[Mapping[str, Mapping[str, Any]]]) -> None:
        if not steps:
            raise InvalidRequest("ScriptedSource needs at least one step")
        self.steps = [dict(step) for step in steps]
        self.reads = 0

    def read(self, nodes: Sequence[str], now: datetime) -> dict[str, NodeReading]:
        step = self.steps[min(self.reads, len(self.steps) - 1)]
        self.reads += 1
        return StaticSource(step).read(nodes, now)


# -- the history, persisted --------------------------------------------------------------

_FIELDS = ("cpu_percent", "memory_percent", "swap_percent", "load_1m", "gpu_util_percent", "gpu_memory_percent")


def history_to_data(history: MetricsHistory, max_per_node: int = MAX_PERSISTED_PER_NODE) -> dict[str, list[list]]:
    """Compact JSON-ready rows ``[iso time, cpu, mem, swap, load, gpu util, gpu mem]``, newest kept."""
    if max_per_node < 1:
        raise ValueError(f"max_per_node: must be >= 1, got {max_per_node}")
    data = {}
    for node in history.nodes():
        rows = [
            [s.at.isoformat(), *(None if getattr(s, f) is None else round(getattr(s, f), 4) for f in _FIELDS)]
            for s in history.samples(node)[-max_per_node:]
        ]
        if rows:
            data[node] = rows
    return data


def history_from_data(data: Mapping[str, Sequence[Sequence[Any]]], history: MetricsHistory | None = None,
                      now: datetime | None = None) -> MetricsHistory:
    """Rebuild a history from :func:`history_to_data` output; malformed rows are skipped.

    With ``now``, nodes whose newest point is older than the history's ``max_age`` are left out.
    """
    history = history if history is not None else MetricsHistory()
    for node, rows in (data or {}).items():
        samples = []
        for row in rows or []:
            try:
                at = datetime.fromisoformat(str(row[0]))
                samples.append(NodeSample(node, at, **dict(zip(_FIELDS, row[1:]))))
            except (TypeError, ValueError, IndexError):
                continue
        if not samples:
            continue
        if now is not None and now - max(s.at for s in samples) > history.max_age:
            continue
        for sample in sorted(samples, key=lambda s: s.at):
            history.add(sample)
    return history


class HistoryStore(Protocol):
    def load(self) -> dict: ...

    def save(self, data: dict) -> None: ...


class MemoryHistoryStore:
    """Keeps the persisted form in memory (tests; one process)."""

    def __init__(self) -> None:
        self.data: dict = {}

    def load(self) -> dict:
        return dict(self.data)

    def save(self, data: dict) -> None:
        self.data = dict(data)


def check_history_name(name: str) -> str:
    if not isinstance(name, str) or not _BLOCK_NAME.match(name):
        raise InvalidRequest(
            f"history name: {name!r} must be 1-63 lowercase letters, digits or dashes, starting with a letter or digit"
        )
    return name


class MetricsCollector:
    """Reads a source and keeps a bounded history across calls (and, with a store, across runs)."""

    def __init__(self, source: MetricsSource, store: HistoryStore | None = None,
                 history: MetricsHistory | None = None) -> None:
        if not isinstance(source, MetricsSource):
            raise InvalidRequest(f"metrics source: {source!r} has no read(nodes, now) method")
        self.source = source
        self.store = store
        self.history = history if history is not None else MetricsHistory()
        self.last: dict[str, NodeReading] = {}

    def load(self, now: datetime | None = None) -> MetricsHistory:
        if self.store is not None:
            history_from_data(self.store.load(), self.history, now or utcnow())
        return self.history

    def save(self) -> None:
        if self.store is not None:
            self.store.save(history_to_data(self.history))

    def collect(self, nodes: Sequence[str], now: datetime | None = None) -> dict[str, NodeReading]:
        now = now or utcnow()
        readings = self.source.read(list(nodes), now)
        result = {}
        for name in nodes:
            reading = readings.get(name) or unreachable(name, "the source returned nothing for this node")
            if reading.sample is not None:
                self.history.add(reading.sample)
            result[name] = reading
        self.last = result
        return result


# -- views shared by the flows and the CLI ----------------------------------------------


def describe_trend(t: Trend) -> str:
    """``+0.050/min`` (rising), ``-0.010/min``, ``flat``, or ``—`` with fewer than two points."""
    if t.n_points < 2:
        return NO_VALUE
    if abs(t.slope_per_minute) < 0.0005:
        return "flat"
    return f"{t.slope_per_minute:+.3f}/min"


@dataclass
class NodePressure:
    node: str
    total: Optional[float] = None
    cpu: Optional[float] = None
    memory: Optional[float] = None
    gpu: Optional[float] = None
    trends: dict[int, str] = field(default_factory=dict)
    at: Optional[datetime] = None


def node_pressure(history: MetricsHistory, node: str, now: datetime | None = None) -> NodePressure:
    latest = history.latest(node)
    if latest is None:
        return NodePressure(node, trends={m: NO_VALUE for m in (5, 15, 60)})
    scores = pressure_of(latest)
    now = now or latest.at
    return NodePressure(
        node,
        total=scores.total,
        cpu=scores.cpu,
        memory=scores.memory,
        gpu=scores.gpu if latest.has_gpu else None,
        trends={m: describe_trend(t) for m, t in trends(history, node, max(now, latest.at)).items()},
        at=latest.at,
    )


__all__ = [
    "NO_GPU",
    "MemoryHistoryStore",
    "MetricsCollector",
    "MetricsSource",
    "NodeReading",
    "ScriptedSource",
    "StaticSource",
    "history_from_data",
    "history_to_data",
    "node_pressure",
]
