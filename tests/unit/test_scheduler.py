"""Unit tests of grid_flows.core.placement: pure placement, no Ray, no Prefect."""

from __future__ import annotations

import doctest
import random
from collections.abc import Mapping

import pytest

from grid_flows.core import placement as scheduler
from grid_flows.core.models import Resources
from grid_flows.core.placement import (
    BoostView, ClusterView, NodeView, Placement, PlacementKind, Pressure, Requirement, Strategy, confidence,
    place,
)
from grid_flows.core.offload_index import OffloadIndex

GIB = 1024**3
T, B, O, Q = PlacementKind.target, PlacementKind.boost, PlacementKind.offload, PlacementKind.queue


def R(cpu: float = 0, gpu: float = 0, mem_gib: float = 0) -> Resources:
    return Resources(cpu=cpu, gpu=gpu, memory=int(mem_gib * GIB))


def node(name, free=R(), lend=R(), p=(0.0, 0.0, 0.0), alive=True, in_flight=0) -> NodeView:
    return NodeView(name, alive=alive, free=free, lendable_free=lend, pressure=Pressure(*p), in_flight=in_flight)


def view(*nodes: NodeView, target: str = "head", allow_offload: bool = True) -> ClusterView:
    return ClusterView(target=target, nodes={n.name: n for n in nodes}, allow_offload=allow_offload)


def boost(id, source, free, usable=True, in_flight=0) -> BoostView:
    return BoostView(id=id, source=source, free=free, usable=usable, in_flight=in_flight)


def need(cpu: float = 0, gpu: float = 0, mem_gib: float = 0, node: str | None = None) -> Requirement:
    return Requirement(R(cpu, gpu, mem_gib), node=node)


# A small cluster most cases start from: head is the flow's node, gpu1 lends
# through a boost, gpu2 lends for offload.
HEAD_FULL = node("head", free=R(0))
HEAD_2 = node("head", free=R(2))
GPU1 = node("gpu1", lend=R(1))
GPU2 = node("gpu2", lend=R(4))
B1 = boost("b1aaaaaaaa", "gpu1", R(2))
B1_2 = boost("b1bbbbbbbb", "gpu1", R(2))


