"""Unit tests of grid_flows.core.models and grid_flows.core.cluster_file: resources, enums, cluster definition."""

from __future__ import annotations

import copy
import doctest
import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

import grid_flows.core.models as models_module
from grid_flows.core.cluster_file import load_cluster_file, parse_cluster
from grid_flows.errors import InvalidClusterFile
from grid_flows.core.models import (
    BoostState, ClusterSpec, NodeRole, Priority, ResourceMode, Resources,
    SharingMode, SharingPolicy,
)
from grid_flows.errors import InvalidRequest, UnknownNode

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
    (_set("nodes.1.name", "gpu 1"), "nodes[1].name: must be a Ray label value"),
    (_set("nodes.1.name", "-gpu"), "nodes[1].name: must be a Ray label value"),
    (_set("nodes.1.name", ""), "nodes[1].name: must be a Ray label value"),
    (_set("nodes.1.name", "g" * 64), "nodes[1].name: must be a Ray label value"),
    (_set("nodes.1.name", "gpu/1"), "nodes[1].name: must be a Ray label value"),
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


@pytest.mark.parametrize("name", ["a", "gpu-1", "gpu1.lab_2", "9node", "g" * 63, "a.b", "A_9"])
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


def test_parse_does_not_mutate_its_input():
    data = seed_format("aggressive")
    before = copy.deepcopy(data)
    parse_cluster(data)
    assert data == before


# --- input that validated but could not run -------------------------------------------


def one_problem(data: dict) -> str:
    lines = problem_lines(data)
    assert len(lines) == 1, lines
    return lines[0]


NAME_RULE_LINE = "nodes[1].name: must be a Ray label value: 1 to 63 letters, digits, '-', '_' or '.', starting and ending"


@pytest.mark.parametrize("name", ["gpu-", "gpu.", "gpu_", "gpu1\n", "gpu1\r", "_gpu", ".gpu", "gpu\n1", "gpü"])
def test_node_names_ray_refuses_as_a_label_value_are_refused(name):
    data = shipped()
    data["nodes"][1]["name"] = name
    line = one_problem(data)
    assert line.startswith(NAME_RULE_LINE), line
    assert line.endswith(f"got {name!r}")


@pytest.mark.parametrize(
    "name",
    ["a", "9", "gpu1", "gpu-1", "a.b", "a_b", "a-._b", "g" * 63, "gpu-", "gpu_", "gpu.", "-gpu", "gpu1\n", "g" * 64,
     "gpu 1", "gpu/1", "gpu:1", "gpü"],
)
def test_node_name_rule_is_rays_label_value_rule(name):
    pytest.importorskip("ray")  # the package first: a bare ray._private import breaks ray's atexit shutdown
    from ray._private import label_utils

    try:
        label_utils.validate_label_value(name)
        ray_ok = True
    except ValueError:
        ray_ok = False
    data = shipped()
    data["nodes"][1]["name"] = name
    try:
        parse_cluster(data)
        ours_ok = True
    except InvalidClusterFile:
        ours_ok = False
    assert ours_ok == ray_ok


