"""Offload helpers without Ray or a server: whole-word classification, no shell, candidates."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from grid_flows.core import offload_rules
from grid_flows.adapters.host import processes
from grid_flows.flows.offload import choose, validate_command
from grid_flows.core.models import ClusterSpec, Resources
from grid_flows.errors import InvalidRequest
from grid_flows.core.offload_rules import (
    ProcInfo, classify, command_words, has_word, select_candidates, skip_reason,
)
from grid_flows.core.placement import PlacementKind

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
    line = offload_rules.offload_command(argv, "gpu1", Resources(cpu=2, memory=GIB), "/srv/my proj")
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


# A node that allows offloaded commands (they are off by default).
NODE_SPEC = ClusterSpec.model_validate(
    {"nodes": [{"name": "n", "role": "head", "mode": "aggressive", "allow_offload_commands": True}]}
).head


class FakeQueue:
    def __init__(self):
        self.items = []

    def put(self, item, timeout=None):
        self.items.append(item)


def test_run_command_passes_argv_without_a_shell(tmp_path):
    spec = NODE_SPEC
    weird = ["$HOME; rm -rf / && echo \"x\" | cat > y *", "`id`", "a b", ""]
    q = FakeQueue()
    env = processes.child_env({"GRID_TEST": "1"})
    result = processes.run_command([sys.executable, "-c", "import sys, json; print(json.dumps(sys.argv[1:]))", *weird],
                              str(tmp_path), env, spec, q, timeout_seconds=60)
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
    spec = NODE_SPEC
    processes.run_command(["true"], str(tmp_path), processes.child_env(), spec, FakeQueue(), timeout_seconds=30)
    assert seen["shell"] is False and seen["start_new_session"] is True
    assert seen["args"] == ["true"] and seen["cwd"] == str(tmp_path)


def test_run_command_reports_missing_program_and_cwd(tmp_path):
    spec = NODE_SPEC
    r = processes.run_command(["no-such-program-xyz"], str(tmp_path), processes.child_env(), spec, FakeQueue())
    assert r.exit_code == 127 and "command not found" in r.error
    r = processes.run_command(["true"], str(tmp_path / "missing"), processes.child_env(), spec, FakeQueue())
    assert r.exit_code is None and "does not exist" in r.error


def test_child_env_is_minimal_plus_extra():
    env = processes.child_env({"A": "1"}, base={"PATH": "/bin", "HOME": "/h", "RAY_ADDRESS": "x", "SECRET": "s"},
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


def test_choose_ranks_lenders_by_the_pressure_it_is_given():
    from grid_flows.core.placement import Pressure

    spec = ClusterSpec.model_validate({"nodes": [
        {"name": "head", "role": "head", "cpu_count": 1},
        *[{"name": n, "cpu_count": 4, "resource_sharing": {"can_share": True, "max_share_cpu": 2}} for n in ("w1", "w2")],
    ]})
    nodes = {"head": Info(), "w1": Info(lend=Resources(cpu=2)), "w2": Info(lend=Resources(cpu=2))}
    _, _, blind = choose(spec, nodes, Resources(cpu=1), None, "load_balanced")
    _, _, seeing = choose(spec, nodes, Resources(cpu=1), None, "load_balanced", None, {"w1": Pressure(cpu=0.9)})
    assert (blind.node, seeing.node) == ("w1", "w2")  # equal without it: the first; with it: the calm one


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


# --------------------------------------------------------------------------- who may run what


def node(name="n", **fields):
    return ClusterSpec.model_validate({"nodes": [{"name": name, "role": "head", **fields}]}).head


def test_a_node_runs_no_command_unless_it_opts_in():
    why = offload_rules.command_refusal(node("gpu1"), ["python", "train.py"])
    assert "'gpu1'" in why and "allow_offload_commands: true" in why and "\n" not in why
    assert offload_rules.command_refusal(node("gpu1", allow_offload_commands=True), ["python", "train.py"]) == ""


def test_offload_commands_bare_names_match_the_base_name():
    n = node("gpu1", allow_offload_commands=True, offload_commands=["python3", "ffmpeg"])
    assert offload_rules.command_refusal(n, ["/usr/bin/python3", "x.py"]) == ""
    assert offload_rules.command_refusal(n, ["ffmpeg", "-i", "a"]) == ""
    why = offload_rules.command_refusal(n, ["bash", "-c", "id"])
    assert "'gpu1'" in why and "'bash'" in why and "python3, ffmpeg" in why


def test_offload_commands_paths_match_what_argv0_resolves_to_on_the_node(tmp_path):
    tool = tmp_path / "bin" / "tool"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\nexit 0\n")
    tool.chmod(0o755)
    (tmp_path / "link").symlink_to(tool)
    n = node("gpu1", allow_offload_commands=True, offload_commands=[str(tool)])
    assert offload_rules.command_refusal(n, ["anything"]) == ""  # a path entry: only the node can tell
    env = {"PATH": str(tool.parent)}
    assert processes.executable_on_node(n, ["tool"], str(tmp_path), env) == str(tool)
    assert processes.executable_on_node(n, ["./link"], str(tmp_path), env) is None  # admitted; a path: no search
    assert processes.executable_on_node(n, [str(tool)], "/", {}) is None
    with pytest.raises(InvalidRequest, match=r"node 'gpu1' does not allow running '/bin/sh'"):
        processes.executable_on_node(n, ["/bin/sh", "-c", "id"], str(tmp_path), env)
    with pytest.raises(InvalidRequest, match="does not allow running 'tool'"):
        processes.executable_on_node(n, ["tool"], str(tmp_path), {"PATH": "/usr/bin:/bin"})  # another `tool`: none


def test_run_command_refuses_on_the_node_before_starting_anything(monkeypatch, tmp_path):
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a))
    q = FakeQueue()
    r = processes.run_command(["true"], str(tmp_path), processes.child_env(), node("gpu1"), q)
    assert r.exit_code is None and "allow_offload_commands" in r.error
    r = processes.run_command(["bash"], str(tmp_path), processes.child_env(),
                         node("gpu1", allow_offload_commands=True, offload_commands=["python"]), q)
    assert r.exit_code is None and "does not allow running 'bash'" in r.error
    assert started == [] and q.items == []


def test_run_command_execs_the_checked_path(monkeypatch, tmp_path):
    seen = {}
    real = subprocess.Popen

    def spy(args, **kwargs):
        seen.update(kwargs)
        return real(args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", spy)
    true = os.path.realpath("/bin/true")
    n = node("n", allow_offload_commands=True, offload_commands=[true])
    r = processes.run_command(["true"], str(tmp_path), processes.child_env(base={"PATH": os.path.dirname(true)}), n,
                         FakeQueue(), timeout_seconds=30)
    assert r.exit_code == 0 and seen["executable"] == true


SPEC_OPT_IN = ClusterSpec.model_validate({
    "nodes": [
        {"name": "head", "role": "head", "cpu_count": 1},  # allow_offload_commands: false (the default)
        {"name": "w1", "cpu_count": 4, "allow_offload_commands": True,
         "resource_sharing": {"can_share": True, "max_share_cpu": 2}},
        {"name": "w2", "cpu_count": 4, "resource_sharing": {"can_share": True, "max_share_cpu": 4}},
    ]
})


def test_allowed_nodes_names_the_refusing_node_and_the_key():
    from grid_flows.flows.offload import allowed_nodes

    assert allowed_nodes(SPEC_OPT_IN, ["python"]) == ["w1"]
    assert allowed_nodes(SPEC_OPT_IN, ["python"], "w1") == ["w1"]
    with pytest.raises(InvalidRequest, match=r"^node 'w2' does not allow offload commands: set "
                                             r"allow_offload_commands: true"):
        allowed_nodes(SPEC_OPT_IN, ["python"], "w2")
    with pytest.raises(InvalidRequest, match="unknown node"):
        allowed_nodes(SPEC_OPT_IN, ["python"], "w9")
    with pytest.raises(InvalidRequest, match=r"^no node allows offload commands: set allow_offload_commands: "
                                             r"true on a node"):
        allowed_nodes(SPEC, ["python"])  # nobody opted in
    listed = ClusterSpec.model_validate({"nodes": [
        {"name": "h", "role": "head", "allow_offload_commands": True, "offload_commands": ["ffmpeg"]}]})
    with pytest.raises(InvalidRequest, match="no node may run this command: node 'h' does not allow running"):
        allowed_nodes(listed, ["python"])


def test_choose_only_considers_nodes_that_allow_commands():
    nodes = {"head": Info(free=Resources(cpu=1)), "w1": Info(lend=Resources(cpu=2)), "w2": Info(lend=Resources(cpu=4))}
    allowed = ["w1"]
    _, _, p = choose(SPEC_OPT_IN, nodes, Resources(cpu=1), None, "local_first", allowed)
    assert (p.kind, p.node) == (PlacementKind.offload, "w1")  # not the head, although it has room
    assert "target head does not allow offload commands" in p.reason
    _, _, p = choose(SPEC_OPT_IN, nodes, Resources(cpu=3), None, "best_fit", allowed)  # only w2 could: refused
    assert p.kind is PlacementKind.queue and "not allowed to run it: w2" in p.reason


# --------------------------------------------------------------------------- hostile input


def test_validate_command_refuses_nul_bytes():
    with pytest.raises(InvalidRequest, match="argument 1 holds a NUL byte"):
        validate_command(["echo", "a\0b"])
    with pytest.raises(InvalidRequest, match="argument 0"):
        validate_command(["ec\0ho"])


@pytest.mark.parametrize(
    "env,message",
    [
        ({"A=B": "1"}, "variable name 'A=B' must not hold '='"),
        ({"": "1"}, "must be non-empty strings"),
        ({"A\0": "1"}, "must not hold '=' or a NUL byte"),
        ({"TOKEN": "hunter2\0"}, "the value of TOKEN holds a NUL byte"),
        ({"N": 3}, "the value of N must be a string"),
        (["A=1"], "expected a mapping"),
    ],
)
def test_validate_env_refuses_what_no_process_can_take(env, message):
    with pytest.raises(InvalidRequest, match=re.escape(message)) as info:
        offload_rules.validate_env(env)
    assert "hunter2" not in str(info.value)  # values may be secrets: never in a message


def test_child_env_refuses_bad_input_in_one_line_without_the_value():
    with pytest.raises(InvalidRequest) as info:
        processes.child_env({"K": "secret\0value"})
    assert "secret" not in str(info.value).replace("secret_env", "")


def test_check_request_validates_env_and_secret_env_together():
    from grid_flows.flows.offload import check_request

    argv, env, secrets, needs = check_request(["true"], {"A": "1"}, {"TOKEN": "my-token"}, cpu="2")
    assert (argv, env, secrets, needs.cpu) == (["true"], {"A": "1"}, {"TOKEN": "my-token"}, 2)
    with pytest.raises(InvalidRequest, match="TOKEN is given in both env and secret_env"):
        check_request(["true"], {"TOKEN": "x"}, {"TOKEN": "my-token"})
    with pytest.raises(InvalidRequest, match="secret_env: variable name 'A=B'"):
        check_request(["true"], None, {"A=B": "blk"})
    with pytest.raises(InvalidRequest, match="Secret block name for TOKEN is empty"):
        check_request(["true"], None, {"TOKEN": " "})
    with pytest.raises(InvalidRequest, match="absolute path"):
        check_request(["true"], cwd="/tmp/a\0b")
    with pytest.raises(InvalidRequest, match="priority"):
        check_request(["true"], priority="urgent")


def test_a_script_without_shebang_is_a_one_line_error(tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("echo hi\n")  # no #! line
    script.chmod(0o755)
    r = processes.run_command(["./job.sh"], str(tmp_path), processes.child_env(), NODE_SPEC, FakeQueue())
    assert (r.exit_code, r.error) == (126, "cannot execute ./job.sh: not an executable or no shebang line")


def test_run_command_reports_bad_arguments_instead_of_raising(tmp_path):
    q = FakeQueue()
    r = processes.run_command(["echo", "a\0b"], str(tmp_path), processes.child_env(), NODE_SPEC, q)
    assert r.exit_code is None and "NUL byte" in r.error and q.items == []
    r = processes.run_command(["true"], str(tmp_path), {"A=B": "1"}, NODE_SPEC, q)
    assert r.exit_code is None and "'A=B'" in r.error and q.items == []


def test_cli_parses_env_and_secret_env_assignments():
    from grid_flows.cli.offload import parse_assignments

    assert parse_assignments(["A=1", "B=x=y", "A=2"], "--env") == {"A": "2", "B": "x=y"}
    with pytest.raises(InvalidRequest, match="--secret-env: expected KEY=VALUE, got 'TOKEN'"):
        parse_assignments(["TOKEN"], "--secret-env")
    with pytest.raises(InvalidRequest, match="empty KEY") as info:
        parse_assignments(["=hunter2"], "--env")
    assert "hunter2" not in str(info.value)


def test_env_help_points_to_secret_env():
    from grid_flows.cli.offload import offload_run
    import inspect

    env_help = inspect.signature(offload_run).parameters["env"].default.help
    assert "stored in the flow run's parameters; use --secret-env for secrets" in env_help


def test_resolve_secrets_loads_blocks_and_names_unknown_ones(monkeypatch):
    from prefect.blocks.system import Secret

    from grid_flows.flows.offload import resolve_secrets

    class Loaded:
        def __init__(self, value):
            self.value = value

        def get(self):
            return self.value

    store = {"api-token": Loaded("s3cr3t"), "json-block": Loaded({"a": 1})}

    def load(name, *args, **kwargs):
        if name not in store:
            raise ValueError(f"Unable to find block document named {name} for block type secret")
        return store[name]

    monkeypatch.setattr(Secret, "load", load)
    assert resolve_secrets({"TOKEN": "api-token"}) == {"TOKEN": "s3cr3t"}
    assert resolve_secrets({}) == {}
    with pytest.raises(InvalidRequest, match=r"^secret_env: no Secret block named 'nope' \(for TOKEN\)$"):
        resolve_secrets({"TOKEN": "nope"})
    with pytest.raises(InvalidRequest, match="does not hold a string"):
        resolve_secrets({"CFG": "json-block"})


# --------------------------------------------------------------------------- the whole process tree


def _wait_gone(procs, timeout=10.0):
    """The processes of ``procs`` still running (not zombies) after up to ``timeout`` seconds."""
    import time

    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.Error:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)  # polling the kernel's view, bounded by the deadline


class PidQueue(FakeQueue):
    """Keeps psutil handles (pid + create time) of the pids a command prints, while they run."""

    def __init__(self):
        super().__init__()
        self.procs, self.sids = [], []

    def put(self, item, timeout=None):
        import psutil

        super().put(item, timeout)
        if item[0] == "stdout" and item[1].startswith("pid "):
            pid = int(item[1].split()[1])
            self.procs.append(psutil.Process(pid))
            self.sids.append(os.getsid(pid))


def test_timeout_kills_a_grandchild_that_left_with_setsid(tmp_path):
    q = PidQueue()
    script = (  # Popen returns once the child exec'd: its setsid() has happened when the pid is printed
        "import os, subprocess, time\n"
        "away = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
        "near = subprocess.Popen(['sleep', '300'])\n"
        "print('pid', away.pid, flush=True); print('pid', near.pid, flush=True)\n"
        "print('pid', os.getpid(), flush=True)\n"
        "time.sleep(300)\n"
    )
    try:
        r = processes.run_command([sys.executable, "-c", script], str(tmp_path), processes.child_env(), NODE_SPEC, q,
                             timeout_seconds=3, grace_seconds=1)
        assert r.timed_out and len(q.procs) == 3
        assert q.sids[0] != q.sids[2] == q.procs[2].pid  # the first sleep left the command's session
        assert _wait_gone(q.procs) == []
        assert "process tree" in r.kill
    finally:
        for p in q.procs:  # never leave sleepers behind, even when the test failed
            try:
                p.kill()
            except Exception:
                pass


def test_timeout_kills_setsid_sleep_started_by_bash(tmp_path):
    q = PidQueue()
    try:
        r = processes.run_command(["bash", "-c", "setsid sleep 300 & echo pid $!; sleep 300"], str(tmp_path),
                             processes.child_env(), NODE_SPEC, q, timeout_seconds=2, grace_seconds=1)
        assert r.timed_out and len(q.procs) == 1
        assert _wait_gone(q.procs) == []
    finally:
        for p in q.procs:
            try:
                p.kill()
            except Exception:
                pass


def test_a_double_forked_orphan_is_killed_too_under_a_subreaper(tmp_path):
    # run_command(subreaper=True), as in the Ray task, in a fresh process (it changes that process).
    orphan = (
        "import os, subprocess, sys, time\n"
        "r, w = os.pipe()\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    g = subprocess.Popen(['sleep', '300'])\n"
        "    os.write(w, str(g.pid).encode()); os._exit(0)\n"  # the middle process is gone at once
        "os.wait()\n"
        "print('pid', os.read(r, 32).decode(), flush=True)\n"
        "time.sleep(300)\n"
    )
    harness = (
        "import json, sys\n"
        "from grid_flows.adapters.host import processes\n"
        "from grid_flows.core.models import ClusterSpec\n"
        "n = ClusterSpec.model_validate({'nodes': [{'name': 'n', 'role': 'head', 'mode': 'aggressive',"
        " 'allow_offload_commands': True}]}).head\n"
        "class Q:\n"
        "    def put(self, item, timeout=None):\n"
        "        if item[0] == 'stdout': print(json.dumps(item[1]), flush=True)\n"
        f"r = processes.run_command([sys.executable, '-c', {orphan!r}], {str(tmp_path)!r}, processes.child_env(), n, Q(),"
        " timeout_seconds=3, grace_seconds=1, subreaper=True)\n"
        "print(json.dumps(['result', r.timed_out, r.kill]), flush=True)\n"
    )
    import json

    import psutil

    proc = subprocess.Popen([sys.executable, "-c", harness], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    procs = []
    try:
        for line in proc.stdout:
            item = json.loads(line)
            if isinstance(item, str) and item.startswith("pid "):
                procs.append(psutil.Process(int(item.split()[1])))
            elif isinstance(item, list):
                assert item[1] is True, item
        assert proc.wait(timeout=60) == 0
        assert len(procs) == 1
        assert _wait_gone(procs) == []
    finally:
        proc.kill()
        for p in procs:
            try:
                p.kill()
            except Exception:
                pass


def test_kill_tree_from_another_process_kills_descendants_outside_the_group(tmp_path):
    import psutil

    leader = subprocess.Popen(["bash", "-c", "setsid sleep 300 & echo $!; wait"], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    procs = [psutil.Process(leader.pid)]
    try:
        procs.append(psutil.Process(int(leader.stdout.readline())))
        what = processes.kill_tree(leader.pid, grace_seconds=1, create_time=procs[0].create_time())
        leader.wait(timeout=10)
        assert _wait_gone(procs) == [] and "process tree" in what
    finally:
        for p in procs:
            try:
                p.kill()
            except Exception:
                pass
