"""Unit tests of grid_flows.core.cluster_file: what a cluster FILE may hold beyond the ClusterSpec rules."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from grid_flows.core.cluster_file import MAX_FILE_BYTES, load_cluster_file
from grid_flows.errors import InvalidClusterFile

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "blocks" / "cluster.yaml"
SHIPPED = CLUSTER_YAML.read_text()


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "cluster.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(InvalidClusterFile) as info:
        load_cluster_file(path)
    return str(info.value)


# --- duplicate keys -------------------------------------------------------------------


def test_a_second_nodes_key_is_an_error_with_its_line(tmp_path):
    text = SHIPPED + "nodes:\n  - {name: solo, role: head}\n"
    line = text.splitlines().index("nodes:", 20) + 1
    path = write(tmp_path, text)
    first = SHIPPED.splitlines().index("nodes:") + 1
    assert error_of(path) == f"{path}: duplicate key 'nodes' at line {line}, column 1 (first at line {first})"


@pytest.mark.parametrize(
    "text, key, line, first",
    [
        ("nodes:\n  - name: h\n    role: head\n    name: g\n", "name", 4, 2),
        ("nodes:\n  - {name: h, role: head, role: worker}\n", "role", 2, 2),
        ("nodes:\n  - {name: h, role: head}\nresource_sharing:\n  grace_seconds: 1\n  enabled: true\n"
         "  grace_seconds: 2\n", "grace_seconds", 6, 4),
        ("nodes: [{name: h, role: head}]\nresource_sharing:\n  thresholds:\n    cpu: {high: 0.9, high: 0.5}\n",
         "high", 4, 4),
    ],
)
def test_a_duplicate_key_anywhere_is_one_line_naming_key_and_line(tmp_path, text, key, line, first):
    path = write(tmp_path, text)
    message = error_of(path)
    assert "\n" not in message
    assert re.fullmatch(
        rf"{re.escape(str(path))}: duplicate key '{key}' at line {line}, column \d+ \(first at line {first}\)", message
    ), message


def test_merge_keys_may_still_be_overridden(tmp_path):
    text = (
        "nodes:\n"
        "  - {name: h, role: head}\n"
        "  - <<: {cpu_count: 2, memory_gb: 4}\n"
        "    name: w\n"
        "    cpu_count: 4\n"
    )
    spec = load_cluster_file(write(tmp_path, text))
    assert (spec.node("w").cpu_count, spec.node("w").memory_gb) == (4, 4)


def test_the_same_key_in_two_mappings_is_fine(tmp_path):
    text = "nodes:\n  - {name: h, role: head, cpu_count: 2}\n  - {name: w, cpu_count: 2}\n"
    assert [n.name for n in load_cluster_file(write(tmp_path, text)).nodes] == ["h", "w"]


# --- size -----------------------------------------------------------------------------


def test_a_file_over_the_size_limit_is_refused_before_parsing(tmp_path):
    assert MAX_FILE_BYTES == 1024**2
    path = write(tmp_path, SHIPPED + "\t: [ not yaml\n" + "#" * MAX_FILE_BYTES)  # malformed: never parsed
    assert error_of(path) == f"{path}: too large: a cluster file is at most 1 MiB"


def test_a_file_at_the_size_limit_is_read(tmp_path):
    text = SHIPPED + "#" * (MAX_FILE_BYTES - len(SHIPPED.encode()) - 1) + "\n"
    assert len(text.encode()) == MAX_FILE_BYTES
    assert load_cluster_file(write(tmp_path, text)).head.name == "gpu-master"


def test_a_file_with_too_many_nodes_is_one_line(tmp_path):
    nodes = "".join(f"  - {{name: w{i}}}\n" for i in range(1000))
    path = write(tmp_path, "nodes:\n  - {name: h, role: head}\n" + nodes)
    assert error_of(path).splitlines() == [f"{path}: invalid cluster definition",
                                           "nodes: 1001 nodes; at most 1000 are supported"]


def test_a_file_that_is_not_utf8_is_one_line(tmp_path):
    path = write(tmp_path, SHIPPED.encode() + b"# \xff\n")
    assert error_of(path) == f"{path}: cannot read: not UTF-8 text (byte {len(SHIPPED.encode()) + 2})"


# --- a top-level name -----------------------------------------------------------------


def test_a_top_level_name_says_to_use_blocks_apply_name(tmp_path):
    path = write(tmp_path, "name: lab\n" + SHIPPED)
    assert error_of(path).splitlines() == [
        f"{path}: invalid cluster definition",
        "name: a cluster file does not name its cluster; the name is the GridCluster block's: "
        "use `grid blocks apply FILE --name NAME` instead",
    ]


# --- .inf and .nan written in YAML ----------------------------------------------------

FLOAT_KEYS = [
    # (YAML path in the shipped file, key) with the problem line expected
    ("nodes[1]", "cpu_count"), ("nodes[1]", "gpu_count"), ("nodes[1]", "memory_gb"),
    ("nodes[1].resource_sharing", "max_share_cpu"), ("nodes[1].resource_sharing", "max_share_gpu"),
    ("nodes[1].resource_sharing", "max_share_memory_gb"),
    ("nodes[1].mode_overrides", "vram_cap"), ("nodes[1].mode_overrides", "gpu_interval_ms"),
    ("resource_sharing", "rebalance_interval_seconds"), ("resource_sharing", "monitoring_interval_seconds"),
    ("resource_sharing", "default_boost_duration_seconds"), ("resource_sharing", "max_boost_duration_seconds"),
    ("resource_sharing", "min_runtime_seconds"), ("resource_sharing", "grace_seconds"),
    ("resource_sharing", "excess_threshold"),
    ("resource_sharing.thresholds.cpu", "high"), ("resource_sharing.thresholds.memory", "low"),
]


def _with_yaml_value(where: str, key: str, text: str) -> str:
    data = yaml.safe_load(SHIPPED)
    target = data
    for part in re.findall(r"[a-z_]+|\[\d+\]", where):
        target = target[int(part[1:-1])] if part.startswith("[") else target.setdefault(part, {})
    target[key] = "SENTINEL"
    return yaml.safe_dump(data, sort_keys=False).replace("SENTINEL", text)


@pytest.mark.parametrize("text", [".inf", "-.inf", ".nan", ".Inf", ".NaN"])
@pytest.mark.parametrize("where, key", FLOAT_KEYS, ids=[f"{w}.{k}" for w, k in FLOAT_KEYS])
def test_yaml_inf_and_nan_are_refused_for_every_float_field(tmp_path, where, key, text):
    path = write(tmp_path, _with_yaml_value(where, key, text))
    assert error_of(path).splitlines() == [
        f"{path}: invalid cluster definition",
        f"{where}.{key}: Input should be a finite number",
    ]


# --- the shipped file -----------------------------------------------------------------


def test_the_shipped_file_still_loads():
    assert load_cluster_file(CLUSTER_YAML).head.name == "gpu-master"


def test_the_test_cluster_still_validates():
    from grid_flows.core.cluster_file import parse_cluster
    from tests.conftest import TEST_CLUSTER

    assert [n.name for n in parse_cluster(TEST_CLUSTER).nodes] == ["gpu-master", "gpu1", "gpu2"]