SIZE_PROBLEMS = [
    (_set("nodes.1.cpu_count", 0.5), "nodes[1].cpu_count: must be a whole number (`ray start --num-cpus` takes whole units), got 0.5"),
    (_set("nodes.1.cpu_count", 4.5), "nodes[1].cpu_count: must be a whole number"),
    (_set("nodes.1.gpu_count", 0.5), "nodes[1].gpu_count: must be a whole number (`ray start --num-gpus` takes whole units), got 0.5"),
    (_set("nodes.1.cpu_count", 1e30), "nodes[1].cpu_count: Input should be less than or equal to 4096"),
    (_set("nodes.1.cpu_count", 4097), "nodes[1].cpu_count: Input should be less than or equal to 4096"),
    (_set("nodes.1.gpu_count", 65), "nodes[1].gpu_count: Input should be less than or equal to 64"),
    (_set("nodes.1.memory_gb", 1e300), "nodes[1].memory_gb: Input should be less than or equal to 65536"),
    (_set("nodes.1.memory_gb", 65537), "nodes[1].memory_gb: Input should be less than or equal to 65536"),
    # shares are bounded by themselves too, so a huge share is named before the size comparison
    (_set("nodes.1.resource_sharing.max_share_cpu", 1e30),
     "nodes[1].resource_sharing.max_share_cpu: Input should be less than or equal to 4096"),
    (_set("nodes.1.resource_sharing.max_share_gpu", 100),
     "nodes[1].resource_sharing.max_share_gpu: Input should be less than or equal to 64"),
    (_set("nodes.1.resource_sharing.max_share_memory_gb", 1e300),
     "nodes[1].resource_sharing.max_share_memory_gb: Input should be less than or equal to 65536"),
    # durations and mode numbers: finite is not enough, timedelta/sleep overflow on 1e300
    (_set("resource_sharing.rebalance_interval_seconds", 1e300),
     "resource_sharing.rebalance_interval_seconds: Input should be less than or equal to 604800"),
    (_set("resource_sharing.monitoring_interval_seconds", 1e300),
     "resource_sharing.monitoring_interval_seconds: Input should be less than or equal to 604800"),
    (_set("resource_sharing.min_runtime_seconds", 1e300),
     "resource_sharing.min_runtime_seconds: Input should be less than or equal to 604800"),
    (_set("resource_sharing.grace_seconds", 1e300),
     "resource_sharing.grace_seconds: Input should be less than or equal to 604800"),
    (_set("nodes.1.mode_overrides", {"gpu_interval_ms": 1e300}),
     "nodes[1].mode_overrides.gpu_interval_ms: Input should be less than or equal to 3600000"),
    (_set("nodes.1.mode_overrides", {"gpu_interval_ms": INF}),
     "nodes[1].mode_overrides.gpu_interval_ms: Input should be a finite number"),
]


@pytest.mark.parametrize("mutate, expected", SIZE_PROBLEMS, ids=[m.__name__ for m, _ in SIZE_PROBLEMS])
def test_sizes_and_numbers_that_crash_later_are_refused_in_one_line(mutate, expected):
    data = shipped()
    mutate(data)
    line = one_problem(data)
    assert line.startswith(expected), line


def test_a_fractional_cpu_count_is_named_rather_than_the_share_above_it():
    data = shipped()
    data["nodes"][1]["cpu_count"] = 0.5  # max_share_cpu is 2: the size is the problem, and it is named
    assert one_problem(data).startswith("nodes[1].cpu_count: must be a whole number")


def test_whole_sizes_written_as_floats_and_the_largest_node_are_accepted():
    from grid_flows.adapters.ray.cluster import ray_start_args

    data = shipped()
    data["nodes"][1].update(cpu_count=4.0, gpu_count=1.0)
    data["nodes"][2].update(cpu_count=4096, gpu_count=64, memory_gb=65536)
    data["nodes"][2]["resource_sharing"].update(max_share_cpu=4096, max_share_gpu=64, max_share_memory_gb=65536)
    spec = parse_cluster(data)
    assert spec.node("gpu1").size == Resources(cpu=4, gpu=1, memory=8 * GIB)
    args = ray_start_args(spec.node("gpu2"), "10.0.0.1:6379")
    assert "--num-cpus=4096" in args and "--num-gpus=64" in args and f"--memory={65536 * GIB}" in args


def test_default_sizes_still_validate():
    spec = ClusterSpec.model_validate({"nodes": [{"name": "h", "role": "head"}]})
    assert spec.head.size == Resources(cpu=1, gpu=0, memory=2 * GIB)


FINITE_FIELDS = [
    "nodes.1.cpu_count", "nodes.1.gpu_count", "nodes.1.memory_gb",
    "nodes.1.resource_sharing.max_share_cpu", "nodes.1.resource_sharing.max_share_gpu",
    "nodes.1.resource_sharing.max_share_memory_gb",
    "nodes.1.mode_overrides.vram_cap", "nodes.1.mode_overrides.gpu_interval_ms",
    "resource_sharing.rebalance_interval_seconds", "resource_sharing.monitoring_interval_seconds",
    "resource_sharing.default_boost_duration_seconds", "resource_sharing.max_boost_duration_seconds",
    "resource_sharing.min_runtime_seconds", "resource_sharing.grace_seconds", "resource_sharing.excess_threshold",
    "resource_sharing.thresholds.cpu.high", "resource_sharing.thresholds.cpu.low",
    "resource_sharing.thresholds.memory.high", "resource_sharing.thresholds.gpu.low",
]


