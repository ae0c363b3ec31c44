"""The Ray adapter: find grid nodes by label, hold boosts as placement groups, build task options.

A boost is a detached, named placement group with one bundle pinned on the source
node by its ``grid.node`` label. The bundle carries the lend tokens that the node
declared at start, so Ray itself refuses to lend past a node's share, whatever number
of processes ask at once (docs/architecture.md, sections 1 and 2).

Example:
    ```python
    from grid_flows import local_cluster, load_cluster_file
    from grid_flows.adapters.ray.cluster import connect, grid_nodes

    spec = load_cluster_file("blocks/cluster.yaml")
    with local_cluster(spec) as address:
        connect(address)
        print(sorted(grid_nodes()))     # ['gpu-master', 'gpu1', 'gpu2']
    ```
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Iterator

from grid_flows.adapters.prefect.settings import RAY_NAMESPACE, GridSettings, ray_address
from grid_flows.adapters.ray.tokens import bundle, from_lend_tokens, lend_tokens, node_tokens
from grid_flows.core.ledger import PLACEMENT_GROUP_PREFIX
from grid_flows.core.models import NodeSpec, Resources
from grid_flows.errors import LedgerBusy, RayUnavailable

logger = logging.getLogger("grid_flows.adapters.ray.cluster")

NODE_LABEL = "grid.node"  # the Ray node label that names a grid node (its value is the node's name)


LEDGER_LOCK_NAME = "grid-ledger-lock"
LEDGER_LOCK_TTL_SECONDS = 15.0
_lock_actor: tuple[str, object] | None = None  # (connection_key(), handle): a new connection finds it anew


def _ledger_lock_actor():
    """The cluster's one ledger lock: a named, detached Ray actor, created on first use.

    Why not Prefect's global concurrency limit: its leases last at least 60 s, so a
    process killed while holding it stalls every writer for a minute or more. This lock
    expires a dead holder's claim after LEDGER_LOCK_TTL_SECONDS, and costs ~1 ms a call.
    Calls to one actor run one at a time, so acquire is atomic.
    """
    import ray

    global _lock_actor
    job = connection_key()
    if _lock_actor is None or _lock_actor[0] != job:

        @ray.remote(num_cpus=0, max_restarts=-1)
        class LedgerLock:
            def __init__(self) -> None:
                self.holder: str | None = None
                self.until = 0.0

            def acquire(self, holder: str, ttl: float) -> bool:
                now = time.time()
                if self.holder is None or now >= self.until or self.holder == holder:
                    self.holder, self.until = holder, now + ttl
                    return True
                return False

            def release(self, holder: str) -> None:
                if self.holder == holder:
                    self.holder = None

        _lock_actor = job, LedgerLock.options(
            name=LEDGER_LOCK_NAME,
            namespace=RAY_NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            # On the head: a lender that dies must not take the lock (and its restart) along.
            resources={"node:__internal_head__": 0.001},
        ).remote()
    return _lock_actor[1]


def connection_key() -> str:
    """Names this process's current Ray connection; job ids alone repeat across clusters."""
    import ray

    ctx = ray.get_runtime_context()
    return f"{ctx.gcs_address}/{ctx.get_job_id()}"


def collect_object_refs() -> None:
    """Collect cyclic garbage now, before ``ray.shutdown()``: an ObjectRef freed by a garbage
    collection that another thread happens to run while Ray shuts down reaches the stopped
    core worker, and Ray then ends the whole process with exit code 1 ("The core worker has
    already been shutdown"). Flows leave futures in reference cycles, so this is not rare."""
    import gc

    gc.collect()


def shutdown() -> None:
    """``ray.shutdown()``, with the race above made unlikely (garbage made during the shutdown
    itself can still reach it; the race is Ray's)."""
    import ray

    collect_object_refs()
    ray.shutdown()


def session_name() -> str:
    """The connected Ray cluster's identity: its session name, new at each start of its head
    ("" where Ray does not tell, as through some ray:// clients)."""
    import ray

    try:
        return ray.get_runtime_context().get_session_name() or ""
    except Exception:  # a Ray client connection may not carry it: the records then say nothing
        return ""


@contextlib.contextmanager
def ledger_lock(timeout_seconds: float | None = None) -> Iterator[None]:
    """Serialise read-modify-write of boost records across every process of the cluster."""
    import uuid

    import ray

    timeout_seconds = timeout_seconds or GridSettings().lock_timeout_seconds
    actor = _ledger_lock_actor()
    holder = uuid.uuid4().hex
    deadline = time.monotonic() + timeout_seconds
    pause = 0.002
    while not ray.get(actor.acquire.remote(holder, LEDGER_LOCK_TTL_SECONDS), timeout=timeout_seconds):
        if time.monotonic() >= deadline:
            raise LedgerBusy(f"the ledger lock stayed taken for {timeout_seconds:g} s")
        time.sleep(pause)  # back off while another process changes a record
        pause = min(pause * 2, 0.05)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            ray.get(actor.release.remote(holder), timeout=timeout_seconds)


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
        return from_lend_tokens(self.total)

    @property
    def lendable_free(self) -> Resources:
        return from_lend_tokens(self.available)

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
    _check_reachable(address)
    try:
        ray.init(address=address, namespace=RAY_NAMESPACE, log_to_driver=False, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayUnavailable(f"cannot connect to Ray at {address}: {exc}") from None


CONNECT_TIMEOUT_SECONDS = 5.0


def _check_reachable(address: str, timeout_seconds: float = CONNECT_TIMEOUT_SECONDS) -> None:
    """Fail fast when nothing listens at a ``host:port`` address: ``ray.init`` itself retries
    an unreachable GCS for minutes. Other forms (``auto``, ``local``) are left to Ray."""
    import socket
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(address if "://" in address else f"gcs://{address}")
        host, port = parts.hostname, parts.port
    except ValueError:
        raise RayUnavailable(f"cannot connect to Ray at {address}: not a host:port address") from None
    if not host or port is None:
        return
    try:
        socket.create_connection((host, port), timeout=timeout_seconds).close()
    except OSError as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc)).lower()
        raise RayUnavailable(
            f"cannot connect to Ray at {address}: {why} within {timeout_seconds:g} s "
            "(is the head node running? check RAY_ADDRESS or --address)"
        ) from None


