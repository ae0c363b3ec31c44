"""Unit tests of grid_flows.models and grid_flows.cluster_file: resources, enums, cluster definition."""

from __future__ import annotations

import copy
import doctest
import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

import grid_flows.models as models_module
from grid_flows.cluster_file import InvalidClusterFile, load_cluster_file, parse_cluster
from grid_flows.models import (
    LEND_CPU,
    LEND_GPU,
    LEND_MEMORY,
    BoostState,
    ClusterSpec,
    InvalidRequest,
    NodeRole,
    Priority,
    ResourceMode,
    Resources,
    SharingMode,
    SharingPolicy,
    UnknownNode,
)

MIB, GIB = 1024**2, 1024**3
NAN, INF = float("nan"), float("inf")
CLUSTER_YAML = Path(__file__).resolve().parents[2] / "blocks" / "cluster.yaml"


def test_docstring_examples_hold():
    result = doctest.testmod(models_module)
    assert result.attempted > 0 and result.failed == 0


# --- Resources: validation ------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, Resources(cpu=0, gpu=0, memory=0)),
        ({"cpu": 2}, Resources(cpu=2.0)),
        ({"cpu": 0.5, "gpu": 0.25}, Resources(cpu=0.5, gpu=0.25)),
        ({"memory": "4GiB"}, Resources(memory=4 * GIB)),
        ({"memory": "512MiB"}, Resources(memory=512 * MIB)),
        ({"memory": 1000}, Resources(memory=1000)),
        ({"memory": None}, Resources(memory=0)),
        ({"cpu": 1, "gpu": 1, "memory": "2GB"}, Resources(cpu=1, gpu=1, memory=2_000_000_000)),
    ],
)
def test_resources_parse_accepts(kwargs, expected):
    result = Resources.parse(**kwargs)
    assert result == expected
    assert isinstance(result.cpu, float) and isinstance(result.gpu, float) and isinstance(result.memory, int)


