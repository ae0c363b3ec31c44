"""`grid offload run` on the real cluster and server: output in the run logs, exit codes as
states, timeouts and cancellations that kill the whole process tree (also what left with
setsid), arguments that never meet a shell, the lender's resource mode on the child
process, the per-node opt-in and allow-list, hostile input, and secrets from Secret blocks.

The test cluster's lenders set ``allow_offload_commands: true``; the head does not, so
commands run on the lenders unless a test says otherwise."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from contextlib import contextmanager

import psutil
import pytest

from grid_flows.adapters.ray import cluster as rc
from grid_flows.adapters.prefect.store import BoostStore
from tests.grid_cli import grid_cli

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
PY = sys.executable


@contextmanager
def nodes_changed(grid, **changes):
    """The cluster block with some nodes' fields changed meanwhile (``gpu1={...}``)."""
    spec = grid.spec
    data = spec.model_dump(mode="json")
    for node in data["nodes"]:
        node.update(changes.get(node["name"], {}))
    with BoostStore() as store:
        store.save_cluster(type(spec).model_validate(data))
    try:
        yield
    finally:
        with BoostStore() as store:
            store.save_cluster(spec)


def no_ray(monkeypatch) -> list:
    """Record (and refuse) any attempt of the offload flow to submit work to Ray."""
    import grid_flows.flows.offload as flow_module

    calls: list = []

    def refuse():
        calls.append("submitted")
        raise RuntimeError("the offload flow submitted work to Ray")

    monkeypatch.setattr(flow_module, "_remote_functions", refuse)
    return calls


def run_of(marker: str, wait_for: str | None = None, timeout: float = 30.0):
    """The grid-offload flow run whose command holds ``marker``, with its log messages.

    Logs reach the server in batches: flush this process's API log handlers, then read
    until a message holds ``wait_for`` (default: the marker) or ``timeout`` passes.
    """
    import logging

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.logging.handlers import APILogHandler

    for name in ("prefect.flow_runs", "prefect"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, APILogHandler):
                handler.flush()
    wait_for = wait_for or marker
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:  # the run may still be starting (a flow called in another thread)
            runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["grid-offload"])),
                                         limit=200)
            found = [r for r in runs if any(marker in a for a in r.parameters.get("command", []))]
            if found or time.monotonic() > deadline:
                (run,) = found
                break
            time.sleep(0.2)  # polling the server for the run, bounded by the deadline
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])),
                                    sort=LogSort.TIMESTAMP_ASC)
            messages = [log.message for log in logs]
            if any(wait_for in m for m in messages) or time.monotonic() > deadline:
                return run, messages
            time.sleep(0.2)  # polling the server for the batched logs, bounded by the deadline


def test_output_streams_into_the_run_logs_and_exit_0_completes(grid, capsys):
    marker = uuid.uuid4().hex[:8]
    code_text = (
        "import sys\n"
        f"for i in range(3): print('line', i, '{marker}', flush=True)\n"
        f"print('warn {marker}', file=sys.stderr, flush=True)\n"
    )
    code, out, err = grid_cli(capsys, "offload", "run", "--", PY, "-c", code_text)
    assert code == 0, err
    run, messages = run_of(marker)
    assert run.state.is_completed()
    for i in range(3):
        assert f"line {i} {marker}" in messages
    assert f"[stderr] warn {marker}" in messages
    # the head has room but does not allow offload commands: a lender runs it
    (placed,) = [m for m in messages if m.startswith("placement: ")]
    assert placed.startswith("placement: offload on gpu"), placed
    assert "target gpu-master does not allow offload commands" in placed
    from prefect.artifacts import Artifact

    artifact = Artifact.get(f"grid-offload-{run.id}")
    assert artifact is not None and "| node | gpu" in artifact.data and "exit code | 0" in artifact.data


def test_exit_code_becomes_the_state_and_the_cli_code(grid, capsys):
    marker = uuid.uuid4().hex[:8]
    code, out, err = grid_cli(capsys, "offload", "run", "--", PY, "-c", f"print('{marker}'); raise SystemExit(3)")
    assert code == 3
    assert "exited with code 3" in err
    run, messages = run_of(marker)
    assert run.state.is_failed()
    assert "code 3" in run.state.message
    assert marker in messages


