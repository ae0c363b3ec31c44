"""Pressure scores, a bounded metrics history and trends of cluster nodes.

Pure: no Ray, no Prefect, no wall clock. Callers pass samples and ``now``.

Example:
    >>> from datetime import datetime, timedelta, timezone
    >>> t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
    >>> sample = NodeSample("gpu1", t0, cpu_percent=50, memory_percent=40, swap_percent=0)
    >>> pressure_of(sample).total  # no GPU: 0.5 * cpu + 0.5 * memory
    0.45
    >>> history = MetricsHistory()
    >>> for minute in range(5):
    ...     history.add(NodeSample("gpu1", t0 + timedelta(minutes=minute), 10.0 * minute, 0, 0))
    >>> round(trends(history, "gpu1", t0 + timedelta(minutes=4))[5].slope_per_minute, 3)
    0.05
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from typing import Optional, Sequence

CPU_WEIGHT, MEMORY_WEIGHT, GPU_WEIGHT = 0.3, 0.3, 0.4
SWAP_WEIGHT = 0.2
TREND_WINDOWS_MINUTES = (5, 15, 60)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_PERCENT_FIELDS = ("cpu_percent", "memory_percent", "swap_percent", "gpu_util_percent", "gpu_memory_percent")


def _check_number(name: str, value: object, upper: float | None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (upper is not None and value > upper):
        bound = f"between 0 and {upper:g}" if upper is not None else "finite and >= 0"
        raise ValueError(f"{name}: must be {bound}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class NodeSample:
    """One snapshot of a node. Percentages are 0-100; a GPU field of None means no GPU.

    Invalid input raises ValueError naming the field. Over-100 percentages are rejected,
    not clamped: they only come from a broken probe, which should be seen.

    Example:
        >>> at = datetime(2025, 1, 1, tzinfo=timezone.utc)
        >>> NodeSample("gpu1", at, 20, 30, 0, gpu_util_percent=90).has_gpu
        True
        >>> NodeSample("gpu1", at, 20, float("nan"), 0)
        Traceback (most recent call last):
        ...
        ValueError: memory_percent: must be between 0 and 100, got nan
    """

    node: str
    at: datetime
    cpu_percent: float
    memory_percent: float
    swap_percent: float
    load_1m: float = 0.0
    gpu_util_percent: Optional[float] = None
    gpu_memory_percent: Optional[float] = None

    def __post_init__(self) -> None:
        if not isinstance(self.node, str) or not self.node:
            raise ValueError(f"node: must be a non-empty name, got {self.node!r}")
        if not isinstance(self.at, datetime) or self.at.utcoffset() is None:
            raise ValueError(f"at: must be a timezone-aware datetime, got {self.at!r}")
        object.__setattr__(self, "at", self.at.astimezone(timezone.utc))
        for name in _PERCENT_FIELDS:
            value = getattr(self, name)
            if value is not None or not name.startswith("gpu"):
                object.__setattr__(self, name, _check_number(name, value, 100.0))
        object.__setattr__(self, "load_1m", _check_number("load_1m", self.load_1m, None))

    @property
    def has_gpu(self) -> bool:
        return self.gpu_util_percent is not None or self.gpu_memory_percent is not None


@dataclass(frozen=True)
class PressureScores:
    """Scores in [0, 1], each non-decreasing in every input of the sample.

    ``gpu`` is 0 on a node without a GPU, and ``total`` then renormalises the other
    weights to 0.5 * cpu + 0.5 * memory: with the GPU's 0.4 weight left in, a saturated
    CPU-only node would score 0.6 and never look busy.
    """

    cpu: float
    memory: float
    gpu: float
    total: float


def _unit(value: float) -> float:
    return min(1.0, max(0.0, value))


def pressure_of(sample: NodeSample) -> PressureScores:
    """Score a sample.

    cpu = cpu%/100; memory = memory%/100 + 0.2 * swap%/100 (swapping is pressure
    the memory figure alone hides), capped at 1; gpu = the larger of utilisation and
    GPU memory, /100, where a missing one of the two counts as 0.

    Example:
        >>> at = datetime(2025, 1, 1, tzinfo=timezone.utc)
        >>> pressure_of(NodeSample("h", at, 100, 50, 50, gpu_util_percent=100))
        PressureScores(cpu=1.0, memory=0.6, gpu=1.0, total=0.88)
    """
    cpu = _unit(sample.cpu_percent / 100)
    memory = _unit(sample.memory_percent / 100 + SWAP_WEIGHT * sample.swap_percent / 100)
    gpu = _unit(max(sample.gpu_util_percent or 0.0, sample.gpu_memory_percent or 0.0) / 100) if sample.has_gpu else 0.0
    return PressureScores(cpu, memory, gpu, weighted_total(cpu, memory, gpu, sample.has_gpu))


def weighted_total(cpu: float, memory: float, gpu: float, has_gpu: bool = True) -> float:
    """One number for a node's pressure (the one place the weights are applied).

    >>> weighted_total(1.0, 0.6, 1.0), weighted_total(1.0, 0.0, 0.0, has_gpu=False)
    (0.88, 0.5)
    """
    weighted = CPU_WEIGHT * cpu + MEMORY_WEIGHT * memory + GPU_WEIGHT * gpu if has_gpu else 0.5 * cpu + 0.5 * memory
    # Rounding to 12 places hides float noise (0.45, not 0.45000000000000007) and,
    # being monotonic itself, keeps the total monotonic.
    return _unit(round(weighted, 12))


_AVERAGED = tuple(f.name for f in fields(NodeSample) if f.name not in ("node", "at"))


class _Bucket:
    """Running sums of the samples of one node that fall into one time bucket."""

    __slots__ = ("start", "count", "seconds", "sums", "gpu_counts")

    def __init__(self, start: datetime) -> None:
        self.start = start
        self.count = 0
        self.seconds = 0.0  # sum of offsets from start: the bucket's point sits at the mean time
        self.sums = dict.fromkeys(_AVERAGED, 0.0)
        self.gpu_counts = dict.fromkeys(("gpu_util_percent", "gpu_memory_percent"), 0)

    def add(self, sample: NodeSample) -> None:
        self.count += 1
        self.seconds += (sample.at - self.start).total_seconds()
        for name in _AVERAGED:
            value = getattr(sample, name)
            if value is not None:
                self.sums[name] += value
                if name in self.gpu_counts:
                    self.gpu_counts[name] += 1

    def sample(self, node: str) -> NodeSample:
        def mean(name: str) -> Optional[float]:
            count = self.gpu_counts.get(name, self.count)
            return self.sums[name] / count if count else None

        return NodeSample(
            node,
            self.start + timedelta(seconds=self.seconds / self.count),
            **{name: mean(name) for name in _AVERAGED},
        )


class _NodeHistory:
    __slots__ = ("recent", "buckets", "newest")

    def __init__(self) -> None:
        self.recent: list[NodeSample] = []  # full resolution, sorted by time
        self.buckets: dict[int, _Bucket] = {}  # older samples, averaged per bucket index
        self.newest: Optional[datetime] = None


class MetricsHistory:
    """Per-node samples covering about an hour, in bounded memory at any sample rate.

    The last ``full_resolution`` (at most ``max_full_resolution_samples`` samples) is
    kept as is; older samples are averaged into ``bucket``-wide points instead of being
    dropped; points older than ``max_age`` before a node's newest sample are dropped.
    So a node holds at most ``max_full_resolution_samples + ceil(max_age / bucket) + 1``
    points.

    Example:
        >>> t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
        >>> history = MetricsHistory()
        >>> for second in range(0, 2 * 3600, 5):
        ...     history.add(NodeSample("gpu1", t0 + timedelta(seconds=second), 50, 50, 0))
        >>> len(history.samples("gpu1")) < 200, history.latest("gpu1").at - t0
        (True, datetime.timedelta(seconds=7195))
    """

    def __init__(
        self,
        *,
        full_resolution: timedelta = timedelta(minutes=10),
        bucket: timedelta = timedelta(minutes=1),
        max_age: timedelta = timedelta(minutes=65),
        max_full_resolution_samples: int = 1200,
    ) -> None:
        if not timedelta(0) < bucket <= full_resolution < max_age:
            raise ValueError("need 0 < bucket <= full_resolution < max_age")
        if max_full_resolution_samples < 1:
            raise ValueError("max_full_resolution_samples: must be >= 1")
        self.full_resolution = full_resolution
        self.bucket = bucket
        self.max_age = max_age
        self.max_full_resolution_samples = max_full_resolution_samples
        self._nodes: dict[str, _NodeHistory] = {}

    def add(self, sample: NodeSample) -> None:
        """Record a sample; late samples are placed in time order, too-old ones ignored."""
        history = self._nodes.setdefault(sample.node, _NodeHistory())
        if history.newest is None or sample.at > history.newest:
            history.newest = sample.at
        if sample.at < history.newest - self.max_age:
            return
        if history.recent and sample.at < history.recent[-1].at:
            history.recent.insert(bisect_right(history.recent, sample.at, key=_time), sample)
        else:
            history.recent.append(sample)
        self._compact(history)

    def _compact(self, history: _NodeHistory) -> None:
        full_since = history.newest - self.full_resolution
        keep_from = max(
            bisect_left(history.recent, full_since, key=_time),
            len(history.recent) - self.max_full_resolution_samples,
        )
        for old in history.recent[:keep_from]:
            key = (old.at - _EPOCH) // self.bucket
            bucket = history.buckets.get(key)
            if bucket is None:
                bucket = history.buckets[key] = _Bucket(_EPOCH + key * self.bucket)
            bucket.add(old)
        if keep_from:
            del history.recent[:keep_from]
        cutoff = history.newest - self.max_age
        for key in [k for k, b in history.buckets.items() if b.start + self.bucket <= cutoff]:
            del history.buckets[key]

    def samples(self, node: str) -> list[NodeSample]:
        """Oldest first: averaged bucket points, then full-resolution samples."""
        history = self._nodes.get(node)
        if history is None:
            return []
        averaged = [history.buckets[key].sample(node) for key in sorted(history.buckets)]
        return averaged + list(history.recent)

    def latest(self, node: str) -> Optional[NodeSample]:
        history = self._nodes.get(node)
        return history.recent[-1] if history and history.recent else None

    def nodes(self) -> list[str]:
        return sorted(self._nodes)


def _time(sample: NodeSample) -> datetime:
    return sample.at


@dataclass(frozen=True)
class Trend:
    """A least-squares line through the points of a window, anchored at ``now``.

    ``value_now`` is the line's value at ``now`` (the last value with fewer than two
    points, None with none); ``slope_per_minute`` is 0 with fewer than two points.

    Example:
        >>> now = datetime(2025, 1, 1, 0, 10, tzinfo=timezone.utc)
        >>> line = [(now - timedelta(minutes=m), 0.5 - 0.1 * m) for m in range(3)]
        >>> t = trend(line, timedelta(minutes=5), now)
        >>> round(t.slope_per_minute, 6), round(t.predict(2), 6), t.n_points
        (0.1, 0.7, 3)
    """

    slope_per_minute: float
    value_now: Optional[float]
    n_points: int
    window: timedelta

    def predict(self, minutes_ahead: float) -> Optional[float]:
        if self.value_now is None:
            return None
        return self.value_now + self.slope_per_minute * minutes_ahead


def trend(points: Sequence[tuple[datetime, float]], window: timedelta, now: datetime) -> Trend:
    """Fit the points with ``now - window <= time <= now``; time is measured in minutes."""
    inside = sorted((at, value) for at, value in points if now - window <= at <= now)
    if not inside:
        return Trend(0.0, None, 0, window)
    if len(inside) < 2:
        return Trend(0.0, inside[-1][1], 1, window)
    xs = [(at - now).total_seconds() / 60 for at, _ in inside]
    ys = [value for _, value in inside]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    # All points at one instant: no direction to fit, so the level is their mean.
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread if spread else 0.0
    return Trend(slope, mean_y - slope * mean_x, len(inside), window)


def pressure_points(history: MetricsHistory, node: str) -> list[tuple[datetime, float]]:
    """(time, pressure total) of every point the history holds for a node, oldest first."""
    return [(sample.at, pressure_of(sample).total) for sample in history.samples(node)]


def _per_bucket(points: list[tuple[datetime, float]], width: timedelta) -> list[tuple[datetime, float]]:
    groups: dict[int, list[tuple[datetime, float]]] = {}
    for at, value in points:
        groups.setdefault((at - _EPOCH) // width, []).append((at, value))
    averaged = []
    for key in sorted(groups):
        group = groups[key]
        start = group[0][0]
        offset = sum((at - start).total_seconds() for at, _ in group) / len(group)
        averaged.append((start + timedelta(seconds=offset), sum(v for _, v in group) / len(group)))
    return averaged


def trends(history: MetricsHistory, node: str, now: datetime) -> dict[int, Trend]:
    """Trends of the pressure total over the last 5, 15 and 60 minutes, keyed by minutes.

    A window longer than the full-resolution span is fitted on bucket averages only,
    so the dense recent samples do not outweigh the older, averaged ones.
    """
    points = pressure_points(history, node)
    coarse = _per_bucket(points, history.bucket)
    result = {}
    for minutes in TREND_WINDOWS_MINUTES:
        window = timedelta(minutes=minutes)
        result[minutes] = trend(points if window <= history.full_resolution else coarse, window, now)
    return result
