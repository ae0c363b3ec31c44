"""Offload helpers without Ray or a server: whole-word classification, no shell, candidates."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

from grid_flows import offload as core
from grid_flows.flows.offload import choose, validate_command
from grid_flows.models import ClusterSpec, InvalidRequest, Resources
from grid_flows.offload import ProcInfo, classify, command_words, has_word, select_candidates, skip_reason
from grid_flows.scheduler import PlacementKind

NOW = 1_000_000.0
GIB = 1024**3


@pytest.mark.parametrize(
    "cmdline,word,expected",
    [
        (["ray", "start", "--head"], "tar", False),  # the bug of the system we replace
        (["/usr/bin/tar", "-czf", "backup.tgz", "."], "tar", True),
        (["tar"], "tar", True),
        (["python", "restart_services.py"], "tar", False),
        (["gzip", "data.tar"], "tar", False),  # data.tar is one word
        (["sh", "-c", "tar xf a.tgz"], "tar", True),
        (["tarball-maker"], "tar", False),
        (["/opt/py/bin/python3.11", "train.py"], "python", True),
        (["pythonic-tool"], "python", False),
        ("make -j8 all", "make", True),
        ("automake --version", "make", False),
        (["--target=make"], "make", True),  # `=` separates words
    ],
)
def test_has_word_matches_whole_words_only(cmdline, word, expected):
    assert has_word(cmdline, word) is expected


def test_command_words_split_on_separators_but_keep_names_whole():
    assert command_words(["/usr/bin/python3", "start.py", "--out=/data/x.tar"]) == [
        "usr", "bin", "python3", "start.py", "--out", "data", "x.tar"
    ]


@pytest.mark.parametrize(
    "cmdline,expected",
    [
        (["ray", "start", "--head"], "own"),
        (["/venv/bin/python", "/venv/lib/python3.11/site-packages/ray/_private/workers/default_worker.py"], "own"),
        (["ray::IDLE"], "own"),
        (["/venv/bin/python", "-m", "prefect", "server", "start"], "own"),
        (["/usr/sbin/sshd", "-D"], "shell"),
        (["bash"], "shell"),
        (["-bash"], "shell"),
        (["bash", "-c", "make -j8"], "workload"),
        (["sudo", "python", "train.py"], "workload"),
        (["tar", "-czf", "x.tgz", "/home"], "workload"),
        (["/usr/lib/systemd/systemd", "--user"], "system"),
        (["restart-daemon", "start"], "other"),  # no "tar" inside "start"/"restart"
        (["sleep", "100"], "other"),
    ],
)
def test_classify(cmdline, expected):
    assert classify(cmdline) == expected


def proc(pid=100, cmd=("python", "train.py"), uid=1000, age=600.0, cpu=150.0, rss=GIB, ppid=1, name=None):
    return ProcInfo(pid=pid, name=name or os.path.basename(cmd[0]) if cmd else (name or ""), cmdline=tuple(cmd),
                    uid=uid, username=f"u{uid}", ppid=ppid, create_time=NOW - age, cpu_percent=cpu, rss=rss,
                    cwd="/home/u")


def test_candidates_are_heavy_long_running_user_processes():
    procs = [
        proc(1, ("python", "train.py"), cpu=180.0),
        proc(2, (), name="kworker/0:1", ppid=2),                          # kernel thread
        proc(3, ("/usr/sbin/vendor-agentd", "--daemon"), uid=0, cpu=80.0),  # root daemon
        proc(12, ("/usr/sbin/cron", "-f"), uid=0),                        # known system program
        proc(4, ("/usr/bin/dbus-daemon", "--system"), uid=101),           # system account
        proc(5, ("ffmpeg", "-i", "a.mkv", "b.mp4"), age=10.0),            # short-lived
        proc(6, ("bash",), cpu=300.0),                                    # interactive shell
        proc(7, ("/venv/bin/python", "-m", "ray.util.x", "raylet"), cpu=99.0),  # our own
        proc(8, ("sleep", "1000"), cpu=0.0, rss=1024**2),                 # light
        proc(9, ("tar", "-czf", "/tmp/b.tgz", "/home"), uid=0, cpu=95.0),  # root-run user workload
        proc(10, ("ray", "start", "--head"), cpu=50.0),                   # "tar" inside "start": not a workload, own
        proc(11, ("java", "-jar", "big.jar"), cpu=5.0, rss=4 * GIB),       # memory-heavy
    ]
    chosen, skipped = select_candidates(procs, NOW, own_pids=[12345])
    assert [c.proc.pid for c in chosen] == [1, 9, 11]  # heaviest CPU first
    why = {s.proc.pid: s.why for s in skipped}
    assert why[2] == "kernel thread"
    assert why[3] == "root process that is not a known workload"
    assert why[12] == "system process"
    assert why[4] == "system account (uid 101)"
    assert why[5].startswith("short-lived")
    assert why[6] == "interactive shell or tool"
    assert why[7] == "Ray/Prefect/grid process"
    assert why[8].startswith("light")
    assert why[10] == "Ray/Prefect/grid process"
    assert chosen[0].resources == Resources(cpu=2, memory=GIB)
    assert chosen[1].resources.cpu == 1


def test_own_pids_are_skipped():
    assert skip_reason(proc(42), NOW, own_pids=[42]) == "our own process"
    assert skip_reason(proc(42), NOW) is None


def test_offload_command_is_shell_quoted_and_round_trips():
    argv = ["python", "-c", "print('a b'); x=$HOME", "*"]
    line = core.offload_command(argv, "gpu1", Resources(cpu=2, memory=GIB), "/srv/my proj")
    words = shlex.split(line)
    assert words[:3] == ["grid", "offload", "run"]
    assert words[words.index("--") + 1:] == argv
    assert words[words.index("--cwd") + 1] == "/srv/my proj"
    assert "--memory" in words and "1024MiB" in words


def test_validate_command_refuses_a_string_and_empty():
    with pytest.raises(InvalidRequest, match="not one string"):
        validate_command("echo hi; rm -rf /")
    with pytest.raises(InvalidRequest):
        validate_command([])
    with pytest.raises(InvalidRequest):
        validate_command(["echo", 3])
    assert validate_command(("echo", "x")) == ["echo", "x"]


class FakeQueue:
    def __init__(self):
        self.items = []

    def put(self, item, timeout=None):
        self.items.append(item)


def test_run_command_passes_argv_without_a_shell(tmp_path):
    spec = ClusterSpec.model_validate({"nodes": [{"name": "n", "role": "head", "mode": "aggressive"}]})
    weird = ["$HOME; rm -rf / && echo \"x\" | cat > y *", "`id`", "a b", ""]
    q = FakeQueue()
    env = core.child_env({"GRID_TEST": "1"})
    result = core.run_command([sys.executable, "-c", "import sys, json; print(json.dumps(sys.argv[1:]))", *weird],
                              str(tmp_path), env, spec.head, q, timeout_seconds=60)
    assert result.exit_code == 0
    import json

    lines = [i[1] for i in q.items if i[0] == "stdout"]
    assert json.loads(lines[0]) == weird
    assert q.items[0][0] == "start" and q.items[-1] == ("end", 0)
    assert not (tmp_path / "y").exists() and list(tmp_path.iterdir()) == []  # nothing was interpreted


def test_run_command_never_uses_a_shell(monkeypatch, tmp_path):
    seen = {}
    real = subprocess.Popen

    def spy(args, **kwargs):
        seen.update(kwargs, args=args)
        return real(args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", spy)
    spec = ClusterSpec.model_validate({"nodes": [{"name": "n", "role": "head", "mode": "aggressive"}]})
    core.run_command(["true"], str(tmp_path), core.child_env(), spec.head, FakeQueue(), timeout_seconds=30)
    assert seen["shell"] is False and seen["start_new_session"] is True
    assert seen["args"] == ["true"] and seen["cwd"] == str(tmp_path)


def test_run_command_reports_missing_program_and_cwd(tmp_path):
    spec = ClusterSpec.model_validate({"nodes": [{"name": "n", "role": "head", "mode": "aggressive"}]})
    r = core.run_command(["no-such-program-xyz"], str(tmp_path), core.child_env(), spec.head, FakeQueue())
    assert r.exit_code == 127 and "command not found" in r.error
    r = core.run_command(["true"], str(tmp_path / "missing"), core.child_env(), spec.head, FakeQueue())
    assert r.exit_code is None and "does not exist" in r.error


def test_child_env_is_minimal_plus_extra():
    env = core.child_env({"A": "1"}, base={"PATH": "/bin", "HOME": "/h", "RAY_ADDRESS": "x", "SECRET": "s"},
                         node="gpu1")
    assert env == {"PATH": "/bin", "HOME": "/h", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1",
                   "GRID_OFFLOAD_NODE": "gpu1", "A": "1"}


class Info:
    def __init__(self, free=Resources(), lend=Resources(), alive=True):
        self.free, self.lendable_free, self.alive = free, lend, alive


SPEC = ClusterSpec.model_validate({
    "nodes": [
        {"name": "head", "role": "head", "cpu_count": 1},
        {"name": "w1", "cpu_count": 4, "resource_sharing": {"can_share": True, "max_share_cpu": 2}},
        {"name": "w2", "cpu_count": 4},
    ]
})


def test_choose_uses_head_then_a_lenders_share_never_private_capacity():
    nodes = {"head": Info(free=Resources(cpu=1)), "w1": Info(free=Resources(cpu=4), lend=Resources(cpu=2)),
             "w2": Info(free=Resources(cpu=4))}
    _, _, p = choose(SPEC, nodes, Resources(cpu=1), None, "local_first")
    assert (p.kind, p.node) == (PlacementKind.target, "head")
    _, _, p = choose(SPEC, nodes, Resources(cpu=2), None, "local_first")
    assert (p.kind, p.node) == (PlacementKind.offload, "w1")
    _, strategy, p = choose(SPEC, nodes, Resources(cpu=1), "w2", "local_first")
    assert strategy == "node_specific" and p.kind is PlacementKind.queue  # w2 lends nothing
    _, _, p = choose(SPEC, nodes, Resources(cpu=3), None, "local_first")
    assert p.kind is PlacementKind.queue
    with pytest.raises(InvalidRequest, match="unknown node"):
        choose(SPEC, nodes, Resources(cpu=1), "w9", "local_first")