def test_shell_metacharacters_arrive_unchanged(grid, capsys, tmp_path):
    marker = uuid.uuid4().hex[:8]
    weird = ['$HOME; rm -rf / && echo "x" | cat > y *', "`id`", "$(id)", "a b", "'", ""]
    code, out, err = grid_cli(capsys, "offload", "run", "--cwd", str(tmp_path), "--", PY, "-c",
                              f"import sys, json; print('{marker}' + json.dumps(sys.argv[1:]))", *weird)
    assert code == 0, err
    _, messages = run_of(marker)
    (echoed,) = [m for m in messages if m.startswith(marker)]
    assert json.loads(echoed[len(marker):]) == weird
    assert list(tmp_path.iterdir()) == []  # no `y` written: no shell ever saw the arguments


# Writes [[pid, create_time], ...] of the leader, a child, a child that left with setsid and the
# orphan of a double fork (its middle process exits at once), then sleeps. Output file: PIDS.
TREE = (
    "import json, os, subprocess, sys, time, psutil\n"
    "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    "away = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
    "r, w = os.pipe()\n"
    "middle = os.fork()\n"
    "if middle == 0:\n"
    "    os.setsid()\n"
    "    o = subprocess.Popen(['sleep', '300'])\n"
    "    os.write(w, str(o.pid).encode()); os._exit(0)\n"
    "os.waitpid(middle, 0)\n"
    "pids = [os.getpid(), g.pid, away.pid, int(os.read(r, 32))]\n"
    "data = [[p, psutil.Process(p).create_time()] for p in pids]\n"
    "open(PIDS + '.tmp', 'w').write(json.dumps(data)); os.rename(PIDS + '.tmp', PIDS)\n"
    "print(MARKER, 'ready', os.getpgid(0), flush=True)\n"
    "time.sleep(600)\n"
)


def tree_script(pids_file, marker: str) -> str:
    return f"PIDS = {str(pids_file)!r}; MARKER = {marker!r}\n" + TREE


def test_timeout_kills_the_whole_process_tree(grid, capsys, tmp_path):
    pids = tmp_path / "pids.json"
    marker = uuid.uuid4().hex[:8]
    started = time.monotonic()
    code, out, err = grid_cli(capsys, "offload", "run", "--timeout", "5", "--cwd", str(tmp_path), "--",
                              PY, "-c", tree_script(pids, marker))
    procs = json.loads(pids.read_text())
    try:
        assert code == 124, err
        assert "timed out after 5 s" in err
        assert time.monotonic() - started < 90
        _, messages = run_of(marker, wait_for=f"{marker} ready")
        (ready,) = [m for m in messages if m.startswith(f"{marker} ready")]
        assert int(ready.split()[-1]) == procs[0][0]  # its own session and process group
        assert _still_running(procs) == []
    finally:
        _kill_all(procs)


