"""The Ray adapter: find grid nodes by label, hold boosts as placement groups, run a local cluster.

A boost is a detached, named placement group with one bundle pinned on the source
node by its ``grid.node`` label. The bundle carries the lend tokens that the node
declared at start, so Ray itself refuses to lend past a node's share, whatever number
of processes ask at once (DESIGN.md sections 2 and 5).

Example:
    ```python
    from grid_flows import local_cluster, load_cluster_file
    from grid_flows.ray_cluster import connect, grid_nodes

    spec = load_cluster_file("blocks/cluster.yaml")
    with local_cluster(spec) as address:
        connect(address)
        print(sorted(grid_nodes()))     # ['gpu-master', 'gpu1', 'gpu2']
    ```
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator

from grid_flows.models import (
    NODE_LABEL,
    PLACEMENT_GROUP_PREFIX,
    ClusterSpec,
    GridError,
    NodeSpec,
    Resources,
)
from grid_flows.settings import RAY_NAMESPACE, ray_address

# Small object stores keep a one-machine cluster light (DESIGN.md section 4).
LOCAL_OBJECT_STORE_BYTES = 78 * 1024**2
_FAST_HEALTH_CHECK = {
    "RAY_health_check_period_ms": "200",
    "RAY_health_check_timeout_ms": "200",
    "RAY_health_check_failure_threshold": "3",
}


class RayUnavailable(GridError):
    exit_code = 2


@dataclass
class NodeInfo:
    """A live view of one grid node as Ray sees it."""

    name: str
    node_id: str
    alive: bool
    total: dict[str, float] = field(default_factory=dict)
    available: dict[str, float] = field(default_factory=dict)

    @property
    def lendable_total(self) -> Resources:
        return Resources.from_lend_tokens(self.total)

    @property
    def lendable_free(self) -> Resources:
        return Resources.from_lend_tokens(self.available)

    @property
    def free(self) -> Resources:
        """Free raw capacity (CPU, GPU, memory) not reserved by any placement group."""
        return Resources(
            cpu=self.available.get("CPU", 0.0),
            gpu=self.available.get("GPU", 0.0),
            memory=int(self.available.get("memory", 0)),
        )

    @property
    def size(self) -> Resources:
        return Resources(
            cpu=self.total.get("CPU", 0.0), gpu=self.total.get("GPU", 0.0), memory=int(self.total.get("memory", 0))
        )


@dataclass
class GroupInfo:
    name: str
    group_id: str
    state: str
    node_id: str


def quiet_ray_environment(tmp_dir: str | None = None) -> None:
    """Light, quiet defaults for Ray on one machine; must run before ``import ray``."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_enable_worker_prestart", "0")
    if tmp_dir:
        os.makedirs(os.path.join(tmp_dir, "ray"), exist_ok=True)
        os.environ["RAY_TMPDIR"] = tmp_dir