@pytest.mark.parametrize(
    "kwargs, field, fragment",
    [
        ({"cpu": -1}, "cpu", "must not be negative"),
        ({"gpu": -0.5}, "gpu", "must not be negative"),
        ({"cpu": NAN}, "cpu", "must be a number, got NaN"),
        ({"gpu": NAN}, "gpu", "must be a number, got NaN"),
        ({"cpu": INF}, "cpu", "must be finite"),
        ({"gpu": -INF}, "gpu", "must be finite"),
        ({"cpu": True}, "cpu", "must be a number, got True"),
        ({"gpu": False}, "gpu", "must be a number, got False"),
        ({"memory": -5}, "memory", "must not be negative"),
        ({"memory": NAN}, "memory", "must be a number, got NaN"),
        ({"memory": INF}, "memory", "must be finite"),
        ({"memory": True}, "memory", "must be a number, got True"),
        ({"memory": "lots"}, "memory", "must be bytes or a size like"),
        ({"memory": "-4GiB"}, "memory", "must be bytes or a size like"),
    ],
)
def test_resources_parse_rejects_with_a_one_line_message_naming_the_field(kwargs, field, fragment):
    with pytest.raises(ValueError) as info:
        Resources.parse(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(field)
    assert fragment in message


@pytest.mark.parametrize(
    "kwargs",
    [{"cpu": -1}, {"gpu": NAN}, {"cpu": INF}, {"cpu": True}, {"memory": -1}, {"memory": NAN}, {"cpu": "2"},
     {"disk": 1}],
)
def test_resources_constructor_validates_too(kwargs):
    with pytest.raises(ValidationError):
        Resources(**kwargs)


def test_resources_are_frozen():
    r = Resources(cpu=1)
    with pytest.raises(ValidationError):
        r.cpu = 2  # type: ignore[misc]
    assert r.cpu == 1


# --- Resources: arithmetic and wording ------------------------------------------------


@pytest.mark.parametrize(
    "need, have, fits",
    [
        (Resources(), Resources(), True),
        (Resources(cpu=2), Resources(cpu=2), True),
        (Resources(cpu=2.0000000001), Resources(cpu=2), True),  # float noise is tolerated
        (Resources(cpu=2.01), Resources(cpu=2), False),
        (Resources(gpu=1), Resources(cpu=8, memory=8 * GIB), False),
        (Resources(memory=GIB + 1), Resources(memory=GIB), False),
        (Resources(memory=GIB), Resources(memory=GIB), True),
        (Resources(cpu=0.1) + Resources(cpu=0.2), Resources(cpu=0.3), True),
        (Resources(cpu=1, gpu=1, memory=GIB), Resources(cpu=2, gpu=1, memory=2 * GIB), True),
        (Resources(cpu=1, gpu=1, memory=3 * GIB), Resources(cpu=2, gpu=1, memory=2 * GIB), False),
    ],
)
def test_fits_in(need, have, fits):
    assert need.fits_in(have) is fits


@pytest.mark.parametrize(
    "a, b, expected",
    [
        (Resources(cpu=4, gpu=1, memory=8 * GIB), Resources(cpu=1, gpu=0.5, memory=GIB),
         Resources(cpu=3, gpu=0.5, memory=7 * GIB)),
        (Resources(cpu=1), Resources(cpu=3, gpu=1, memory=GIB), Resources()),  # floored at zero
        (Resources(cpu=2, memory=GIB), Resources(), Resources(cpu=2, memory=GIB)),
    ],
)
def test_minus_floors_at_zero(a, b, expected):
    assert a.minus(b) == expected
    assert a.minus(b).fits_in(a)


def test_add():
    assert Resources(cpu=1, gpu=0.5, memory=MIB) + Resources(cpu=2, memory=MIB) == Resources(
        cpu=3, gpu=0.5, memory=2 * MIB
    )


@pytest.mark.parametrize(
    "need, available, expected",
    [
        (Resources(cpu=3, gpu=1, memory=GIB), Resources(cpu=1.5),
         ["3 CPU (has 1.5)", "1 GPU (has 0)", "1 GiB memory (has 0 B)"]),
        (Resources(cpu=2), Resources(cpu=1), ["2 CPU (has 1)"]),
        (Resources(memory=4 * GIB), Resources(cpu=8, memory=512 * MIB), ["4 GiB memory (has 512 MiB)"]),
        (Resources(cpu=2, memory=GIB), Resources(cpu=2, memory=GIB), []),
        (Resources(), Resources(), []),
    ],
)
def test_shortfall_wording(need, available, expected):
    assert need.shortfall(available) == expected
    assert (need.shortfall(available) == []) is need.fits_in(available)


@pytest.mark.parametrize(
    "r, expected",
    [
        (Resources(cpu=2, memory=4 * GIB), "2 CPU, 4 GiB"),
        (Resources(), "nothing"),
        (Resources(gpu=0.5), "0.5 GPU"),
        (Resources(cpu=1, gpu=1, memory=1536), "1 CPU, 1 GPU, 1.5 KiB"),
        (Resources(memory=512 * MIB), "512 MiB"),
    ],
)
def test_describe(r, expected):
    assert r.describe() == expected


def test_is_zero():
    assert Resources().is_zero()
    assert not Resources(memory=1).is_zero()
    assert not Resources(gpu=0.001).is_zero()


# --- Resources: lend tokens and bundles -----------------------------------------------


@pytest.mark.parametrize(
    "r, expected",
    [
        (Resources(cpu=2, gpu=1, memory=4 * GIB), {LEND_CPU: 2000.0, LEND_GPU: 1000.0, LEND_MEMORY: 4096.0}),
        (Resources(cpu=0.1), {LEND_CPU: 100.0}),  # 0.1*1000 float noise does not round up to 101
        (Resources(cpu=0.3, gpu=0.7), {LEND_CPU: 300.0, LEND_GPU: 700.0}),
        (Resources(cpu=1.1), {LEND_CPU: 1100.0}),
        (Resources(cpu=4.03, gpu=2.007), {LEND_CPU: 4030.0, LEND_GPU: 2007.0}),  # x*1000 is just above a whole
        (Resources(cpu=0.0015), {LEND_CPU: 2.0}),  # fractions of a unit round up
        (Resources(memory=1), {LEND_MEMORY: 1.0}),
        (Resources(memory=MIB), {LEND_MEMORY: 1.0}),
        (Resources(memory=MIB + 1), {LEND_MEMORY: 2.0}),
        (Resources(), {}),  # zero amounts are left out
    ],
)
def test_lend_tokens_are_whole_units_rounded_up(r, expected):
    tokens = r.lend_tokens()
    assert tokens == expected
    assert all(float(v).is_integer() and v > 0 for v in tokens.values())
    # never fewer tokens than the resources they stand for
    assert r.fits_in(Resources.from_lend_tokens(tokens))


@pytest.mark.parametrize(
    "r",
    [
        Resources(cpu=2, gpu=1, memory=4 * GIB),
        Resources(cpu=2.5, gpu=0.25, memory=1536 * MIB),
        Resources(cpu=0.001),
        Resources(gpu=0.125),
        Resources(memory=7 * MIB),
        Resources(),
    ],
)
def test_from_lend_tokens_round_trips_whole_units(r):
    assert Resources.from_lend_tokens(r.lend_tokens()) == r


def test_bundle_holds_raw_resources_and_lend_tokens():
    bundle = Resources(cpu=2, gpu=1, memory=4 * GIB).bundle()
    assert bundle == {
        "CPU": 2.0,
        "GPU": 1.0,
        "memory": float(4 * GIB),
        LEND_CPU: 2000.0,
        LEND_GPU: 1000.0,
        LEND_MEMORY: 4096.0,
    }


def test_bundle_leaves_out_zero_amounts():
    bundle = Resources(cpu=2).bundle()
    assert bundle == {"CPU": 2.0, LEND_CPU: 2000.0}
    assert Resources().bundle() == {}


# --- enums ----------------------------------------------------------------------------


def test_priority_rank_orders_low_to_critical():
    assert [p.rank for p in (Priority.low, Priority.normal, Priority.high, Priority.critical)] == [0, 1, 2, 3]
    assert sorted(Priority, key=lambda p: p.rank, reverse=True)[0] is Priority.critical
    assert Priority("high").rank > Priority("normal").rank


@pytest.mark.parametrize(
    "state, ended",
    [
        (BoostState.pending, False),
        (BoostState.active, False),
        (BoostState.released, True),
        (BoostState.expired, True),
        (BoostState.preempted, True),
        (BoostState.lost, True),
        (BoostState.failed, True),
    ],
)
def test_boost_state_ended(state, ended):
    assert state.ended is ended


def test_every_boost_state_is_classified():
    assert {s for s in BoostState if not s.ended} == {BoostState.pending, BoostState.active}


# --- the shipped cluster file ---------------------------------------------------------


def test_shipped_cluster_yaml_loads():
    spec = load_cluster_file(CLUSTER_YAML)
    assert [n.name for n in spec.nodes] == ["gpu-master", "gpu1", "gpu2"]
    assert spec.head.name == "gpu-master"
    assert [n.name for n in spec.workers] == ["gpu1", "gpu2"]
    assert [n.name for n in spec.lenders()] == ["gpu1", "gpu2"]
    assert spec.node("gpu1").share == Resources(cpu=2, gpu=1, memory=4 * GIB)
    assert spec.node("gpu2").share == Resources(cpu=1, memory=2 * GIB)
    assert spec.head.share == Resources()
    assert spec.node("gpu1").size == Resources(cpu=4, gpu=1, memory=8 * GIB)
    assert spec.node("gpu1").ray_resources() == {LEND_CPU: 2000.0, LEND_GPU: 1000.0, LEND_MEMORY: 4096.0}
    assert spec.node("gpu1").mode is ResourceMode.conservative
    assert spec.head.mode is ResourceMode.aggressive
    assert spec.resource_sharing.mode is SharingMode.share_and_offload
    assert spec.resource_sharing.policy is SharingPolicy.balanced
    assert spec.resource_sharing.default_boost_duration_seconds == 3600
    assert spec.resource_sharing.thresholds.gpu.high == 0.8


def test_unknown_node_lookup_names_the_known_nodes():
    spec = load_cluster_file(CLUSTER_YAML)
    with pytest.raises(UnknownNode, match=r"unknown node 'gpu9' \(known: gpu-master, gpu1, gpu2\)"):
        spec.node("gpu9")


def test_minimal_cluster():
    spec = ClusterSpec.model_validate({"nodes": [{"name": "solo", "role": "head"}]})
    assert spec.head.name == "solo" and spec.workers == [] and spec.lenders() == []


def test_a_lender_that_shares_nothing_is_not_a_lender():
    spec = ClusterSpec.model_validate(
        {"nodes": [{"name": "h", "role": "head"}, {"name": "w", "resource_sharing": {"can_share": True}}]}
    )
    assert spec.node("w").role is NodeRole.worker
    assert spec.lenders() == []


def test_can_share_false_means_no_share_whatever_the_numbers():
    spec = ClusterSpec.model_validate(
        {"nodes": [{"name": "h", "role": "head"},
                   {"name": "w", "cpu_count": 4, "resource_sharing": {"can_share": False, "max_share_cpu": 2}}]}
    )
    assert spec.node("w").share == Resources()
    assert spec.node("w").ray_resources() == {}


# --- invalid cluster definitions: one line per problem, naming the field ---------------


def shipped() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def problem_lines(data: dict) -> list[str]:
    with pytest.raises(InvalidClusterFile) as info:
        parse_cluster(data)
    header, *lines = str(info.value).splitlines()
    assert header == "cluster definition: invalid cluster definition"
    return lines


def _set(path: str, value):
    """A mutation of the shipped data: set ``path`` (dotted, list indexes as ints)."""

    def mutate(data):
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        target = data
        for p in parents:
            target = target[p]
        target[last] = value

    mutate.__name__ = f"{path}={value!r}"
    return mutate


INVALID = [
    # negative shares
    (_set("nodes.1.resource_sharing.max_share_cpu", -2), "nodes[1].resource_sharing.max_share_cpu: must be >= 0"),
    (_set("nodes.1.resource_sharing.max_share_gpu", -1), "nodes[1].resource_sharing.max_share_gpu: must be >= 0"),
    (_set("nodes.2.resource_sharing.max_share_memory_gb", -0.5),
     "nodes[2].resource_sharing.max_share_memory_gb: must be >= 0"),
    (_set("nodes.1.resource_sharing.priority", -1), "nodes[1].resource_sharing.priority: must be >= 0"),
    # NaN / inf in user numbers
    (_set("nodes.1.resource_sharing.max_share_cpu", NAN), "nodes[1].resource_sharing.max_share_cpu: "),
    (_set("nodes.1.cpu_count", INF), "nodes[1].cpu_count: "),
    (_set("nodes.1.memory_gb", NAN), "nodes[1].memory_gb: "),
    (_set("resource_sharing.rebalance_interval_seconds", INF), "resource_sharing.rebalance_interval_seconds: "),
    (_set("resource_sharing.thresholds.cpu.high", NAN), "resource_sharing.thresholds.cpu.high: "),
    # shares above the node's size
    (_set("nodes.1.resource_sharing.max_share_cpu", 5),
     "nodes[1].resource_sharing.max_share_cpu: 5 is more than the node has (4)"),
    (_set("nodes.1.resource_sharing.max_share_gpu", 2),
     "nodes[1].resource_sharing.max_share_gpu: 2 is more than the node has (1)"),
    (_set("nodes.2.resource_sharing.max_share_memory_gb", 4.5),
     "nodes[2].resource_sharing.max_share_memory_gb: 4.5 is more than the node has (4)"),
    # sizes
    (_set("nodes.1.cpu_count", 0), "nodes[1].cpu_count: "),
    (_set("nodes.1.gpu_count", -1), "nodes[1].gpu_count: must be >= 0"),
    # unknown enum values
    (_set("nodes.1.mode", "turbo"), "nodes[1].mode: unknown value 'turbo'; expected 'conservative', 'default' or 'aggressive'"),
    (_set("nodes.2.role", "boss"), "nodes[2].role: unknown value 'boss'"),
    (_set("resource_sharing.mode", "share_all"), "resource_sharing.mode: unknown value 'share_all'"),
    (_set("resource_sharing.policy", "greedy"), "resource_sharing.policy: unknown value 'greedy'"),
    (_set("nodes.1.mode_overrides", {"ionice_class": "realtime"}), "nodes[1].mode_overrides.ionice_class: "),
    (_set("nodes.1.mode_overrides", {"vram_cap": 1.5}), "nodes[1].mode_overrides.vram_cap: "),
    # thresholds
    (_set("resource_sharing.thresholds.cpu", {"high": 0.3, "low": 0.8}),
     "resource_sharing.thresholds.cpu: low (0.8) must be below high (0.3)"),
    (_set("resource_sharing.thresholds.gpu.low", 0.8),
     "resource_sharing.thresholds.gpu: low (0.8) must be below high (0.8)"),
    (_set("resource_sharing.thresholds.memory.high", 1.5), "resource_sharing.thresholds.memory.high: "),
    # durations
    (_set("resource_sharing.default_boost_duration_seconds", 0), "resource_sharing.default_boost_duration_seconds: "),
    (_set("resource_sharing.max_boost_duration_seconds", 8 * 86400), "resource_sharing.max_boost_duration_seconds: "),
    # node names and structure
    (_set("nodes.2.name", "gpu1"), "nodes[2].name: 'gpu1' is used by two nodes"),
    (_set("nodes.1.name", "gpu 1"), "nodes[1].name: must start with a letter or digit"),
    (_set("nodes.1.name", "-gpu"), "nodes[1].name: must start with a letter or digit"),
    (_set("nodes.1.name", ""), "nodes[1].name: must start with a letter or digit"),
    (_set("nodes.1.name", "g" * 64), "nodes[1].name: must start with a letter or digit"),
    (_set("nodes.1.name", "gpu/1"), "nodes[1].name: must start with a letter or digit"),
    (_set("nodes.1.name", 5), "nodes[1].name: "),
    (_set("nodes.0.role", "worker"), "nodes: no node has role 'head' (exactly one is needed)"),
    (_set("nodes.2.role", "head"), "nodes: more than one head (gpu-master, gpu2); exactly one is needed"),
    (_set("nodes", []), "nodes: no node has role 'head'"),
    (_set("nodes", None), "nodes: "),
    (_set("nodes", {"name": "gpu-master"}), "nodes: "),
]


@pytest.mark.parametrize("mutate, expected", INVALID, ids=[m.__name__ for m, _ in INVALID])
def test_invalid_cluster_yields_one_line_naming_the_field(mutate, expected):
    data = shipped()
    mutate(data)
    lines = problem_lines(data)
    assert len(lines) == 1, lines
    assert lines[0].startswith(expected), lines


def test_missing_nodes_is_named():
    data = shipped()
    del data["nodes"]
    assert problem_lines(data) == ["nodes: Field required"]


UNKNOWN_KEYS = [
    ((), "colour", "colour"),
    (("nodes", 1), "max_share_cpus", "nodes[1].max_share_cpus"),
    (("nodes", 1, "resource_sharing"), "max_share_cpus", "nodes[1].resource_sharing.max_share_cpus"),
    (("nodes", 0, "resource_sharing"), "enabled", "nodes[0].resource_sharing.enabled"),
    (("resource_sharing",), "rebalance_every", "resource_sharing.rebalance_every"),
    (("resource_sharing", "thresholds"), "disk", "resource_sharing.thresholds.disk"),
    (("resource_sharing", "thresholds", "cpu"), "medium", "resource_sharing.thresholds.cpu.medium"),
]


@pytest.mark.parametrize("where, key, path", UNKNOWN_KEYS, ids=[p for _, _, p in UNKNOWN_KEYS])
def test_unknown_key_is_an_error_naming_the_key(where, key, path):
    data = shipped()
    target = data
    for part in where:
        target = target[part]
    target[key] = 1
    assert problem_lines(data) == [f"{path}: unknown key"]


def test_unknown_key_in_mode_overrides_is_named():
    data = shipped()
    data["nodes"][1]["mode_overrides"] = {"vram": 0.5}
    assert problem_lines(data) == ["nodes[1].mode_overrides.vram: unknown key"]


def test_several_problems_are_reported_one_per_line():
    data = shipped()
    data["nodes"][1]["colour"] = "red"
    data["resource_sharing"]["policy"] = "greedy"
    lines = problem_lines(data)
    assert len(lines) == 2
    assert any(line.startswith("nodes[1].colour: unknown key") for line in lines)
    assert any(line.startswith("resource_sharing.policy: unknown value 'greedy'") for line in lines)


@pytest.mark.parametrize("name", ["a", "gpu-1", "gpu1.lab_2", "9node", "g" * 63])
def test_good_node_names_are_accepted(name):
    data = shipped()
    data["nodes"][2]["name"] = name
    assert parse_cluster(data).nodes[2].name == name


def test_shares_equal_to_the_node_size_are_accepted():
    data = shipped()
    data["nodes"][1]["resource_sharing"].update(max_share_cpu=4, max_share_gpu=1, max_share_memory_gb=8)
    assert parse_cluster(data).node("gpu1").share == Resources(cpu=4, gpu=1, memory=8 * GIB)


# --- the seed-format mode alias -------------------------------------------------------


def seed_format(sharing_mode, node_mode=None) -> dict:
    data = shipped()
    node = data["nodes"][1]
    del node["mode"]
    node["resource_sharing"]["mode"] = sharing_mode
    if node_mode is not None:
        node["mode"] = node_mode
    return data


@pytest.mark.parametrize("mode", list(ResourceMode))
def test_seed_format_resource_sharing_mode_is_accepted(mode):
    spec = parse_cluster(seed_format(mode.value))
    assert spec.node("gpu1").mode is mode


def test_seed_format_mode_agreeing_with_node_mode_is_accepted():
    spec = parse_cluster(seed_format("aggressive", node_mode="aggressive"))
    assert spec.node("gpu1").mode is ResourceMode.aggressive


def test_seed_format_mode_conflicting_with_node_mode_is_an_error():
    lines = problem_lines(seed_format("aggressive", node_mode="conservative"))
    assert lines == ["nodes[1].mode: 'conservative' disagrees with resource_sharing.mode 'aggressive'"]


def test_seed_format_unknown_mode_is_reported_once():
    lines = problem_lines(seed_format("turbo"))
    assert len(lines) == 1, lines
    assert lines[0].startswith("nodes[1].resource_sharing.mode: unknown value 'turbo'")


def test_default_boost_duration_longer_than_the_max_is_an_error():
    data = shipped()
    data["resource_sharing"].update(default_boost_duration_seconds=7200, max_boost_duration_seconds=3600)
    lines = problem_lines(data)
    assert len(lines) == 1 and lines[0].startswith("resource_sharing.")
    assert "default_boost_duration_seconds" in lines[0] or "max_boost_duration_seconds" in lines[0]


# --- reading files --------------------------------------------------------------------


def test_load_cluster_file_reports_the_line_of_malformed_yaml(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("nodes:\n  - name: gpu-master\n\trole: head\n")
    with pytest.raises(InvalidClusterFile) as info:
        load_cluster_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: malformed YAML at line 3, column 1:")
    assert "\n" not in message


def test_load_cluster_file_reports_the_line_of_a_bad_indent(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("nodes:\n  - name: gpu-master\n    role: head\n   bad: [1\n")
    with pytest.raises(InvalidClusterFile, match=r"malformed YAML at line \d+, column \d+") as info:
        load_cluster_file(path)
    line = int(re.search(r"at line (\d+)", str(info.value)).group(1))
    assert 4 <= line <= 5


def test_load_cluster_file_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(InvalidClusterFile) as info:
        load_cluster_file(path)
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


def test_load_cluster_file_directory(tmp_path):
    with pytest.raises(InvalidClusterFile, match="cannot read"):
        load_cluster_file(tmp_path)


@pytest.mark.parametrize(
    "text, kind", [("- a\n- b\n", "list"), ("just a string\n", "str"), ("", "NoneType"), ("42\n", "int")]
)
def test_load_cluster_file_top_level_must_be_a_mapping(tmp_path, text, kind):
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    with pytest.raises(InvalidClusterFile) as info:
        load_cluster_file(path)
    assert str(info.value) == f"{path}: expected a mapping with 'nodes' at the top, got {kind}"


def test_load_cluster_file_invalid_content_names_the_file_and_field(tmp_path):
    data = shipped()
    data["nodes"][1]["resource_sharing"]["max_share_cpu"] = -2
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(InvalidClusterFile) as info:
        load_cluster_file(path)
    assert str(info.value).splitlines() == [
        f"{path}: invalid cluster definition",
        "nodes[1].resource_sharing.max_share_cpu: must be >= 0.0, got -2",
    ]


def test_parse_cluster_top_level_not_a_mapping():
    with pytest.raises(InvalidClusterFile, match="^here: expected a mapping with 'nodes' at the top, got list$"):
        parse_cluster([{"name": "gpu-master"}], source="here")


def test_invalid_cluster_file_is_an_invalid_request():
    assert issubclass(InvalidClusterFile, InvalidRequest)
    assert issubclass(InvalidClusterFile, ValueError)
    assert InvalidClusterFile.exit_code == 2


def test_parse_does_not_mutate_its_input():
    data = seed_format("aggressive")
    before = copy.deepcopy(data)
    parse_cluster(data)
    assert data == before