# --- strategies: (id, requirement, view, boosts, strategy, kind, node, boost id)
STRATEGY_CASES = [
    # local_first: target, then boosts in order, then offload by lowest pressure
    ("local_first target fits", need(1), view(HEAD_2, GPU1, GPU2), [B1], "local_first", T, "head", None),
    ("local_first exact fit", need(2), view(HEAD_2, GPU1, GPU2), [B1], "local_first", T, "head", None),
    ("local_first exact fit float", need(0.3), view(node("head", free=R(0.1 + 0.2))), [], "local_first", T, "head", None),
    ("local_first first boost in order", need(2), view(HEAD_FULL, GPU1, GPU2), [B1_2, B1], "local_first", B, "gpu1", "b1bbbbbbbb"),
    ("local_first boost beats offload", need(2), view(HEAD_FULL, GPU1, GPU2), [B1], "local_first", B, "gpu1", "b1aaaaaaaa"),
    ("local_first offload lowest pressure", need(3),
     view(HEAD_FULL, node("gpu1", lend=R(4), p=(0.5, 0.5, 0.5)), node("gpu2", lend=R(4), p=(0.1, 0.1, 0.1))),
     [B1], "local_first", O, "gpu2", None),
    # best_fit: smallest leftover in units of the request; ties target > boost > offload
    ("best_fit tightest boost", need(2), view(node("head", free=R(8)), GPU1, GPU2), [B1], "best_fit", B, "gpu1", "b1aaaaaaaa"),
    ("best_fit tightest offload", need(4), view(node("head", free=R(8)), GPU1, GPU2), [B1], "best_fit", O, "gpu2", None),
    ("best_fit tie prefers target", need(2), view(HEAD_2, GPU1), [B1], "best_fit", T, "head", None),
    ("best_fit tie boost over offload", need(2), view(HEAD_FULL, GPU1, node("gpu2", lend=R(2))), [B1], "best_fit", B, "gpu1", "b1aaaaaaaa"),
    ("best_fit normalises kinds", need(1, mem_gib=1),
     view(HEAD_FULL, node("a", lend=R(2, mem_gib=1)), node("b", lend=R(1, mem_gib=3))),
     [], "best_fit", O, "a", None),
    # load_balanced: lowest 0.3 cpu + 0.3 memory + 0.4 gpu pressure
    ("load_balanced offload calmer", need(1),
     view(node("head", free=R(4), p=(0.9, 0.9, 0.9)), node("gpu2", lend=R(4), p=(0.1, 0.1, 0.1))),
     [], "load_balanced", O, "gpu2", None),
    ("load_balanced boost uses source pressure", need(1),
     view(node("head", free=R(4), p=(0.6, 0.6, 0.6)), node("gpu1", p=(0.2, 0.2, 0.2))),
     [B1], "load_balanced", B, "gpu1", "b1aaaaaaaa"),
    ("load_balanced gpu weighs most", need(1),
     view(HEAD_FULL, node("a", lend=R(1), p=(0, 0, 1)), node("b", lend=R(1), p=(1, 0, 0))),
     [], "load_balanced", O, "b", None),
    ("load_balanced tie prefers target", need(1), view(HEAD_2, GPU1, GPU2), [B1], "load_balanced", T, "head", None),
    # performance_optimized: most headroom; GPU weighs heavily only for GPU tasks
    ("performance_optimized most cpu", need(1), view(HEAD_2, GPU1, node("gpu2", lend=R(8))), [B1],
     "performance_optimized", O, "gpu2", None),
    ("performance_optimized cpu task ignores gpu weight", need(1),
     view(HEAD_FULL, node("a", lend=R(6, gpu=1)), node("b", lend=R(1, gpu=2))), [], "performance_optimized", O, "a", None),
    ("performance_optimized gpu task weighs gpu", need(1, gpu=1),
     view(HEAD_FULL, node("a", lend=R(6, gpu=1)), node("b", lend=R(1, gpu=2))), [], "performance_optimized", O, "b", None),
    ("performance_optimized memory counts", need(1),
     view(HEAD_FULL, node("a", lend=R(2)), node("b", lend=R(2, mem_gib=8))), [], "performance_optimized", O, "b", None),
    # spread: fewest in-flight tasks (boosts count their own)
    ("spread boost idle", need(1), view(node("head", free=R(4), in_flight=5), node("gpu1", in_flight=9),
                                        node("gpu2", lend=R(4), in_flight=2)),
     [boost("b1aaaaaaaa", "gpu1", R(2), in_flight=0)], "spread", B, "gpu1", "b1aaaaaaaa"),
    ("spread offload idle", need(1), view(node("head", free=R(4), in_flight=3), node("gpu2", lend=R(4), in_flight=1)),
     [boost("b1aaaaaaaa", "gpu1", R(2), in_flight=2)], "spread", O, "gpu2", None),
    ("spread tie prefers target", need(1), view(HEAD_2, GPU1, GPU2), [B1], "spread", T, "head", None),
    # node_specific: only what runs physically on requirement.node
    ("node_specific target", need(1, node="head"), view(HEAD_2, GPU1, GPU2), [B1], "node_specific", T, "head", None),
    ("node_specific boost before offload", need(1, node="gpu1"), view(HEAD_2, node("gpu1", lend=R(4)), GPU2), [B1],
     "node_specific", B, "gpu1", "b1aaaaaaaa"),
    ("node_specific offload", need(1, node="gpu2"), view(HEAD_2, GPU1, GPU2), [B1], "node_specific", O, "gpu2", None),
    ("node_specific skips other boosts", need(2, node="gpu2"), view(HEAD_FULL, GPU1, GPU2), [B1], "node_specific", O, "gpu2", None),
    # GPU needs
    ("gpu task to boost with gpu", need(1, gpu=1), view(node("head", free=R(8)), GPU1, GPU2),
     [boost("b1aaaaaaaa", "gpu1", R(2, gpu=1))], "local_first", B, "gpu1", "b1aaaaaaaa"),
    ("fractional gpu fits", need(1, gpu=0.5), view(node("head", free=R(1, gpu=0.5))), [], "local_first", T, "head", None),
    ("gpu offload", need(1, gpu=1), view(HEAD_2, node("gpu2", lend=R(4, gpu=1))), [], "best_fit", O, "gpu2", None),
    # memory needs
    ("memory too small on target", need(1, mem_gib=2), view(node("head", free=R(4, mem_gib=1)), node("gpu2", lend=R(1, mem_gib=2))),
     [], "local_first", O, "gpu2", None),
    # down nodes, unusable boosts, private capacity
    ("target down uses boost", need(1), view(node("head", free=R(8), alive=False), GPU1), [B1], "local_first", B, "gpu1", "b1aaaaaaaa"),
    ("boost source down skipped", need(2), view(HEAD_FULL, node("gpu1", alive=False), GPU2), [B1], "local_first", O, "gpu2", None),
    ("boost source missing skipped", need(2), view(HEAD_FULL, GPU2), [B1], "local_first", O, "gpu2", None),
    ("offload node down skipped", need(2),
     view(HEAD_FULL, node("gpu1", lend=R(4), alive=False), node("gpu2", lend=R(4), p=(0.9, 0.9, 0.9))),
     [], "load_balanced", O, "gpu2", None),
    ("unusable boost skipped", need(2), view(HEAD_FULL, GPU1), [boost("deadbeef00", "gpu1", R(8), usable=False), B1],
     "local_first", B, "gpu1", "b1aaaaaaaa"),
    ("private capacity never used", need(2), view(HEAD_FULL, node("gpu2", free=R(64), lend=R(1))), [], "local_first", Q, None, None),
    ("allow_offload false uses boost", need(2), view(HEAD_FULL, GPU1, GPU2, allow_offload=False), [B1], "best_fit", B, "gpu1", "b1aaaaaaaa"),
]


