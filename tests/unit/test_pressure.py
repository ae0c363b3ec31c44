"""Pressure scores, the bounded metrics history and trends, on injected samples and clock."""

from __future__ import annotations

import doctest
import itertools
import math
import random
from datetime import datetime, timedelta, timezone

import pytest

import grid_flows.core.pressure as pressure_module
from grid_flows.core.pressure import (
    MetricsHistory,
    NodeSample,
    PressureScores,
    Trend,
    pressure_of,
    trend,
    trends,
)

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
INPUTS = ("cpu_percent", "memory_percent", "swap_percent", "gpu_util_percent", "gpu_memory_percent")


def sample(cpu=0.0, memory=0.0, swap=0.0, gpu=None, gpu_memory=None, at=T0, node="n1", load=0.0) -> NodeSample:
    return NodeSample(node, at, cpu, memory, swap, load, gpu, gpu_memory)


# --- scores -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cpu, memory, swap, gpu, gpu_memory, expected",
    [
        pytest.param(0, 0, 0, None, None, (0, 0, 0, 0), id="idle-no-gpu"),
        pytest.param(50, 40, 0, None, None, (0.5, 0.4, 0, 0.45), id="no-gpu-renormalised"),
        pytest.param(100, 100, 0, None, None, (1, 1, 0, 1), id="no-gpu-saturated-looks-busy"),
        pytest.param(100, 100, 0, 0, 0, (1, 1, 0, 0.6), id="idle-gpu-keeps-its-weight"),
        pytest.param(50, 40, 0, 0, 0, (0.5, 0.4, 0, 0.27), id="gpu-idle"),
        pytest.param(100, 100, 0, 100, 100, (1, 1, 1, 1), id="all-saturated"),
        pytest.param(0, 0, 0, 100, 0, (0, 0, 1, 0.4), id="gpu-weight"),
        pytest.param(100, 0, 0, 0, 0, (1, 0, 0, 0.3), id="cpu-weight"),
        pytest.param(0, 100, 0, 0, 0, (0, 1, 0, 0.3), id="memory-weight"),
        pytest.param(20, 30, 0, 80, 10, (0.2, 0.3, 0.8, 0.47), id="gpu-util-wins"),
        pytest.param(20, 30, 0, 10, 90, (0.2, 0.3, 0.9, 0.51), id="gpu-memory-wins"),
        pytest.param(20, 30, 0, None, 70, (0.2, 0.3, 0.7, 0.43), id="only-gpu-memory-known"),
        pytest.param(0, 50, 50, None, None, (0, 0.6, 0, 0.3), id="swap-counts-a-fifth"),
        pytest.param(0, 0, 100, None, None, (0, 0.2, 0, 0.1), id="swap-alone"),
        pytest.param(0, 95, 100, None, None, (0, 1, 0, 0.5), id="swap-capped-at-one"),
    ],
)
def test_scores(cpu, memory, swap, gpu, gpu_memory, expected):
    scores = pressure_of(sample(cpu, memory, swap, gpu, gpu_memory))
    assert (scores.cpu, scores.memory, scores.gpu, scores.total) == pytest.approx(expected, abs=1e-9)


def test_load_does_not_change_the_score():
    assert pressure_of(sample(30, 30, load=64)) == pressure_of(sample(30, 30, load=0))


def _all_scores(s: NodeSample) -> tuple[float, ...]:
    p = pressure_of(s)
    return (p.cpu, p.memory, p.gpu, p.total)


def _assert_non_decreasing(series: list[tuple[float, ...]], context: str) -> None:
    for before, after in zip(series, series[1:]):
        for name, a, b in zip(("cpu", "memory", "gpu", "total"), before, after):
            assert b >= a, f"{name} score fell from {a} to {b} while raising {context}"
            assert 0 <= b <= 1


