"""The `grid` command against the real server and cluster: user errors, block apply, status."""

from __future__ import annotations

from pathlib import Path

import pytest

from grid_flows import list_boosts
from grid_flows.adapters.ray import cluster as rc
from grid_flows.adapters.prefect.store import BoostStore
from grid_flows.errors import ClusterNotConfigured
from tests.grid_cli import grid_cli

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
REPO = Path(__file__).resolve().parents[2]


BAD_REQUESTS = [
    (["boost", "request", "gpu9", "--cpu", "1"], "unknown node 'gpu9'"),
    (["boost", "request", "gpu-master", "--cpu", "1", "--source", "gpu7"], "unknown node 'gpu7'"),
    (["boost", "request", "gpu-master", "disk", "2"], "unknown resource 'disk'"),
    (["boost", "request", "gpu-master", "--cpu", "-1"], "must not be negative"),
    (["boost", "request", "gpu-master", "cpu", "0"], "all were zero"),
    (["boost", "request", "gpu-master", "--cpu", "nan"], "NaN"),
    (["boost", "request", "gpu-master", "--cpu", "inf"], "finite"),
    (["boost", "request", "gpu-master", "--memory", "4 parsecs"], "memory must be bytes or a size"),
    (["boost", "request", "gpu-master", "--cpu", "1", "--duration", "0"], "duration must be greater than zero"),
    (["boost", "request", "gpu-master", "--cpu", "1", "--duration", "-5"], "must not be negative"),
    (["boost", "request", "gpu-master", "--cpu", "1", "--duration", "8d"], "longer than the limit of 7 d"),
    (["boost", "request", "gpu1", "--cpu", "1", "--source", "gpu1"], "cannot lend to itself"),
    (["boost", "request", "gpu-master", "--cpu", "1", "--priority", "urgent"], "unknown value 'urgent'"),
    (["boost", "release", "ffffffffffff"], "unknown boost 'ffffffffffff'"),
]


@pytest.mark.parametrize("args,message", BAD_REQUESTS, ids=[" ".join(a) for a, _ in BAD_REQUESTS])
def test_bad_input_exits_2_with_one_line_and_leaves_nothing(grid, capsys, args, message):
    with BoostStore() as store:
        records_before = len(store.list(include_ended=True))
    code, out, err = grid_cli(capsys, *args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err + out
    assert len(err.strip().splitlines()) == 1
    with BoostStore() as store:
        assert len(store.list(include_ended=True)) == records_before
    assert rc.grid_groups() == {}


def test_no_capacity_is_a_clear_error_not_a_traceback(grid, capsys):
    code, _, err = grid_cli(capsys, "boost", "request", "gpu-master", "--cpu", "3", "--source", "gpu1")
    assert code == 3
    assert "no node can lend 3 CPU" in err and "gpu1 lends at most 2 CPU" in err
    assert rc.grid_groups() == {}


def test_seed_form_and_multi_resource_form_then_status_and_release_by_prefix(grid, capsys):
    code, out, err = grid_cli(
        capsys, "boost", "request", "gpu-master", "cpu", "2", "--priority", "high", "--duration", "1800", "--source", "gpu1"
    )
    assert code == 0, err
    code, out, err = grid_cli(capsys, "boost", "request", "gpu-master", "--cpu", "1", "--memory", "1GiB")
    assert code == 0, err
    first, second = sorted(list_boosts(), key=lambda b: b.created_at)
    assert (first.source, first.resources.cpu, first.priority.value) == ("gpu1", 2, "high")
    assert (second.source, second.resources.memory) == ("gpu2", 1024**3)

    code, out, _ = grid_cli(capsys, "boost", "status")
    assert code == 0
    assert "gpu1 -> gpu-master" in out and "gpu2 -> gpu-master" in out
    assert first.id[:8] in out
    assert "29 min left" in out or "30 min left" in out
    total_line = next(line for line in out.splitlines() if "total" in line)
    assert "3" in total_line and "1 GiB" in total_line

    code, out, _ = grid_cli(capsys, "boost", "status", "--node", "gpu2", "--json")
    assert code == 0
    assert '"source": "gpu2"' in out and '"source": "gpu1"' not in out

    code, out, err = grid_cli(capsys, "boost", "release", first.id[:8])
    assert code == 0, err
    assert [b.id for b in list_boosts()] == [second.id]


_STATUS_IN_A_FRESH_PROCESS = """
import json, sys
from grid_flows.cli.app import main
sys.argv = ["grid", "boost", "status", "--json", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    assert exc.code == 0, exc.code
print("PREFECT_IMPORTED", "prefect" in sys.modules)
"""


def _status_in_a_fresh_process(grid, *args: str, **env: str) -> tuple[list[dict], bool]:
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _STATUS_IN_A_FRESH_PROCESS, *args], env={**grid.env(), **env},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    body, _, last = done.stdout.rstrip().rpartition("\n")
    return json.loads(body), last == "PREFECT_IMPORTED True"