@pytest.mark.parametrize(
    "requirement, cluster, boosts, strategy, kind, node_name, boost_id",
    [c[1:] for c in STRATEGY_CASES],
    ids=[c[0] for c in STRATEGY_CASES],
)
def test_place_chooses(requirement, cluster, boosts, strategy, kind, node_name, boost_id):
    p = place(requirement, cluster, boosts, strategy)
    assert (p.kind, p.node, p.boost_id) == (kind, node_name, boost_id), p.reason
    assert 0.0 <= p.confidence <= 1.0
    assert p.reason and "\n" not in p.reason


def test_local_first_defaults_and_accepts_enum():
    cluster = view(HEAD_FULL, GPU1, GPU2)
    assert place(need(2), cluster, [B1]) == place(need(2), cluster, [B1], Strategy.local_first)
    assert place(need(2), cluster, [B1]).kind is B


class _NoScan(Mapping):
    """Nodes whose full scan fails the test: local_first must not need one."""

    def __init__(self, **nodes):
        self._nodes = nodes

    def __getitem__(self, key):
        return self._nodes[key]

    def get(self, key, default=None):
        return self._nodes.get(key, default)

    def __iter__(self):
        raise AssertionError("scanned all nodes")

    def __len__(self):
        raise AssertionError("scanned all nodes")

    def values(self):
        raise AssertionError("scanned all nodes")


@pytest.mark.parametrize(
    "head, boosts, kind",
    [(HEAD_2, [], T), (HEAD_FULL, [B1], B)],
    ids=["target fits", "boost fits"],
)
def test_local_first_short_circuits(head, boosts, kind):
    cluster = ClusterView(target="head", nodes=_NoScan(head=head, gpu1=GPU1))
    assert place(need(2), cluster, boosts).kind is kind


@pytest.mark.parametrize("strategy", list(Strategy))
def test_allow_offload_false_never_offloads(strategy):
    cluster = view(HEAD_FULL, GPU2, allow_offload=False)
    p = place(need(1, node="gpu2"), cluster, [], strategy)
    assert p.kind is Q
    assert "not allowed" in p.reason


@pytest.mark.parametrize("strategy", [s for s in Strategy if s is not Strategy.node_specific])
def test_every_strategy_can_offload(strategy):
    assert place(need(2), view(HEAD_FULL, GPU2), [], strategy).kind is O