def grid_nodes() -> dict[str, NodeInfo]:
    """Nodes that carry a ``grid.node`` label, by name; a live node wins over a dead one of that name."""
    import ray

    available = _available_per_node()
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


CLIENT_READ_TIMEOUT_SECONDS = 60.0  # the first read over a client connection starts a worker on the cluster


def _available_per_node() -> dict[str, dict[str, float]]:
    """Each node's available resources, by node id: the one read of them, in a driver and over
    a ``ray://`` client connection alike.

    Ray's per-node read needs the driver's own GCS connection, which a client connection lacks;
    there it runs as a zero-CPU task on the cluster, as Ray's ``client_mode_wrap`` does for
    ``placement_group_table`` (not used itself: its ``ray.get`` has no timeout, and it would
    start a local Ray in a process not connected yet)."""
    import ray
    from ray._private.state import available_resources_per_node

    if ray.util.client.ray.is_connected():
        read = ray.remote(num_cpus=0, max_retries=0)(available_resources_per_node)
        return ray.get(read.remote(), timeout=CLIENT_READ_TIMEOUT_SECONDS)
    return available_resources_per_node()


def group_handle(group_id: str):
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    return PlacementGroup(PlacementGroupID(bytes.fromhex(group_id)))


def task_options(kind, need: Resources, node: str | None, *, group=None, labelled: bool = True) -> dict:
    """The Ray options that carry out one placement: the one builder, for the runner and
    the offload flow. ``kind`` is a ``PlacementKind``; ``group`` the boost's group handle.

    Tasks in a group or on a lender's label get ``max_retries=0``: a retry into a removed
    group, or onto a dead lender's label, waits forever; callers re-place lost tasks."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from grid_flows.core.placement import PlacementKind

    options: dict = {"num_cpus": need.cpu, "num_gpus": need.gpu}
    if need.memory:
        options["memory"] = need.memory
    if kind is PlacementKind.boost:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
        options["max_retries"] = 0
    elif labelled:
        options["label_selector"] = {NODE_LABEL: node}
        if kind is PlacementKind.offload:
            options["resources"] = lend_tokens(need)  # Ray keeps it within the lender's share
            options["max_retries"] = 0
    return options


def start_boost_group(name: str, source: str, resources: Resources):
    """Ask Ray to reserve ``resources`` on ``source`` as a detached group; returns at once.

    Ray queues a group it cannot place yet, so a group started now is placed before
    groups started later when capacity frees (how a preemptor keeps its turn).
    """
    from ray.util import placement_group

    return placement_group(
        [bundle(resources)],
        name=name,
        lifetime="detached",
        bundle_label_selector=[{NODE_LABEL: source}],
    )


def create_boost_group(name: str, source: str, resources: Resources, timeout_seconds: float) -> str | None:
    """Reserve ``resources`` on ``source``; the group's id, or None if it could not be placed
    within the timeout (the group is removed again then)."""
    from ray.util import remove_placement_group

    group = start_boost_group(name, source, resources)
    if group.wait(timeout_seconds=timeout_seconds):
        return group.id.hex()
    remove_placement_group(group)
    return None


def _group_available(group_id: str) -> dict[str, float]:
    """The group's resources Ray shows available, by plain name; empty once the group is gone."""
    suffix = f"_group_{group_id}"
    available: dict[str, float] = {}
    for per_node in _available_per_node().values():
        for key, value in per_node.items():
            if key.endswith(suffix):
                available[key[: -len(suffix)]] = value
    return available


def group_idle(group_id: str, bundle: dict[str, float]) -> bool:
    """True when no task holds any of the group's resources (every amount is available)."""
    available = _group_available(group_id)
    if not available:
        return True  # the group is gone or was never placed: nothing runs in it
    return all(available.get(k, 0.0) >= v - 1e-9 for k, v in bundle.items())


def remove_group(group_id: str) -> None:
    """Remove a placement group by id; removing one that is gone is not an error."""
    from ray.util import remove_placement_group

    with contextlib.suppress(Exception):
        remove_placement_group(group_handle(group_id))


def wait_group_freed(group_id: str, timeout_seconds: float = 2.0) -> bool:
    """Poll until Ray shows none of a removed group's resources (removal takes ~100 ms).
    Ray's view of the node's own pool can show the bundle back a moment later still.
    False if it is still held after ``timeout_seconds`` or Ray could not be asked."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            held = _group_available(group_id)
        except Exception as exc:  # the group is removed either way; only the wait is lost
            logger.warning("could not check that placement group %s freed its capacity: %s", group_id, exc)
            return False
        if not held:
            return True
        if time.monotonic() >= deadline:
            logger.warning("placement group %s still holds capacity %.1f s after removal", group_id, timeout_seconds)
            return False
        time.sleep(0.02)


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


def wait_for_lendable(node: str, resources: Resources, timeout_seconds: float = 5.0) -> bool:
    """Poll until ``node`` shows at least ``resources`` of lend tokens free."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        info = grid_nodes().get(node)
        if info and resources.fits_in(info.lendable_free):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


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
    tokens = node_tokens(node)
    if tokens:
        args.append(f"--resources={json.dumps({k: int(v) for k, v in tokens.items()}, separators=(',', ':'))}")
    return args


def _whole(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