def test_status_in_a_fresh_process_reads_over_plain_http_and_shows_what_prefects_client_shows(grid):
    from grid_flows import release_boost, request_boost

    kept = request_boost("gpu-master", cpu=1, source="gpu1", duration="10m")
    ended = request_boost("gpu-master", cpu=1, source="gpu2", duration="10m")
    release_boost(ended.id)

    def shown(rows):
        return [(r["id"], r["state"], r["source"], r["resources"]["cpu"]) for r in rows]

    for args, expected in (([], [kept.id]), (["--all"], None)):
        quick, quick_imported = _status_in_a_fresh_process(grid, *args)
        # A TLS setting is one the plain read leaves to Prefect's client, which then reads instead.
        full, full_imported = _status_in_a_fresh_process(grid, *args, PREFECT_API_TLS_INSECURE_SKIP_VERIFY="true")
        assert (quick_imported, full_imported) == (False, True)
        assert shown(quick) == shown(full)
        if expected is not None:
            assert [r["id"] for r in quick] == expected
        else:
            assert {kept.id: "active", ended.id: "released"}.items() <= {r["id"]: r["state"] for r in quick}.items()


def test_status_prefixes_are_unique_and_an_ambiguous_prefix_is_refused():
    from grid_flows.cli.app import unique_prefixes

    ids = ["abcdef0123456789", "abcdef0199999999", "99999999aaaa"]
    assert unique_prefixes(ids) == {"abcdef0123456789": "abcdef012", "abcdef0199999999": "abcdef019",
                                    "99999999aaaa": "99999999"}
    records = [_any_boost().model_copy(update={"id": i}) for i in ids]
    store = BoostStore()  # resolve() over given records needs no server
    with pytest.raises(Exception, match="ambiguous: it matches abcdef0123456789, abcdef0199999999"):
        store.resolve("abcdef01", records)
    assert store.resolve("abcdef019", records).id == "abcdef0199999999"
    assert store.resolve("99999999aaaa", records).id == "99999999aaaa"


def _any_boost():
    from datetime import datetime, timezone

    from grid_flows.core.ledger import new_boost
    from grid_flows.core.models import DEFAULT_CLUSTER, Priority, Resources

    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    return new_boost("x", source="gpu1", target="gpu-master", resources=Resources(cpu=1),
                     priority=Priority.normal, duration_seconds=60, now=now, cluster=DEFAULT_CLUSTER)


def test_blocks_apply_saves_a_valid_file_and_nothing_on_error(grid, capsys, tmp_path):
    code, out, err = grid_cli(capsys, "blocks", "apply", str(REPO / "blocks" / "cluster.yaml"), "--name", "from-file")
    assert code == 0, err
    assert "Saved GridCluster 'from-file'" in out
    with BoostStore() as store:
        assert [n.name for n in store.load_cluster("from-file").nodes] == ["gpu-master", "gpu1", "gpu2"]

    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes:\n  - name: a\n    role: head\n    resource_sharing: {max_share_cpu: -1}\n")
    code, _, err = grid_cli(capsys, "blocks", "apply", str(bad), "--name", "never-saved")
    assert code == 2
    assert "nodes[0].resource_sharing.max_share_cpu" in err
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("nodes: [a\n")
    code, _, err = grid_cli(capsys, "blocks", "apply", str(malformed), "--name", "never-saved")
    assert code == 2 and "malformed YAML at line" in err
    with BoostStore() as store, pytest.raises(ClusterNotConfigured):
        store.load_cluster("never-saved")


def test_ray_args_give_the_label_and_the_lend_tokens(capsys):
    code, out, _ = grid_cli(capsys, "node", "ray-args", "gpu1", "--address", "10.1.2.3:6379",
                            "--file", str(REPO / "blocks" / "cluster.yaml"))
    assert code == 0
    assert out.split() == [
        "--address=10.1.2.3:6379", "--num-cpus=4", "--num-gpus=1", f"--memory={8 * 1024**3}",
        '--labels={"grid.node":"gpu1"}',
        '--resources={"grid.lend.CPU_milli":2000,"grid.lend.GPU_milli":1000,"grid.lend.memory_MiB":4096}',
    ]
    code, _, err = grid_cli(capsys, "node", "ray-args", "gpu1", "--file", str(REPO / "blocks" / "cluster.yaml"))
    assert code == 2 and "--address" in err