# --- reasons (exact wording the runner shows to users)
REASON_CASES = [
    ("target", need(1), view(HEAD_2, GPU2), [B1], "local_first",
     "target head has 2 CPU free"),
    ("boost, target full", need(2), view(HEAD_FULL, GPU1), [B1], "local_first",
     "boost b1aaaaaa on gpu1 has 2 CPU free; target head is full"),
    ("boost, target short", need(2), view(node("head", free=R(1)), GPU1), [B1], "local_first",
     "boost b1aaaaaa on gpu1 has 2 CPU free; target head lacks 2 CPU (has 1)"),
    ("boost, target down", need(1), view(node("head", free=R(4), alive=False), GPU1), [B1], "local_first",
     "boost b1aaaaaa on gpu1 has 2 CPU free; target head is down"),
    ("offload, strategy named", need(1), view(node("head", free=R(4), p=(1, 1, 1)), GPU2), [], "load_balanced",
     "offload to gpu2: 4 CPU free to lend; load_balanced: lowest pressure of 2 candidates"),
    ("queue, everything named", need(2),
     view(node("head", free=R(1)), node("gpu1", alive=False), node("gpu2", lend=R(1)), node("gpu3", alive=False)),
     [B1, boost("c3cccccccc", "gpu2", R(1)), boost("d4dddddddd", "gpu2", R(4), usable=False)], "local_first",
     "nothing fits 2 CPU: target head lacks 2 CPU (has 1); boost b1aaaaaa on gpu1: source is down; "
     "boost c3cccccc on gpu2 lacks 2 CPU (has 1); boost d4dddddd on gpu2 is not usable; "
     "no other node can lend it (1 checked; down: gpu1, gpu3)"),
    ("queue, target down", need(1), view(node("head", alive=False)), [], "spread",
     "nothing fits 1 CPU: target head is down; no other nodes"),
    ("queue, offload off", need(2), view(HEAD_FULL, GPU2, allow_offload=False), [], "best_fit",
     "nothing fits 2 CPU: target head lacks 2 CPU (has 0); offload is not allowed"),
    ("queue, gpu", need(1, gpu=1), view(HEAD_2, GPU1), [B1], "performance_optimized",
     "nothing fits 1 CPU, 1 GPU: target head lacks 1 GPU (has 0); boost b1aaaaaa on gpu1 lacks 1 GPU (has 0); "
     "no other node can lend it (1 checked)"),
    ("queue, many down nodes", need(1), view(HEAD_FULL, *[node(f"w{i}", alive=False) for i in range(5)]), [], "local_first",
     "nothing fits 1 CPU: target head lacks 1 CPU (has 0); no other node can lend it (0 checked; down: w0, w1, w2 +2 more)"),
    ("node_specific down", need(1, node="gpu2"), view(HEAD_2, node("gpu2", lend=R(4), alive=False)), [], "node_specific",
     "nothing fits 1 CPU on gpu2: node gpu2 is down"),
    ("node_specific unknown", need(1, node="gpu9"), view(HEAD_2, GPU2), [], "node_specific",
     "nothing fits 1 CPU on gpu9: node gpu9 is unknown (not in the cluster view)"),
    ("node_specific no room", need(2, node="gpu1"), view(HEAD_2, GPU1), [boost("b1aaaaaaaa", "gpu1", R(1))], "node_specific",
     "nothing fits 2 CPU on gpu1: boost b1aaaaaa on gpu1 lacks 2 CPU (has 1); offload to gpu1 lacks 2 CPU (has 1)"),
    ("node_specific target down", need(1, node="head"), view(node("head", free=R(4), alive=False), GPU2), [], "node_specific",
     "nothing fits 1 CPU on head: node head is down"),
    ("node_specific target full", need(1, node="head"), view(HEAD_FULL, GPU2), [], "node_specific",
     "nothing fits 1 CPU on head: target head lacks 1 CPU (has 0)"),
]


@pytest.mark.parametrize(
    "requirement, cluster, boosts, strategy, reason",
    [c[1:] for c in REASON_CASES],
    ids=[c[0] for c in REASON_CASES],
)
def test_reason(requirement, cluster, boosts, strategy, reason):
    p = place(requirement, cluster, boosts, strategy)
    assert p.reason == reason
    if p.kind is Q:
        assert p == Placement(Q, None, None, 0.0, reason)


def test_node_specific_needs_a_node():
    with pytest.raises(ValueError, match="node_specific needs requirement.node"):
        place(need(1), view(HEAD_2), [], "node_specific")