@pytest.mark.parametrize("field", INPUTS)
def test_every_score_is_monotonic_in_every_input_grid_sweep(field):
    sweep = [i * 2.5 for i in range(41)]
    base_choices = {name: [0.0, 37.5, 100.0] for name in INPUTS}
    base_choices["gpu_util_percent"] = [None, 0.0, 37.5, 100.0]
    base_choices["gpu_memory_percent"] = [None, 0.0, 37.5, 100.0]
    others = [name for name in INPUTS if name != field]
    for combo in itertools.product(*(base_choices[name] for name in others)):
        base = dict(zip(others, combo))
        series = [_all_scores(NodeSample("n1", T0, **{**base, field: value})) for value in sweep]
        _assert_non_decreasing(series, f"{field} with {base}")


def test_every_score_is_monotonic_on_random_increments():
    rng = random.Random(20250101)
    for _ in range(3000):
        base = {name: rng.uniform(0, 100) for name in INPUTS}
        if rng.random() < 0.3:
            base["gpu_util_percent"] = base["gpu_memory_percent"] = None
        field = rng.choice([f for f in INPUTS if base[f] is not None])
        raised = {**base, field: rng.uniform(base[field], 100)}
        _assert_non_decreasing(
            [_all_scores(NodeSample("n1", T0, **base)), _all_scores(NodeSample("n1", T0, **raised))],
            f"{field} from {base[field]} to {raised[field]}",
        )


# --- validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"cpu_percent": math.nan}, "cpu_percent"),
        ({"cpu_percent": math.inf}, "cpu_percent"),
        ({"cpu_percent": -1}, "cpu_percent"),
        ({"cpu_percent": 100.5}, "cpu_percent"),
        ({"memory_percent": -0.1}, "memory_percent"),
        ({"memory_percent": 101}, "memory_percent"),
        ({"swap_percent": math.nan}, "swap_percent"),
        ({"gpu_util_percent": 101}, "gpu_util_percent"),
        ({"gpu_util_percent": math.nan}, "gpu_util_percent"),
        ({"gpu_memory_percent": -math.inf}, "gpu_memory_percent"),
        ({"load_1m": -1}, "load_1m"),
        ({"load_1m": math.nan}, "load_1m"),
        ({"cpu_percent": "50"}, "cpu_percent"),
        ({"cpu_percent": None}, "cpu_percent"),
        ({"at": datetime(2025, 1, 1)}, "at"),
        ({"node": ""}, "node"),
    ],
)
def test_invalid_input_names_the_field(changes, field):
    fields = {"node": "n1", "at": T0, "cpu_percent": 10, "memory_percent": 10, "swap_percent": 0, **changes}
    with pytest.raises(ValueError, match=rf"^{field}: "):
        NodeSample(**fields)


def test_boundaries_are_accepted_and_time_is_normalised_to_utc():
    at = datetime(2025, 1, 1, 2, tzinfo=timezone(timedelta(hours=2)))
    s = NodeSample("n1", at, 100, 0, 100, load_1m=250, gpu_util_percent=0, gpu_memory_percent=100)
    assert s.at == T0 and s.at.tzinfo == timezone.utc
    assert (s.cpu_percent, s.load_1m) == (100.0, 250.0)


# --- trends -------------------------------------------------------------------------

NOW = T0 + timedelta(hours=2)


def line(slope_per_minute: float, value_now: float, minutes_back: float, every_seconds: float = 30):
    """Points on a known line ending at NOW."""
    count = int(minutes_back * 60 / every_seconds)
    return [
        (NOW - timedelta(seconds=i * every_seconds), value_now - slope_per_minute * i * every_seconds / 60)
        for i in range(count + 1)
    ]


