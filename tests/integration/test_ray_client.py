"""A Ray client connection (``ray://host:port``), as prefect-ray's docstring shows it (issue 20, item 2).

The cluster here is started the way a user starts one: ``ray start --head`` with a client
server port, and ``ray start --address`` for a lender, each with the flags ``grid node
ray-args`` prints. Every process it starts carries a marker in its environment, and only
those processes are stopped afterwards (``ray stop`` would stop the session's cluster too).

The flow and the ``grid`` commands run in their own processes: a process holds one Ray
connection, and the test process's is the session cluster's. This cluster is a second one on
the session's Prefect server, defined by the GridCluster block ``lab``: the two never judge
each other's boosts.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

import psutil
import pytest

from grid_flows.adapters.ray.cluster import ray_start_args
from tests.conftest import boost_events, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

_MARK = "GRID_TEST_RAY_CLIENT_MARK"
_BIN = Path(sys.executable).parent


def _free_ports(count: int, avoid: tuple[int, ...] = ()) -> list[int]:
    """``count`` distinct free ports, none in ``avoid`` (ports chosen but not yet listened on):
    the sockets stay open until all are bound, since ports picked one at a time can repeat,
    and Ray refuses two components on one port."""
    sockets = [socket.socket() for _ in range(count + len(avoid))]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [port for port in (s.getsockname()[1] for s in sockets) if port not in avoid][:count]
    finally:
        for s in sockets:
            s.close()


def _marked(mark: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(_MARK) == mark:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _stop_marked(mark: str) -> None:
    processes = _marked(mark)
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=10)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def _ray_start(args: list[str], tmp: str, env: dict[str, str], worker_ports: int, avoid: tuple[int, ...] = ()) -> None:
    # Explicit ports: the session's cluster runs on this machine too. Worker ports sit above
    # Ray's default range (10002-19999, the session's) and below the kernel's ephemeral range.
    flags = ["--node-manager-port", "--object-manager-port", "--metrics-export-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port"]
    ports = [f"{flag}={port}" for flag, port in zip(flags, _free_ports(len(flags), avoid))]
    ports += [f"--min-worker-port={worker_ports}", f"--max-worker-port={worker_ports + 99}"]
    done = subprocess.run([str(_BIN / "ray"), "start", *args, *ports, f"--temp-dir={tmp}", "--disable-usage-stats",
                           "--node-ip-address=127.0.0.1", f"--object-store-memory={78 * 1024**2}"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.fixture(scope="module")
def client_address(grid_session):
    """``ray://`` address of a 2-node cluster (gpu-master with a client server, gpu1 lending)."""
    spec = grid_session.spec
    nodes = {node.name: node for node in spec.nodes}
    mark = uuid.uuid4().hex
    tmp = tempfile.mkdtemp(prefix="grid-rc-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    env[_MARK] = mark
    gcs, client = _free_ports(2)
    first_worker_port = 20000 + random.randrange(40) * 200
    try:
        _ray_start([*ray_start_args(nodes["gpu-master"]), f"--port={gcs}", "--include-dashboard=false",
                    f"--ray-client-server-port={client}"], f"{tmp}/head", env, first_worker_port, (gcs, client))
        _ray_start(ray_start_args(nodes["gpu1"], f"127.0.0.1:{gcs}"), f"{tmp}/gpu1", env, first_worker_port + 100,
                   (gcs, client))
        yield f"ray://127.0.0.1:{client}"
    finally:
        _stop_marked(mark)
        shutil.rmtree(tmp, ignore_errors=True)
        assert _marked(mark) == []


# Ray's client server starts one process per connection; on this loaded 2-core machine one such
# process sometimes dies before it answers (prefect-ray's own ray:// fixture hits it too).
_CLIENT_START_FLAKES = ("Starting Ray client server failed", "Initialization failure from server")


def _run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run a process that connects over ray://, again (at most twice more) only when Ray's
    client server failed to start its per-connection process."""
    for _ in range(3):
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
        if not any(flake in done.stderr for flake in _CLIENT_START_FLAKES):
            return done
    return done


LAB = "lab"  # the GridCluster block of the ray:// cluster


def _env(grid, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    return {**env, "PREFECT_API_URL": grid.api_url, "PREFECT_INTEGRATIONS_GRID_CLUSTER_BLOCK": LAB, **extra}


@pytest.fixture(scope="module")
def lab_block(grid_session):
    """The ray:// cluster's definition: the session's nodes, as the GridCluster block ``lab``."""
    from grid_flows.adapters.prefect.blocks import GridCluster
    from grid_flows.adapters.prefect.store import BoostStore

    with BoostStore() as store:
        store.save_cluster(grid_session.spec, LAB)
    yield LAB
    with BoostStore(LAB) as store:
        assert [b.id for b in store.list()] == []  # every lab boost was released
        doc = store.client.read_block_document_by_name(LAB, GridCluster.get_block_type_slug())
        store.client.delete_block_document(doc.id)


_CLIENT_FLOW = textwrap.dedent(
    """
    import json, sys
    import ray
    from prefect import flow, task
    from grid_flows import BoostRayTaskRunner, boost, list_boosts

    @task
    def where(i: int) -> dict:
        ctx = ray.get_runtime_context()
        return {"node": ctx.get_node_labels().get("grid.node"), "group": ctx.get_placement_group_id() or ""}

    @flow(task_runner=BoostRayTaskRunner(address=sys.argv[1]))
    def through_the_client() -> dict:
        before = where.submit(0).result(timeout=120)
        with boost(cpu=1, source="gpu1", duration="2m", on_unavailable="fail") as granted:
            inside = [f.result(timeout=120) for f in where.map(range(3))]
        return {"before": before, "inside": inside, "boost": granted.id, "group": granted.placement_group_id}

    result = through_the_client()
    print("RESULT " + json.dumps({**result, "live": [b.id for b in list_boosts()]}), flush=True)
    """
)


def test_a_boosted_flow_runs_through_a_ray_client_connection(grid, lab_block, client_address):
    done = _run([sys.executable, "-c", _CLIENT_FLOW, client_address],
                env=_env(grid, PREFECT_INTEGRATIONS_GRID_CONTROLLER="true"), timeout=240)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["before"] == {"node": "gpu-master", "group": ""}  # the runner found its target by label
    groups = {row["group"] for row in result["inside"]}
    assert result["group"] in groups and groups <= {"", result["group"]}
    assert all(row["node"] == "gpu1" for row in result["inside"] if row["group"])
    assert result["boost"] not in result["live"]  # released when the block ended


def _grid(grid, *args: str) -> subprocess.CompletedProcess:
    # Controller off: each command reads and changes the cluster from its own client connection.
    return _run([str(_BIN / "grid"), *args], env=_env(grid, PREFECT_INTEGRATIONS_GRID_CONTROLLER="false"),
                timeout=120)


def test_grid_commands_request_release_and_reconcile_through_a_ray_client_connection(grid, lab_block, client_address):
    asked = _grid(grid, "boost", "request", "gpu-master", "--cpu", "1", "--source", "gpu1", "--duration", "2m",
                  "--json", "--address", client_address)
    assert asked.returncode == 0, asked.stderr[-3000:]
    boost = json.loads(asked.stdout)
    assert boost["state"] == "active" and boost["placement_group_id"]

    too_much = _grid(grid, "boost", "request", "gpu-master", "--cpu", "2", "--source", "gpu1",
                     "--address", client_address)  # gpu1 lends 2 CPU; 1 is taken
    assert too_much.returncode == 3 and "gpu1" in too_much.stderr and "Traceback" not in too_much.stderr

    reconciled = _grid(grid, "boost", "reconcile", "--address", client_address)
    assert reconciled.returncode == 0, reconciled.stderr[-3000:]
    assert "agree" in reconciled.stdout  # the live boost is neither lost nor an orphan

    released = _grid(grid, "boost", "release", boost["id"], "--address", client_address)
    assert released.returncode == 0, released.stderr[-3000:]
    again = _grid(grid, "boost", "request", "gpu-master", "--cpu", "2", "--source", "gpu1", "--json",
                  "--address", client_address)  # the released CPU is lendable again at once
    assert again.returncode == 0, again.stderr[-3000:]
    assert _grid(grid, "boost", "release", json.loads(again.stdout)["id"], "--address", client_address).returncode == 0


def test_two_clusters_on_one_server_never_judge_each_others_boosts(grid, lab_block, client_address, monkeypatch):
    from prefect.artifacts import Artifact

    from grid_flows import list_boosts, release_boost, request_boost
    from grid_flows.flows.rebalance import cluster_status_snapshot
    from grid_flows.adapters.prefect.store import BoostStore
    from grid_flows.adapters.ray import cluster as rc
    from grid_flows.control.boosts import reconcile
    from grid_flows.core.models import BoostState, Resources
    from grid_flows.errors import UnknownBoost

    mine = request_boost("gpu-master", cpu=1, source="gpu1", duration="2m")  # the session cluster's, by its controller
    asked = _grid(grid, "boost", "request", "gpu-master", "--cpu", "1", "--source", "gpu1", "--duration", "2m",
                  "--json", "--address", client_address)
    assert asked.returncode == 0, asked.stderr[-3000:]
    theirs = json.loads(asked.stdout)
    assert theirs["cluster"] == LAB
    try:
        # The session cluster's reconcile has no group for the lab's boost in its Ray: not its to judge.
        report = reconcile()
        assert theirs["id"] not in report.lost + report.failed + report.expired
        with BoostStore(LAB) as store:
            assert store.get(theirs["id"]).state is BoostState.active
        assert theirs["id"] not in {b.id for b in list_boosts(include_ended=True)}
        with pytest.raises(UnknownBoost, match="belongs to cluster 'lab'"):
            release_boost(theirs["id"])
        # A group in this Ray cluster named after the lab's boost (a machine here set to the other
        # cluster's name) is not this cluster's to judge: reconcile leaves it.
        stray = rc.start_boost_group(theirs["placement_group"], "gpu2", Resources(cpu=0.5))
        try:
            assert stray.wait(timeout_seconds=30)
            assert reconcile().removed_groups == []
            assert theirs["placement_group"] in rc.grid_groups()
        finally:
            rc.remove_group(stray.id.hex())

        # And the lab's reconcile, through its client connection, leaves the session's boost alone.
        reconciled = _grid(grid, "boost", "reconcile", "--address", client_address)
        assert reconciled.returncode == 0 and "agree" in reconciled.stdout, reconciled.stderr[-3000:]
        status = _grid(grid, "boost", "status", "--json")
        assert [b["id"] for b in json.loads(status.stdout)] == [theirs["id"]], status.stderr[-3000:]
        assert [b.id for b in list_boosts() if b.state is BoostState.active] == [mine.id]

        # What both publish on the shared server stays apart: the lab's events name its own nodes,
        # and its maintenance tables have their own keys.
        granted = wait_for(lambda: [e for e in boost_events(theirs["id"]) if e["event"] == "grid.boost.granted"],
                           bool)
        assert granted, "the lab boost's grid.boost.granted event never reached the server"
        roles = {r["prefect.resource.role"]: r["prefect.resource.id"] for r in granted[0]["related"]}
        assert roles == {"lender": "grid.node.lab.gpu1", "borrower": "grid.node.lab.gpu-master"}
        assert granted[0]["resource"]["grid.cluster"] == LAB
        monkeypatch.setenv("PREFECT_INTEGRATIONS_GRID_CLUSTER_BLOCK", LAB)
        cluster_status_snapshot()
        monkeypatch.delenv("PREFECT_INTEGRATIONS_GRID_CLUSTER_BLOCK")
        table = Artifact.get("grid-cluster-lab")
        assert table is not None and "of cluster lab" in table.description
        default_table = Artifact.get("grid-cluster")
        assert default_table is None or "of cluster lab" not in default_table.description
    finally:
        released = _grid(grid, "boost", "release", theirs["id"], "--address", client_address)
        assert released.returncode == 0, released.stderr[-3000:]