# --- confidence: (0.4(1-cpu) + 0.3(1-mem) + 0.3(1-gpu)) * min(available/required over asked kinds, 1)
CONFIDENCE_CASES = [
    ("calm and room", Pressure(), R(4), R(1), 1.0),
    ("cpu pressure", Pressure(cpu=0.5), R(4), R(1), 0.8),
    ("memory pressure", Pressure(memory=1), R(4), R(1), 0.7),
    ("gpu pressure", Pressure(gpu=0.5), R(4), R(1), 0.85),
    ("all busy", Pressure(1, 1, 1), R(4), R(1), 0.0),
    ("half the room", Pressure(), R(1), R(2), 0.5),
    ("pressure times room", Pressure(cpu=0.5), R(1), R(2), 0.4),
    ("min over asked kinds", Pressure(), R(4, gpu=0.25), R(2, gpu=1), 0.25),
    ("memory ratio", Pressure(), R(1, mem_gib=1), R(1, mem_gib=4), 0.25),
    ("unasked kinds ignored", Pressure(), R(1), R(1), 1.0),
    ("asks for nothing", Pressure(cpu=0.5), R(), R(), 0.8),
    ("nothing available", Pressure(), R(), R(1), 0.0),
    ("clamped above", Pressure(-1, -1, -1), R(4), R(1), 1.0),
    ("clamped below", Pressure(2, 2, 2), R(4), R(1), 0.0),
]


@pytest.mark.parametrize(
    "pressure, available, required, expected",
    [c[1:] for c in CONFIDENCE_CASES],
    ids=[c[0] for c in CONFIDENCE_CASES],
)
def test_confidence(pressure, available, required, expected):
    assert confidence(pressure, available, required) == pytest.approx(expected)


@pytest.mark.parametrize(
    "requirement, cluster, boosts, expected",
    [
        (need(1), view(node("head", free=R(2), p=(0.5, 0, 0))), [], 0.8),
        (need(2), view(HEAD_FULL, node("gpu1", p=(0, 1, 0))), [B1], 0.7),  # boost: the source's pressure
        (need(2), view(HEAD_FULL, node("gpu2", lend=R(2), p=(0, 0, 1))), [], 0.7),
    ],
    ids=["target", "boost", "offload"],
)
def test_placement_confidence(requirement, cluster, boosts, expected):
    assert place(requirement, cluster, boosts).confidence == pytest.approx(expected)


# --- strategies from text
@pytest.mark.parametrize(
    "text, expected",
    [
        ("best_fit", Strategy.best_fit),
        ("Best-Fit", Strategy.best_fit),
        (" spread ", Strategy.spread),
        (Strategy.node_specific, Strategy.node_specific),
        ("performance_optimized", Strategy.performance_optimized),
    ],
)
def test_strategy_parse(text, expected):
    assert Strategy.parse(text) is expected


@pytest.mark.parametrize("text", ["fastest", "", "local first!"])
def test_strategy_parse_unknown(text):
    expected = (
        f"unknown strategy {text!r}; expected one of: local_first, best_fit, load_balanced, "
        "performance_optimized, spread, node_specific"
    )
    with pytest.raises(ValueError) as err:
        Strategy.parse(text)
    assert str(err.value) == expected


def test_place_unknown_strategy():
    with pytest.raises(ValueError, match="unknown strategy 'fastest'"):
        place(need(1), view(HEAD_2), [], "fastest")


# --- the module itself
def test_docstring_examples():
    result = doctest.testmod(scheduler)
    assert result.attempted >= 5
    assert result.failed == 0