@pytest.mark.parametrize(
    "points, window_minutes, slope, value_now, n_points",
    [
        pytest.param(line(0.1, 0.7, 5), 5, 0.1, 0.7, 11, id="rising-0.1-per-minute"),
        pytest.param(line(-0.02, 0.3, 15), 15, -0.02, 0.3, 31, id="falling"),
        pytest.param(line(0.0, 0.5, 5), 5, 0.0, 0.5, 11, id="flat"),
        pytest.param(line(0.1, 0.7, 5)[::-1], 5, 0.1, 0.7, 11, id="unsorted-input"),
        pytest.param(
            line(0.1, 0.7, 5) + [(NOW - timedelta(minutes=6), 99.0), (NOW - timedelta(hours=1), -99.0)],
            5, 0.1, 0.7, 11, id="points-before-window-ignored",
        ),
        pytest.param(line(0.1, 0.7, 5) + [(NOW + timedelta(minutes=1), 99.0)], 5, 0.1, 0.7, 11, id="future-ignored"),
        pytest.param(line(0.1, 0.7, 30), 5, 0.1, 0.7, 11, id="window-cuts-a-longer-line"),
        pytest.param([(NOW - timedelta(minutes=5), 0.2), (NOW, 0.7)], 5, 0.1, 0.7, 2, id="window-edge-included"),
        pytest.param([(NOW - timedelta(minutes=3), 0.4)], 5, 0.0, 0.4, 1, id="one-point"),
        pytest.param([(NOW, 0.2), (NOW, 0.6)], 5, 0.0, 0.4, 2, id="one-instant"),
        pytest.param([], 5, 0.0, None, 0, id="no-point"),
        pytest.param([(NOW - timedelta(minutes=10), 0.4)], 5, 0.0, None, 0, id="only-old-points"),
    ],
)
def test_trend(points, window_minutes, slope, value_now, n_points):
    result = trend(points, timedelta(minutes=window_minutes), NOW)
    assert result.slope_per_minute == pytest.approx(slope, abs=1e-9)
    assert result.n_points == n_points
    if value_now is None:
        assert result.value_now is None
    else:
        assert result.value_now == pytest.approx(value_now, abs=1e-9)


@pytest.mark.parametrize(
    "slope, value_now, minutes_ahead, expected",
    [(0.1, 0.7, 0, 0.7), (0.1, 0.7, 2, 0.9), (0.1, 0.7, 5, 1.2), (-0.05, 0.5, 4, 0.3), (0.0, 0.5, 60, 0.5)],
)
def test_prediction_follows_the_line(slope, value_now, minutes_ahead, expected):
    fitted = trend(line(slope, value_now, 5), timedelta(minutes=5), NOW)
    assert fitted.predict(minutes_ahead) == pytest.approx(expected)


def test_prediction_with_fewer_than_two_points():
    assert trend([(NOW, 0.4)], timedelta(minutes=5), NOW).predict(10) == 0.4
    assert trend([], timedelta(minutes=5), NOW).predict(10) is None
    assert Trend(0.0, None, 0, timedelta(minutes=5)).predict(1) is None


def fill(history: MetricsHistory, cpu_at_second, seconds: range, node: str = "n1") -> None:
    for second in seconds:
        history.add(sample(cpu=cpu_at_second(second), at=T0 + timedelta(seconds=second), node=node))


def test_trends_of_pressure_total_for_5_15_60_minutes():
    history = MetricsHistory()
    # cpu rises 1 percent a minute, so the total (0.5 * cpu, no GPU) rises 0.005 a minute.
    fill(history, lambda s: s / 60, range(0, 3600 + 1, 10))
    now = T0 + timedelta(hours=1)
    result = trends(history, "n1", now)
    assert sorted(result) == [5, 15, 60]
    for minutes, fitted in result.items():
        assert fitted.slope_per_minute == pytest.approx(0.005, rel=1e-6), minutes
        assert fitted.value_now == pytest.approx(0.3, abs=1e-6), minutes
        assert fitted.window == timedelta(minutes=minutes)
    assert result[5].n_points == 31  # full resolution: one point every 10 s
    assert 55 <= result[60].n_points <= 61  # one point a minute


def test_trend_windows_see_different_histories():
    history = MetricsHistory()
    # Flat at 20 % for 55 minutes, then up 10 % a minute.
    fill(history, lambda s: 20 if s <= 3300 else 20 + (s - 3300) / 6, range(0, 3600 + 1, 10))
    result = trends(history, "n1", T0 + timedelta(hours=1))
    assert result[5].slope_per_minute == pytest.approx(0.05, rel=1e-6)
    assert result[5].slope_per_minute > result[15].slope_per_minute > result[60].slope_per_minute > 0