@pytest.mark.parametrize("value", [INF, -INF, NAN], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("path", FINITE_FIELDS)
def test_every_float_field_refuses_inf_and_nan(path, value):
    data = shipped()
    data["nodes"][1]["mode_overrides"] = {}
    _set(path, value)(data)
    expected = re.sub(r"\.(\d+)", r"[\1]", path)
    assert one_problem(data) == f"{expected}: Input should be a finite number"


ADDRESSES_OK = ["10.0.0.1", "gpu-master", "gpu1.lab.example.com", "localhost", "[::1]", "[fe80::1]",
                "[2001:db8::7]", "10.0.0.1:6379", "gpu1.lab:8265", "[::1]:6379", "h:1", "h:65535"]
ADDRESSES_BAD = [
    "1.2.3.4 --dashboard-host=0.0.0.0", "1.2.3.4\t", " 1.2.3.4", "gpu1\n", "host;rm", "-gpu", "gpu-", "a..b",
    "a_b", "999.1.1.1", "1.2.3", "::1", "fe80::1:6379", "[::1", "[::1]x", "[1.2.3.4]", "[::1%eth0]", "",
    "a" * 64, ".".join(["a" * 63] * 4) + ".a", "h:0", "h:65536", "h:", "h:+80", "h:80:80", "[::1]:", "h:８０",
]


@pytest.mark.parametrize("address", ADDRESSES_OK)
def test_valid_worker_addresses_are_accepted(address):
    data = shipped()
    data["nodes"][1]["address"] = address
    assert parse_cluster(data).node("gpu1").address == address


@pytest.mark.parametrize("address", ADDRESSES_BAD)
def test_addresses_that_are_not_host_or_host_port_are_refused(address):
    data = shipped()
    data["nodes"][1]["address"] = address
    line = one_problem(data)
    assert line.startswith("nodes[1].address: "), line
    assert line.endswith(repr(address)), line


def test_a_bad_port_is_named():
    data = shipped()
    data["nodes"][1]["address"] = "gpu1:70000"
    assert one_problem(data) == "nodes[1].address: port must be a number from 1 to 65535, got 'gpu1:70000'"


@pytest.mark.parametrize("address", ["10.0.0.1:6379", "[::1]:6379", "gpu-master:6380", "[::1]", "[fd00::1]"])
def test_the_heads_address_is_a_host_name_or_ipv4_without_a_port(address):
    # ray-args appends :6379, and prints through rich, which would take "[fd00::1]" for markup
    data = shipped()
    data["nodes"][0]["address"] = address
    line = one_problem(data)
    assert line.startswith(
        "nodes[0].address: the head's address must be a host name or IPv4 address without a port"
    ), line
    assert line.endswith(repr(address))


HEAD_ADDRESSES_OK = [a for a in ADDRESSES_OK if ":" not in a]


@pytest.mark.parametrize("address", HEAD_ADDRESSES_OK)
def test_every_valid_head_address_gives_one_ray_start_flag(address):
    # what `grid node ray-args WORKER` does with the head's address
    pytest.importorskip("ray")
    from ray._private.services import parse_address

    from grid_flows.adapters.ray.cluster import ray_start_args

    data = shipped()
    data["nodes"][0]["address"] = address
    spec = parse_cluster(data)
    head_address = f"{spec.head.address}:6379"
    args = ray_start_args(spec.node("gpu1"), head_address)
    assert " ".join(args).split() == args
    assert args[0] == f"--address={head_address}"
    assert parse_address(head_address) == (address, "6379")


@pytest.mark.parametrize("address", HEAD_ADDRESSES_OK)
def test_grid_node_ray_args_prints_every_valid_head_address_whole(tmp_path, capsys, address):
    from tests.grid_cli import grid_cli

    data = shipped()
    data["nodes"][0]["address"] = address
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    code, out, _ = grid_cli(capsys, "node", "ray-args", "gpu1", "--file", str(path))
    assert code == 0
    assert out.split()[0] == f"--address={address}:6379"
    assert len(out.split()) == 6


@pytest.mark.parametrize("commands", [[], ["python"], ["/usr/bin/env", "my tool", "./run.sh"]])
def test_offload_commands_accepted(commands):
    data = shipped()
    data["nodes"][1]["offload_commands"] = commands
    assert parse_cluster(data).node("gpu1").offload_commands == commands


@pytest.mark.parametrize(
    "entry, message",
    [("", "must not be empty"), ("py\nthon", "must not hold NUL or line breaks, got 'py\\nthon'"),
     ("py\x00", "must not hold NUL or line breaks"), ("py\r", "must not hold NUL or line breaks"),
     (5, "Input should be a valid string")],
)
def test_offload_commands_entries_are_checked_one_by_one(entry, message):
    data = shipped()
    data["nodes"][1]["offload_commands"] = ["python", entry]
    line = one_problem(data)
    assert line.startswith(f"nodes[1].offload_commands[1]: {message}"), line


def nodes(count: int) -> list[dict]:
    return [{"name": "head", "role": "head"}] + [{"name": f"w{i}"} for i in range(count - 1)]


def test_at_most_max_nodes_nodes():
    assert len(parse_cluster({"nodes": nodes(models_module.MAX_NODES)}).nodes) == 1000


@pytest.mark.parametrize("extra", [1, 199_000])
def test_more_nodes_than_the_limit_is_one_line(extra):
    count = models_module.MAX_NODES + extra
    data = {"nodes": [{"name": "head", "role": "head"}] + [{"bad": 1}] * (count - 1)}  # invalid nodes: not checked
    assert problem_lines(data) == [f"nodes: {count} nodes; at most 1000 are supported"]


def test_a_top_level_name_in_a_cluster_definition_says_to_use_blocks_apply_name():
    data = shipped()
    data["name"] = "lab"
    assert problem_lines(data) == [
        "name: a cluster file does not name its cluster; the name is the GridCluster block's: "
        "use `grid blocks apply FILE --name NAME` instead"
    ]


def test_a_top_level_name_is_reported_with_the_other_problems():
    data = shipped()
    data["name"] = "lab"
    data["nodes"][1]["cpu_count"] = 0.5
    lines = problem_lines(data)
    assert len(lines) == 2
    assert lines[0].startswith("name: ") and lines[1].startswith("nodes[1].cpu_count: ")


def test_the_cluster_name_still_comes_from_the_block():
    from grid_flows.adapters.prefect.blocks import GridCluster

    spec = parse_cluster(shipped())
    assert spec.name == "default"
    assert GridCluster.from_spec(spec).to_spec(name="lab").name == "lab"
    # a spec dumped and validated again (the test helpers do this) keeps its name
    again = ClusterSpec.model_validate({**spec.model_dump(mode="json"), "name": "lab"})
    assert again.name == "lab"


def test_each_node_reads_as_one_line():
    spec = load_cluster_file(CLUSTER_YAML)
    assert [n.describe() for n in spec.nodes] == [
        "head, 1 CPU, 0 GPU, 2 GiB; lends nothing; mode aggressive",
        "worker, 4 CPU, 1 GPU, 8 GiB; lends 2 CPU, 1 GPU, 4 GiB; mode conservative",
        "worker, 2 CPU, 0 GPU, 4 GiB; lends 1 CPU, 2 GiB; mode default",
    ]


def test_the_cluster_block_summary_follows_its_nodes_whatever_it_was_given():
    # The UI shows a list of objects as one clipped JSON line: the block carries a line per node.
    from grid_flows.adapters.prefect.blocks import GridCluster

    spec = load_cluster_file(CLUSTER_YAML)
    block = GridCluster.from_spec(spec)
    assert block.summary.split(" · ") == [f"{n.name}: {n.describe()}" for n in spec.nodes]
    assert list(GridCluster.model_fields)[0] == "summary"  # the UI shows fields in this order
    stale = {**block.model_dump(mode="json"), "summary": "edited by hand"}
    stale["nodes"] = stale["nodes"][:2]
    assert GridCluster.model_validate(stale).summary == " · ".join(f"{n.name}: {n.describe()}" for n in spec.nodes[:2])


def test_a_boost_record_shows_memory_and_duration_with_units_and_reads_back_the_same():
    from grid_flows.adapters.prefect.blocks import GridBoost
    from grid_flows.adapters.prefect.records import boost_from_data
    from grid_flows.core import ledger
    from grid_flows.core.models import DEFAULT_CLUSTER, utcnow

    boost = ledger.new_boost("a" * 32, source="gpu1", target="gpu-master", resources=Resources(cpu=1, memory=2 * GIB),
                             priority=Priority.normal, duration_seconds=1800, now=utcnow(), origin="api",
                             requested_by="me@host", cluster=DEFAULT_CLUSTER)
    data = GridBoost.from_boost(boost).model_dump(mode="json")
    assert (data["memory"], data["duration"], data["memory_bytes"]) == ("2 GiB", "30 min", 2 * GIB)
    assert boost_from_data(data) == boost
    assert GridBoost.model_fields["memory"].title == "Memory"