# --- lent capacity only when the target is saturated (the runner's rule in every sharing mode):
# (id, requirement, view flags, boosts, strategy, kind, node, boost id, words in the reason)
SHARED = boost("5aaaaaaaaa", "gpu1", R(2))
SHARED = BoostView(id=SHARED.id, source=SHARED.source, free=SHARED.free, shared=True)
LENT_RULE_CASES = [
    # head_in_flight / head_pressure make the target the worse candidate, so only the rule keeps it there.
    ("spread keeps a fitting task on the target", need(1), {"head_in_flight": 2}, [], "spread", T, "head", None,
     "target head has"),
    ("load_balanced keeps it too", need(1), {"head_pressure": 0.9}, [], "load_balanced", T, "head", None,
     "target head has"),
    ("best_fit ignores a tighter offload", need(1), {"head_free": 3, "lend": 1}, [], "best_fit", T, "head", None,
     "target head has"),
    ("own boost still competes with the target", need(2), {}, [B1], "best_fit", T, "head", None, "tightest fit"),
    # best_fit would pick the shared boost (a tighter fit than the 2-CPU head) but for the rule;
    # the flow's own boost of the same size still wins.
    ("shared boost unused while the target fits", need(2), {"head_free": 3}, [SHARED], "best_fit", T, "head",
     None, "target head has"),
    ("own boost of the same size is used", need(2), {"head_free": 3}, [B1], "best_fit", B, "gpu1", "b1aaaaaaaa",
     "tightest fit"),
    ("shared boost used once the target is full", need(2), {"head_free": 1}, [SHARED], "best_fit", B, "gpu1",
     "5aaaaaaaaa", "target head lacks 2 CPU"),
    ("too small a shared boost: offload", need(3), {}, [SHARED], "local_first", O, "gpu2", None, "lacks 3 CPU"),
    ("shared boost before offload", need(2), {"head_free": 0}, [SHARED], "local_first", B, "gpu1", "5aaaaaaaaa",
     "target head is full"),
    ("saturated target offloads", need(3), {}, [], "spread", O, "gpu2", None, "target head lacks 3 CPU"),
    ("busy target offloads a fitting task", need(1), {"busy": "cpu 0.95 > 0.80"}, [], "local_first", O, "gpu1",
     None, "target head is busy (cpu 0.95 > 0.80)"),
    ("busy target: shared boost first", need(1), {"busy": "cpu 0.95 > 0.80"}, [SHARED], "local_first", B, "gpu1",
     "5aaaaaaaaa", "is busy"),
    ("busy target still runs what nothing else fits", need(2), {"busy": "cpu 0.95 > 0.80", "lend": 1}, [],
     "local_first", T, "head", None, "busy (cpu 0.95 > 0.80) but nothing else fits"),
    ("busy target without offload keeps the task", need(1), {"busy": "mem", "offload": False}, [], "spread",
     T, "head", None, "nothing else fits"),
    ("node_specific ignores busy", need(1, node="head"), {"busy": "cpu"}, [], "node_specific", T, "head", None, ""),
]


@pytest.mark.parametrize(
    "requirement, flags, boosts, strategy, kind, node_name, boost_id, words",
    [pytest.param(*case[1:], id=case[0]) for case in LENT_RULE_CASES],
)
def test_lent_capacity_only_when_the_target_is_saturated(requirement, flags, boosts, strategy, kind, node_name,
                                                          boost_id, words):
    pressure = flags.get("head_pressure", 0.0)
    nodes = {
        "head": node("head", free=R(flags.get("head_free", 2)), p=(pressure, pressure, pressure),
                     in_flight=flags.get("head_in_flight", 0)),
        "gpu1": node("gpu1", lend=R(flags.get("lend", 1))),
        "gpu2": node("gpu2", lend=R(flags.get("lend", 4))),
    }
    cluster = ClusterView(target="head", nodes=nodes, allow_offload=flags.get("offload", True),
                          lent_when_target_full=True, target_busy=flags.get("busy", ""))
    placement = place(requirement, cluster, boosts, strategy)
    assert (placement.kind, placement.node, placement.boost_id) == (kind, node_name, boost_id), placement.reason
    assert words in placement.reason


def test_without_the_rule_strategies_may_offload_a_task_the_target_could_take():
    cluster = view(node("head", free=R(2), in_flight=1), GPU1, GPU2)
    assert place(need(1), cluster, [], "spread").kind is O  # the pure default: every candidate competes
    cluster = ClusterView(target="head", nodes=cluster.nodes, lent_when_target_full=True)
    assert place(need(1), cluster, [], "spread").kind is T


# --- OffloadIndex: the same placement as the full scan, decision by decision
_CPUS = [0, 0.3, 0.1 + 0.2, 0.5, 1, 2, 2, 3, 4, 8]  # repeats make shapes and ties; 0.1 + 0.2 is a rounding near-tie
_GPUS = [0, 0, 0, 0.5, 1, 2]
_MEMS = [0, 0, 1, 2, 4, 16]
_PRESSURES = [0.0, 0.0, 0.25, 0.5, 1.0]


def _random_node(rnd, name: str) -> NodeView:
    def res():
        return R(rnd.choice(_CPUS), rnd.choice(_GPUS), rnd.choice(_MEMS))

    def pressure():
        return rnd.choice(_PRESSURES) if rnd.random() < 0.7 else rnd.random()

    return NodeView(name, alive=rnd.random() < 0.85, free=res(), lendable_free=res(),
                    pressure=Pressure(pressure(), pressure(), pressure()), in_flight=rnd.randrange(4))