def test_trends_of_unknown_node_are_empty():
    result = trends(MetricsHistory(), "nobody", NOW)
    assert all(t.n_points == 0 and t.predict(5) is None for t in result.values())


# --- history ------------------------------------------------------------------------


def test_two_hours_at_one_sample_a_second_stays_bounded_and_covers_an_hour():
    history = MetricsHistory()
    bound = 600 + 1 + 66  # ten minutes at full resolution + one-minute buckets of 65 minutes
    largest = 0
    for second in range(2 * 3600):
        history.add(sample(cpu=50, at=T0 + timedelta(seconds=second)))
        if second % 97 == 0:
            largest = max(largest, len(history.samples("n1")))
    points = history.samples("n1")
    newest = T0 + timedelta(seconds=2 * 3600 - 1)
    assert max(largest, len(points)) <= bound
    assert history.latest("n1").at == newest
    assert timedelta(minutes=60) <= newest - points[0].at <= timedelta(minutes=66)
    assert [p.at for p in points] == sorted(p.at for p in points)
    assert sum(1 for p in points if p.at >= newest - timedelta(minutes=10)) == 601  # full resolution kept
    assert all(p.cpu_percent == pytest.approx(50) for p in points)


def test_high_sample_rate_is_bounded_by_the_full_resolution_cap():
    history = MetricsHistory(max_full_resolution_samples=100)
    for tick in range(20 * 60 * 10):  # 10 samples a second for 20 minutes
        history.add(sample(cpu=10, at=T0 + timedelta(milliseconds=100 * tick)))
    points = history.samples("n1")
    assert len(points) <= 100 + 66
    assert T0 + timedelta(minutes=1) > points[0].at  # the oldest minute is averaged, not dropped


def test_old_samples_are_averaged_into_buckets():
    history = MetricsHistory()
    for second in range(60):  # minute 0: cpu alternates 0 / 100, a GPU only in half the samples
        gpu = 80.0 if second % 2 else None
        history.add(sample(cpu=100 * (second % 2), gpu=gpu, at=T0 + timedelta(seconds=second)))
    history.add(sample(cpu=0, at=T0 + timedelta(minutes=11)))
    first, last = history.samples("n1")
    assert first.at == T0 + timedelta(seconds=29.5)
    assert (first.cpu_percent, first.gpu_util_percent, first.gpu_memory_percent) == (50, 80, None)
    assert last.at == T0 + timedelta(minutes=11)


def test_late_samples_are_ordered_and_too_old_ones_ignored():
    history = MetricsHistory()
    for second in (10, 5, 20, 15):
        history.add(sample(cpu=second, at=T0 + timedelta(seconds=second)))
    assert [s.cpu_percent for s in history.samples("n1")] == [5, 10, 15, 20]
    assert history.latest("n1").cpu_percent == 20
    history.add(sample(at=T0 + timedelta(hours=2)))
    history.add(sample(cpu=99, at=T0 + timedelta(seconds=30)))
    assert all(s.at >= T0 + timedelta(minutes=55) for s in history.samples("n1"))


def test_nodes_are_kept_apart():
    history = MetricsHistory()
    history.add(sample(cpu=1, node="gpu2"))
    history.add(sample(cpu=2, node="gpu1"))
    assert history.nodes() == ["gpu1", "gpu2"]
    assert history.latest("gpu2").cpu_percent == 1
    assert history.latest("nobody") is None and history.samples("nobody") == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bucket": timedelta(0)},
        {"bucket": timedelta(minutes=20)},
        {"full_resolution": timedelta(hours=2)},
        {"max_full_resolution_samples": 0},
    ],
)
def test_history_rejects_inconsistent_settings(kwargs):
    with pytest.raises(ValueError):
        MetricsHistory(**kwargs)


# --- the module itself --------------------------------------------------------------


def test_docstring_examples_hold():
    result = doctest.testmod(pressure_module)
    assert result.attempted > 0 and result.failed == 0


def test_scores_are_plain_frozen_data():
    scores = pressure_of(sample(10, 10))
    assert isinstance(scores, PressureScores)
    with pytest.raises(AttributeError):
        scores.total = 1.0  # type: ignore[misc]
