"""Metrics without Ray or Prefect: injected sources, the collector's history, persistence."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from grid_flows.core.metrics import (
    NO_GPU, MemoryHistoryStore, MetricsCollector, ScriptedSource, StaticSource, check_history_name,
    describe_trend, history_from_data, history_to_data, node_pressure, sample_from_probe,
)
from grid_flows.adapters.host.probe import probe_host
from grid_flows.errors import InvalidRequest
from grid_flows.core.units import NO_VALUE
from grid_flows.core.pressure import MetricsHistory, NodeSample, Trend

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
NODES = ["gpu-master", "gpu1", "gpu2"]


def test_static_source_gives_each_node_its_own_numbers_and_missing_nodes_are_unreachable():
    source = StaticSource({"gpu-master": {"cpu_percent": 95, "memory_percent": 40}, "gpu1": {"cpu_percent": 5}})
    readings = source.read(NODES, T0)
    assert readings["gpu-master"].sample.cpu_percent == 95
    assert readings["gpu1"].sample.cpu_percent == 5
    assert readings["gpu1"].gpu == NO_GPU
    assert not readings["gpu2"].reachable and "no metrics" in readings["gpu2"].error


def test_static_source_rejects_unknown_fields_and_bad_numbers():
    with pytest.raises(InvalidRequest, match="unknown field"):
        StaticSource({"gpu1": {"cpu": 5}}).read(["gpu1"], T0)
    with pytest.raises(ValueError, match="cpu_percent"):
        StaticSource({"gpu1": {"cpu_percent": 150}}).read(["gpu1"], T0)


def test_collector_keeps_history_across_calls_and_skips_unreachable_nodes():
    source = ScriptedSource([
        {"gpu-master": {"cpu_percent": 90}, "gpu1": {"cpu_percent": 10}},
        {"gpu-master": {"cpu_percent": 95}},  # gpu1 stops answering
    ])
    collector = MetricsCollector(source)
    collector.collect(NODES, T0)
    readings = collector.collect(NODES, T0 + timedelta(seconds=10))
    readings = collector.collect(NODES, T0 + timedelta(seconds=20))  # the last step repeats
    assert [s.cpu_percent for s in collector.history.samples("gpu-master")] == [90, 95, 95]
    assert len(collector.history.samples("gpu1")) == 1
    assert not readings["gpu1"].reachable
    assert collector.history.samples("gpu2") == []


def test_collector_refuses_something_that_is_not_a_source():
    with pytest.raises(InvalidRequest, match="read"):
        MetricsCollector(object())


def test_history_round_trip_through_json_keeps_samples_and_gpu_none():
    history = MetricsHistory()
    for i in range(5):
        history.add(NodeSample("gpu1", T0 + timedelta(seconds=10 * i), 10 * i, 20, 1, load_1m=0.5,
                               gpu_util_percent=30 if i % 2 else None))
    data = json.loads(json.dumps(history_to_data(history)))
    restored = history_from_data(data)
    assert restored.samples("gpu1") == history.samples("gpu1")


def test_persisted_history_is_bounded_and_old_nodes_are_dropped():
    history = MetricsHistory()
    for i in range(2000):
        history.add(NodeSample("gpu1", T0 + timedelta(seconds=i), 50, 50, 0))
    data = history_to_data(history, max_per_node=100)
    assert len(data["gpu1"]) == 100
    assert data["gpu1"][-1][0] == (T0 + timedelta(seconds=1999)).isoformat()
    assert history_from_data(data, now=T0 + timedelta(hours=3)).nodes() == []
    with pytest.raises(ValueError):
        history_to_data(history, max_per_node=0)


def test_malformed_persisted_rows_are_skipped():
    data = {"gpu1": [["not a time", 1, 2, 3, 0, None, None], [T0.isoformat(), 500, 2, 3, 0, None, None],
                     [T0.isoformat(), 10, 20, 0, 0, None, None]]}
    assert [s.cpu_percent for s in history_from_data(data).samples("gpu1")] == [10]


def test_collector_load_and_save_use_the_store():
    store = MemoryHistoryStore()
    first = MetricsCollector(StaticSource({"gpu1": {"cpu_percent": 85}}), store)
    first.load(T0)
    first.collect(["gpu1"], T0)
    first.save()
    second = MetricsCollector(StaticSource({"gpu1": {"cpu_percent": 90}}), store)
    second.load(T0 + timedelta(seconds=30))
    second.collect(["gpu1"], T0 + timedelta(seconds=30))
    assert [s.cpu_percent for s in second.history.samples("gpu1")] == [85, 90]


def test_node_pressure_and_trend_text():
    history = MetricsHistory()
    for minute in range(4):
        history.add(NodeSample("gpu1", T0 + timedelta(minutes=minute), 20 * minute, 0, 0))
    p = node_pressure(history, "gpu1")
    assert p.total == pytest.approx(0.3)
    assert p.trends[5] == "+0.100/min"
    assert node_pressure(history, "gpu2").total is None
    assert describe_trend(Trend(0.0, 0.5, 1, timedelta(minutes=5))) == NO_VALUE
    assert describe_trend(Trend(0.0, 0.5, 3, timedelta(minutes=5))) == "flat"


def test_history_names_are_checked():
    assert check_history_name("rebalance-test-1") == "rebalance-test-1"
    for bad in ("", "Upper", "has space", "x" * 64, 5):
        with pytest.raises(InvalidRequest, match="history name"):
            check_history_name(bad)


def test_probe_data_becomes_a_sample_and_broken_data_an_unreachable_node():
    good = sample_from_probe("gpu1", T0, {"cpu_percent": 100.3, "memory_percent": 50, "swap_percent": 0,
                                          "load_1m": 1.5, "gpu": NO_GPU})
    assert good.sample.cpu_percent == 100 and good.gpu == NO_GPU and not good.sample.has_gpu
    broken = sample_from_probe("gpu1", T0, {"cpu_percent": float("nan"), "memory_percent": 50, "swap_percent": 0})
    assert not broken.reachable and "unusable" in broken.error


def test_probe_host_reads_this_machine_without_a_gpu():
    data = probe_host(cpu_interval_seconds=0.05)
    reading = sample_from_probe("here", T0, data)
    assert reading.reachable
    assert data["gpu"].startswith(NO_GPU) or data["gpu_util_percent"] is not None


def test_probe_host_reads_the_gpu_probe_the_guard_uses(monkeypatch):
    """GRID_GPU_PROBE replaces NVML for the metrics probe as for the guard (one choice of probe)."""
    monkeypatch.setenv("GRID_GPU_PROBE", "tests.unit.test_guard:ProbeForEnv")  # one 10 GiB GPU, 3 GiB used, 5% busy
    data = probe_host(cpu_interval_seconds=0.01)
    assert (data["gpu_util_percent"], data["gpu_memory_percent"], data["gpu"]) == (5.0, 30.0, "fake for GRID_GPU_PROBE")
    monkeypatch.setenv("GRID_GPU_PROBE", "no_such_module:Probe")
    data = probe_host(cpu_interval_seconds=0.01)
    assert data["gpu_util_percent"] is None and "cannot be loaded" in data["gpu"]
