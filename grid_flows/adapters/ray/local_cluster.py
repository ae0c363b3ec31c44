"""A Ray cluster on this machine shaped by a cluster spec: one Ray node per grid node.

Example:
    ```python
    from grid_flows import load_cluster_file, local_cluster
    from grid_flows.adapters.ray.cluster import grid_nodes

    with local_cluster(load_cluster_file("blocks/cluster.yaml")) as address:
        print(sorted(grid_nodes()))     # ['gpu-master', 'gpu1', 'gpu2']
    ```
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from grid_flows.adapters.ray.cluster import NODE_LABEL, connect, quiet_ray_environment, shutdown
from grid_flows.adapters.ray.tokens import node_tokens
from grid_flows.core.models import ClusterSpec, NodeSpec
from grid_flows.errors import GridError


# Small object stores keep a one-machine cluster light (docs/architecture.md, "Ray facts").
LOCAL_OBJECT_STORE_BYTES = 78 * 1024**2


_FAST_HEALTH_CHECK = {
    "RAY_health_check_period_ms": "200",
    "RAY_health_check_timeout_ms": "200",
    "RAY_health_check_failure_threshold": "3",
}


class LocalCluster:
    """Ray nodes on this machine shaped by a cluster spec; see :func:`local_cluster`.

    Use the class when a test must stop one node (``stop_node("gpu1")``) while others run.
    """

    def __init__(self, spec: ClusterSpec, *, tmp_dir: str | None = None, fast_health_check: bool = False,
                 connect_driver: bool = True):
        self.spec = spec
        self._owns_tmp = tmp_dir is None
        self.tmp_dir = tmp_dir or tempfile.mkdtemp(prefix="grid-ray-", dir="/tmp")
        self.fast_health_check = fast_health_check
        self.connect_driver = connect_driver
        self.address = ""
        self._cluster = None
        self._nodes: dict[str, object] = {}
        self._saved_env: dict[str, str | None] = {}

    def __enter__(self) -> "LocalCluster":
        self._saved_env = {k: os.environ.get(k) for k in (*_FAST_HEALTH_CHECK, "RAY_ADDRESS", "RAY_TMPDIR")}
        quiet_ray_environment(self.tmp_dir)
        if self.fast_health_check:
            os.environ.update(_FAST_HEALTH_CHECK)  # read by the GCS at start: lost nodes seen in ~0.6 s
        from ray.cluster_utils import Cluster

        self._cluster = Cluster(
            initialize_head=True,
            head_node_args={**self._node_args(self.spec.head), "include_dashboard": False},
        )
        try:
            self._nodes[self.spec.head.name] = self._cluster.head_node
            for worker in self.spec.workers:
                self._nodes[worker.name] = self._cluster.add_node(**self._node_args(worker))
            self._cluster.wait_for_nodes()
            self.address = self._cluster.address
            os.environ["RAY_ADDRESS"] = self.address
            if self.connect_driver:
                connect(self.address)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def stop_node(self, name: str) -> None:
        """Kill one worker node's processes, as if its machine went away."""
        self._cluster.remove_node(self._nodes.pop(name), allow_graceful=False)

    def restart_node(self, name: str) -> None:
        """Start a worker node stopped by :meth:`stop_node` again, as the machine coming back:
        the same size, lend tokens and ``grid.node`` label as at start (Ray gives it a new
        node id). Returns once Ray lists it alive; it is stopped with the cluster."""
        if name in self._nodes:
            raise GridError(f"node {name} is running; stop_node({name!r}) first")
        node = self.spec.node(name)
        if name == self.spec.head.name:
            raise GridError(f"node {name} is the head: a local cluster cannot restart its head")
        self._nodes[name] = self._cluster.add_node(**self._node_args(node))

    def __exit__(self, *exc: object) -> None:
        import ray

        if ray.is_initialized():
            shutdown()
        if self._cluster is not None:
            self._cluster.shutdown()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if self._owns_tmp:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    @staticmethod
    def _node_args(node: NodeSpec) -> dict:
        return dict(
            num_cpus=node.cpu_count,
            num_gpus=node.gpu_count,
            memory=int(node.size.memory),
            resources={k: int(v) for k, v in node_tokens(node).items()},
            labels={NODE_LABEL: node.name},
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
        )


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
    with LocalCluster(spec, tmp_dir=tmp_dir, fast_health_check=fast_health_check,
                      connect_driver=connect_driver) as cluster:
        yield cluster.address