def _still_running(procs, timeout: float = 15.0) -> list:
    """Of ``[[pid, create_time], ...]``, those still running (not zombies) after up to ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid, created in procs:
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - created) < 0.01 and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)  # polling the kernel's view, bounded by the deadline


def _kill_all(procs) -> None:
    """Never leave sleepers behind, even when a test failed."""
    for pid, created in procs:
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - created) < 0.01:
                p.kill()
        except psutil.Error:
            pass


def test_command_on_gpu1_runs_under_its_conservative_mode(grid, capsys):
    marker = uuid.uuid4().hex[:8]
    probe = (
        "import json, os, psutil\n"
        "io = psutil.Process().ionice()\n"
        f"print('{marker}' + json.dumps([os.nice(0), int(io.ioclass), os.environ.get('GRID_OFFLOAD_NODE')]))\n"
    )
    code, out, err = grid_cli(capsys, "offload", "run", "--node", "gpu1", "--", PY, "-c", probe)
    assert code == 0, err
    _, messages = run_of(marker)
    (line,) = [m for m in messages if m.startswith(marker)]
    nice, ioclass, node = json.loads(line[len(marker):])
    assert node == "gpu1"
    assert nice >= 10  # conservative: nice 10 (or Ray's worker niceness if higher)
    assert ioclass == int(psutil.IOPRIO_CLASS_IDLE)
    assert any("offload on gpu1" in m for m in messages), messages


def test_a_boost_is_used_and_released_when_asked(grid, capsys):
    marker = uuid.uuid4().hex[:8]
    code, out, err = grid_cli(capsys, "offload", "run", "--cpu", "2", "--boost", "always", "--",
                              PY, "-c", f"import os; print('{marker}', os.environ['GRID_OFFLOAD_NODE'])")
    assert code == 0, err
    _, messages = run_of(marker)
    assert f"{marker} gpu1" in messages
    assert any(m.startswith("using boost") for m in messages)
    with BoostStore() as store:
        boosts = [b for b in store.list(include_ended=True) if b.origin == "offload"]
    assert boosts and all(b.state.ended for b in boosts)
    assert rc.grid_groups() == {}


@pytest.mark.parametrize(
    "args,message",
    [
        (["offload", "run", "--cpu", "-1", "--", "true"], "must not be negative"),
        (["offload", "run", "--node", "gpu9", "--", "true"], "unknown node 'gpu9'"),
        (["offload", "run", "--cwd", "relative/dir", "--", "true"], "absolute path"),
        (["offload", "run", "--cwd", "/no/such/dir", "--", "true"], "does not exist"),
    ],
)
def test_user_errors_exit_2_with_one_line(grid, capsys, args, message):
    code, out, err = grid_cli(capsys, *args)
    assert code == 2, err
    assert message in err
    assert "Traceback" not in err + out


def test_scan_and_limits_run_on_the_node(grid, capsys):
    code, out, err = grid_cli(capsys, "offload", "scan", "--node", "gpu1", "--json", "--skipped")
    assert code == 0, err
    data = json.loads(out)
    assert "candidates" in data and "skipped" in data
    # our own Ray processes are never candidates
    assert all("raylet" not in c["command"] and "default_worker" not in c["command"] for c in data["candidates"])
    code, out, err = grid_cli(capsys, "node", "limits", "gpu1")
    assert code == 0, err
    assert "conservative" in out and "nice 10" in out and "no GPU" in out


def test_cancelling_the_run_kills_the_whole_process_tree(grid, tmp_path):
    import threading

    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    from grid_flows.flows.offload import offload

    marker = uuid.uuid4().hex[:8]
    pids = tmp_path / "pids.json"
    states = []
    runner = threading.Thread(
        target=lambda: states.append(offload(command=[PY, "-c", tree_script(pids, marker)], cwd=str(tmp_path),
                                             grace_seconds=2, return_state=True)),
        daemon=True,
    )
    runner.start()
    run = None
    procs = []
    try:
        run, messages = run_of(marker, wait_for=f"{marker} ready", timeout=120)
        assert any(m.startswith(f"{marker} ready") for m in messages)
        procs = json.loads(pids.read_text())
        assert _still_running(procs, timeout=0) == [p for p, _ in procs]
    finally:  # even when an assertion failed: never leave the run (and its sleepers) behind
        if run is not None:
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(run.id, Cancelling(), force=True)
        runner.join(timeout=90)
        try:
            assert not runner.is_alive()
            assert states and states[0].is_cancelled(), states
            assert _still_running(procs) == []
        finally:
            _kill_all(procs)


def test_a_node_must_opt_in_to_run_commands(grid, capsys, tmp_path, monkeypatch):
    calls = no_ray(monkeypatch)
    flag = tmp_path / "ran"
    code, out, err = grid_cli(capsys, "offload", "run", "--node", "gpu-master", "--",
                              PY, "-c", f"open({str(flag)!r}, 'w')")
    assert code == 2, err
    assert "node 'gpu-master' does not allow offload commands: set allow_offload_commands: true" in err
    assert "Traceback" not in err + out
    with nodes_changed(grid, gpu1={"allow_offload_commands": False}, gpu2={"allow_offload_commands": False}):
        code, out, err = grid_cli(capsys, "offload", "run", "--", PY, "-c", f"open({str(flag)!r}, 'w')")
    assert code == 2, err
    assert "no node allows offload commands" in err and "Traceback" not in err + out
    assert calls == [] and not flag.exists()  # refused before anything went to Ray


def test_offload_commands_allow_list(grid, capsys, monkeypatch):
    marker = uuid.uuid4().hex[:8]
    with nodes_changed(grid, gpu1={"offload_commands": [os.path.realpath(PY)]}, gpu2={"offload_commands": ["python3"]}):
        # a path entry: argv[0] is resolved on the node (PY may be a symlink to it)
        code, out, err = grid_cli(capsys, "offload", "run", "--node", "gpu1", "--", PY, "-c", f"print('{marker}')")
        assert code == 0, err
        assert marker in run_of(marker)[1]
        code, out, err = grid_cli(capsys, "offload", "run", "--node", "gpu1", "--", "/bin/echo", marker)
        assert code == 2, err  # refused on the node, before the start
        assert "node 'gpu1' does not allow running '/bin/echo'" in err and "Traceback" not in err + out
        calls = no_ray(monkeypatch)  # bare names only: refused before Ray
        code, out, err = grid_cli(capsys, "offload", "run", "--node", "gpu2", "--", "/bin/echo", marker)
        assert code == 2, err
        assert "node 'gpu2' does not allow running '/bin/echo': its offload_commands are python3" in err
        assert calls == []


def test_a_script_without_a_shebang_line_fails_in_one_line(grid, capsys, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("echo hi\n")
    script.chmod(0o755)
    code, out, err = grid_cli(capsys, "offload", "run", "--cwd", str(tmp_path), "--", "./job.sh")
    assert code == 126, err
    assert "cannot execute ./job.sh: not an executable or no shebang line" in err
    assert "Traceback" not in err + out and "RayTaskError" not in err + out


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"command": [PY, "-c", "pass"], "env": {"A=B": "1"}}, "env: variable name 'A=B' must not hold '='"),
        ({"command": [PY, "-c", "pass"], "env": {"": "1"}}, "env: variable names must be non-empty"),
        ({"command": [PY, "-c", "pass"], "env": {"K": "a\0b"}}, "env: the value of K holds a NUL byte"),
        ({"command": [PY, "-c", "a\0b"]}, "command: argument 2 holds a NUL byte"),
    ],
)
def test_hostile_input_fails_the_run_in_one_line(grid, monkeypatch, kwargs, message):
    from grid_flows.flows.offload import offload

    calls = no_ray(monkeypatch)
    state = offload(**kwargs, return_state=True)
    assert state.is_failed()
    assert message in state.message and "\n" not in state.message
    assert calls == []


def test_secret_env_reaches_the_child_only(grid, capsys):
    import hashlib

    from prefect.artifacts import Artifact
    from prefect.blocks.system import Secret

    value = "s3cr3t-" + uuid.uuid4().hex
    block = "grid-test-" + uuid.uuid4().hex[:8]
    Secret(value=value).save(block)
    marker = uuid.uuid4().hex[:8]
    code, out, err = grid_cli(
        capsys, "offload", "run", "--secret-env", f"TOKEN={block}", "--env", "PLAIN=1", "--", PY, "-c",
        f"import hashlib, os; print('{marker}', hashlib.sha256(os.environ['TOKEN'].encode()).hexdigest(), "
        "os.environ['PLAIN'])")
    assert code == 0, err
    run, messages = run_of(marker)
    assert f"{marker} {hashlib.sha256(value.encode()).hexdigest()} 1" in messages
    assert run.parameters["secret_env"] == {"TOKEN": block} and run.parameters["env"] == {"PLAIN": "1"}
    assert value not in json.dumps(run.parameters)
    assert not any(value in m for m in messages) and value not in out + err
    assert value not in Artifact.get(f"grid-offload-{run.id}").data
    code, out, err = grid_cli(capsys, "offload", "run", "--secret-env", "TOKEN=no-such-block-xyz", "--", "true")
    assert code == 2, err
    assert "secret_env: no Secret block named 'no-such-block-xyz' (for TOKEN)" in err
    assert "Traceback" not in err + out