def connect(address: str | None = None) -> None:
    """Connect this process to the grid's Ray cluster once, in the grid namespace."""
    import ray

    if ray.is_initialized():
        return
    address = ray_address(address)
    if not address:
        raise RayUnavailable(
            "no Ray cluster to use: set RAY_ADDRESS (or PREFECT_INTEGRATIONS_GRID_RAY_ADDRESS) "
            "or pass --address"
        )
    try:
        ray.init(address=address, namespace=RAY_NAMESPACE, log_to_driver=False, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayUnavailable(f"cannot connect to Ray at {address}: {exc}") from None


def grid_nodes() -> dict[str, NodeInfo]:
    """Nodes that carry a ``grid.node`` label, by name; a live node wins over a dead one of that name."""
    import ray
    from ray._private.state import available_resources_per_node

    available = available_resources_per_node()
    nodes: dict[str, NodeInfo] = {}
    for node in ray.nodes():
        name = (node.get("Labels") or {}).get(NODE_LABEL)
        if not name:
            continue
        info = NodeInfo(
            name=name,
            node_id=node["NodeID"],
            alive=bool(node.get("Alive")),
            total=dict(node.get("Resources") or {}),
            available=dict(available.get(node["NodeID"], {})) if node.get("Alive") else {},
        )
        if name not in nodes or (info.alive and not nodes[name].alive):
            nodes[name] = info
    return nodes


def group_handle(group_id: str):
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    return PlacementGroup(PlacementGroupID(bytes.fromhex(group_id)))


def create_boost_group(name: str, source: str, resources: Resources, timeout_seconds: float) -> str | None:
    """Reserve ``resources`` on ``source`` as a detached placement group; its id, or None if it
    could not be placed within the timeout (the group is removed again then)."""
    from ray.util import placement_group, remove_placement_group

    group = placement_group(
        [resources.bundle()],
        name=name,
        lifetime="detached",
        bundle_label_selector=[{NODE_LABEL: source}],
    )
    if group.wait(timeout_seconds=timeout_seconds):
        return group.id.hex()
    remove_placement_group(group)
    return None


def remove_group(group_id: str) -> None:
    """Remove a placement group by id; removing one that is gone is not an error."""
    from ray.util import remove_placement_group

    with contextlib.suppress(Exception):
        remove_placement_group(group_handle(group_id))


def grid_groups(include_removed: bool = False) -> dict[str, GroupInfo]:
    """Grid placement groups (named ``grid-boost-*``) by name."""
    from ray.util import placement_group_table

    groups: dict[str, GroupInfo] = {}
    for group_id, row in placement_group_table().items():
        name = row.get("name") or ""
        if not name.startswith(PLACEMENT_GROUP_PREFIX):
            continue
        if row.get("state") == "REMOVED" and not include_removed:
            continue
        node_ids = [n for n in (row.get("bundles_to_node_id") or {}).values() if n]
        groups[name] = GroupInfo(name=name, group_id=group_id, state=row.get("state", ""), node_id=(node_ids or [""])[0])
    return groups


def wait_for_free(node: str, resources: Resources, timeout_seconds: float = 5.0) -> bool:
    """Poll until ``node`` shows ``resources`` free (removal frees capacity ~100 ms later)."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        info = grid_nodes().get(node)
        if info and resources.fits_in(info.free):
            return True
        time.sleep(0.02)
    return False


def ray_start_args(node: NodeSpec, head_address: str | None = None) -> list[str]:
    """The ``ray start`` flags that give a node its grid identity and its lending limits."""
    import json

    args = ["--head"] if head_address is None else [f"--address={head_address}"]
    args += [
        f"--num-cpus={_whole(node.cpu_count)}",
        f"--num-gpus={_whole(node.gpu_count)}",
        f"--memory={int(node.size.memory)}",
        f"--labels={json.dumps({NODE_LABEL: node.name}, separators=(',', ':'))}",
    ]
    tokens = node.ray_resources()
    if tokens:
        args.append(f"--resources={json.dumps({k: int(v) for k, v in tokens.items()}, separators=(',', ':'))}")
    return args


def _whole(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@contextlib.contextmanager
def local_cluster(
    spec: ClusterSpec,
    *,
    tmp_dir: str | None = None,
    fast_health_check: bool = False,
    connect_driver: bool = True,
) -> Iterator[str]:
    """Start the spec's head and workers as separate Ray nodes on this machine; yield the address.

    Each node is shaped by its ``cpu_count``/``gpu_count``/``memory_gb`` (GPUs are logical
    here), carries its ``grid.node`` label and declares its lendable share as lend tokens.
    ``RAY_ADDRESS`` points at the cluster while the context is open, and every node
    process is stopped when it closes.
    """
    owns_tmp = tmp_dir is None
    tmp_dir = tmp_dir or tempfile.mkdtemp(prefix="grid-ray-", dir="/tmp")
    quiet_ray_environment(tmp_dir)
    saved_env = {k: os.environ.get(k) for k in (*_FAST_HEALTH_CHECK, "RAY_ADDRESS")}
    if fast_health_check:
        os.environ.update(_FAST_HEALTH_CHECK)

    import ray
    from ray.cluster_utils import Cluster

    def node_args(node: NodeSpec) -> dict:
        return dict(
            num_cpus=node.cpu_count,
            num_gpus=node.gpu_count,
            memory=int(node.size.memory),
            resources={k: int(v) for k, v in node.ray_resources().items()},
            labels={NODE_LABEL: node.name},
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
        )

    cluster = Cluster(
        initialize_head=True,
        head_node_args={**node_args(spec.head), "include_dashboard": False},
    )
    try:
        for worker in spec.workers:
            cluster.add_node(**node_args(worker))
        cluster.wait_for_nodes()
        os.environ["RAY_ADDRESS"] = cluster.address
        if connect_driver:
            connect(cluster.address)
        yield cluster.address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if owns_tmp:
            shutil.rmtree(tmp_dir, ignore_errors=True)

