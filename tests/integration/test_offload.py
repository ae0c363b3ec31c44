"""`grid offload run` on the real cluster and server: output in the run logs, exit codes as
states, timeouts that kill the whole process group, arguments that never meet a shell,
and the lender's resource mode on the child process."""

from __future__ import annotations

import json
import sys
import time
import uuid

import psutil
import pytest

from grid_flows import ray_cluster as rc
from grid_flows.store import BoostStore
from tests.grid_cli import grid_cli

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
PY = sys.executable




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
    assert any(m.startswith("placement: target on gpu-master") for m in messages), messages
    from prefect.artifacts import Artifact

    artifact = Artifact.get(f"grid-offload-{run.id}")
    assert artifact is not None and "gpu-master" in artifact.data and "exit code | 0" in artifact.data


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


def test_timeout_kills_the_whole_process_group(grid, capsys, tmp_path):
    pids = tmp_path / "pids.json"
    child = (
        "import json, os, subprocess, sys, time\n"
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pids)!r}, 'w').write(json.dumps([os.getpid(), os.getpgid(0), g.pid]))\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n"
    )
    started = time.monotonic()
    code, out, err = grid_cli(capsys, "offload", "run", "--timeout", "3", "--cwd", str(tmp_path), "--",
                              PY, "-c", child)
    assert code == 124, err
    assert "timed out after 3 s" in err
    assert time.monotonic() - started < 60
    leader, pgid, grandchild = json.loads(pids.read_text())
    assert pgid == leader  # its own session and process group
    for pid in (leader, grandchild):
        assert not _alive(pid), f"{pid} survived"
    assert not any(p.info["pid"] in (leader, grandchild) for p in psutil.process_iter(["pid"]))


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE or psutil.pid_exists(pid)
    except psutil.NoSuchProcess:
        return False


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


def test_cancelling_the_run_kills_the_process_group(grid, tmp_path):
    import threading

    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    from grid_flows.flows.offload import offload

    marker = uuid.uuid4().hex[:8]
    pids = tmp_path / "pids.json"
    child = (
        "import json, os, subprocess, sys, time\n"
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pids)!r} + '.tmp', 'w').write(json.dumps([os.getpid(), g.pid]))\n"
        f"os.rename({str(pids)!r} + '.tmp', {str(pids)!r})\n"
        f"print('{marker} ready', flush=True)\n"
        "time.sleep(600)\n"
    )
    states = []
    runner = threading.Thread(
        target=lambda: states.append(offload(command=[PY, "-c", child], cwd=str(tmp_path), grace_seconds=2,
                                             return_state=True)),
        daemon=True,
    )
    runner.start()
    run = None
    try:
        run, messages = run_of(marker, wait_for=f"{marker} ready", timeout=120)
        assert f"{marker} ready" in messages
        leader, grandchild = json.loads(pids.read_text())
        assert _alive(leader) and _alive(grandchild)
    finally:  # even when an assertion failed: never leave the run (and its sleepers) behind
        if run is not None:
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(run.id, Cancelling(), force=True)
        runner.join(timeout=90)
    assert not runner.is_alive()
    assert states and states[0].is_cancelled(), states
    for pid in (leader, grandchild):
        assert not _alive(pid), f"{pid} survived"