def _random_view(rnd, names: list[str]) -> ClusterView:
    target = rnd.choice(names) if rnd.random() < 0.9 else "gone"  # sometimes not in the view
    return ClusterView(
        target=target,
        nodes={n: _random_node(rnd, n) for n in names},
        allow_offload=rnd.random() < 0.9,
        lent_when_target_full=rnd.random() < 0.5,
        target_busy=rnd.choice(["", "", "cpu 0.95 > 0.80"]),
    )


def _random_boosts(rnd, names: list[str]) -> list[BoostView]:
    return [BoostView(id=f"{i:08x}-boost", source=rnd.choice(names + ["gone"]),
                      free=R(rnd.choice(_CPUS), rnd.choice(_GPUS), rnd.choice(_MEMS)), usable=rnd.random() < 0.8,
                      in_flight=rnd.randrange(4), shared=rnd.random() < 0.3)
            for i in range(rnd.randrange(4))]


def _random_requirement(rnd, names: list[str]) -> Requirement:
    return Requirement(R(rnd.choice([0, 0.3, 0.1 + 0.2, 0.5, 1, 2, 3, 8]), rnd.choice([0, 0, 0.5, 1]), rnd.choice([0, 0, 1, 4])),
                       node=rnd.choice(names + ["gone"]))


def _assert_index_agrees(rnd, cluster, index, boosts, names, needs=4):
    for _ in range(needs):
        requirement = _random_requirement(rnd, names)
        for strategy in Strategy:
            expected = place(requirement, cluster, boosts, strategy)
            assert place(requirement, cluster, boosts, strategy, index=index) == expected, (requirement, strategy)


def test_offload_index_places_exactly_like_the_scan():
    rnd = random.Random(20240601)
    for _ in range(300):
        names = [f"n{i}" for i in rnd.sample(range(100), rnd.randint(1, 60))]  # view order is not name order
        cluster = _random_view(rnd, names)
        _assert_index_agrees(rnd, cluster, OffloadIndex.from_view(cluster), _random_boosts(rnd, names), names)


def test_offload_index_agrees_after_updates():
    rnd = random.Random(7)
    for _ in range(40):
        names = [f"n{i}" for i in range(rnd.randint(1, 60))]
        cluster = _random_view(rnd, names)
        index = OffloadIndex.from_view(cluster)
        nodes = dict(cluster.nodes)
        removed = ["new"]
        for _ in range(30):
            action = rnd.random()
            if action < 0.15:  # a node leaves the view
                gone = rnd.choice([n for n in nodes if n != cluster.target] or [None])
                if gone is not None:
                    del nodes[gone]
                    index.remove(gone)
                    removed.append(gone)
            else:  # a dispatch, a finished task, a liveness change, or a node (re)joins: it goes last
                name = rnd.choice(list(nodes)) if action < 0.85 else rnd.choice(removed)
                nodes[name] = _random_node(rnd, name)
                index.update(nodes[name])
            cluster = ClusterView(cluster.target, dict(nodes), cluster.allow_offload, cluster.lent_when_target_full,
                                  cluster.target_busy)
            names = list(nodes)
            _assert_index_agrees(rnd, cluster, index, _random_boosts(rnd, names), names, needs=1)
            assert len(index) == len(OffloadIndex.from_view(cluster))


def test_offload_index_is_for_one_target():
    cluster = view(HEAD_FULL, GPU2)
    with pytest.raises(ValueError, match="index is for target 'gpu2'"):
        place(need(1), cluster, [], index=OffloadIndex.from_view(ClusterView("gpu2", cluster.nodes)))


def test_offload_index_skips_shapes_without_enough_cpu():
    # 1,000 small shapes and one big one: a 4-CPU task looks at the big one only.
    nodes = {f"w{i}": node(f"w{i}", lend=R(1, mem_gib=i)) for i in range(1000)}
    nodes["big"] = node("big", lend=R(8))
    cluster = ClusterView("head", {"head": HEAD_FULL, **nodes})
    index = OffloadIndex.from_view(cluster)
    assert index.best(R(4), Strategy.load_balanced)[0] == 1
    assert place(need(4), cluster, [], "load_balanced", index=index).node == "big"
