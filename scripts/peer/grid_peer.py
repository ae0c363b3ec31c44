"""pytest plugin for `make peer`: prefect-ray's own test suite, run against BoostRayTaskRunner.

Loaded with ``-p grid_peer`` from prefect-ray's unmodified ``tests/`` folder. With
``--grid-runner=grid`` it replaces ``prefect_ray.RayTaskRunner`` by
:class:`grid_flows.BoostRayTaskRunner` before the test modules import it, so every test and
fixture builds grid-flows' runner with the same arguments; ``--grid-runner=ray`` changes
nothing (the baseline). ``--grid-cluster=labelled`` also names every Ray node the tests
start with a ``grid.node`` label (and a lender its lend tokens, as ``grid node ray-args``
gives them) and applies a matching GridCluster block to the tests' Prefect server, so the
runner places tasks as it does on the project's cluster.

Example:
    ```bash
    cd prefect_ray-0.6.0 && python -m pytest tests -p grid_peer --grid-runner=grid
    ```
"""

from __future__ import annotations

import os

import pytest

HEAD, WORKER = "peer-head", "peer-worker"


def pytest_addoption(parser):
    group = parser.getgroup("grid-peer")
    group.addoption("--grid-runner", choices=("ray", "grid"), default="grid",
                    help="ray: prefect-ray's RayTaskRunner as it is; grid: BoostRayTaskRunner in its place")
    group.addoption("--grid-cluster", choices=("none", "labelled"), default="none",
                    help="labelled: grid.node labels on every Ray node the tests start, and a GridCluster block")


def pytest_configure(config):
    if config.getoption("--grid-runner") == "grid":
        import prefect_ray

        from grid_flows import BoostRayTaskRunner

        prefect_ray.RayTaskRunner = BoostRayTaskRunner  # what `from prefect_ray import RayTaskRunner` gets
    if config.getoption("--grid-cluster") == "labelled":
        _label_every_node()


def _peer_spec():
    """The GridCluster of the labelled run: ``peer-head``, and ``peer-worker`` lending its one CPU
    (``ray.cluster_utils.Cluster`` gives each node one CPU unless told otherwise)."""
    import psutil

    from grid_flows.core.cluster_file import parse_cluster

    memory_gb = max(1, int(psutil.virtual_memory().total / 1024**3 / 4))
    return parse_cluster({
        "nodes": [
            {"name": HEAD, "role": "head", "cpu_count": psutil.cpu_count() or 2, "memory_gb": memory_gb},
            {"name": WORKER, "role": "worker", "cpu_count": 1, "memory_gb": memory_gb,
             "resource_sharing": {"can_share": True, "max_share_cpu": 1}},
        ],
    })


def _label_every_node() -> None:
    """Every Ray node started in this process carries ``grid.node``: the first one (the head)
    ``peer-head``, later ones ``peer-worker`` (the in-process cluster's second node), which also
    declares its lend tokens. The existing-cluster fixture's ``ray start --head`` runs in a
    subprocess this cannot reach: its node stays unlabelled, and the runner treats it as a
    plain Ray cluster's node."""
    import ray
    import ray.cluster_utils

    from grid_flows.adapters.ray.cluster import NODE_LABEL
    from grid_flows.adapters.ray.tokens import node_tokens

    worker_tokens = node_tokens(_peer_spec().node(WORKER))

    original_init = ray.init
    original_add_node = ray.cluster_utils.Cluster.add_node

    def init(*args, **kwargs):
        if not args and not kwargs.get("address") and not os.environ.get("RAY_ADDRESS"):
            kwargs.setdefault("labels", {NODE_LABEL: HEAD})  # a new local cluster: its head is ours
        return original_init(*args, **kwargs)

    def add_node(self, *args, **kwargs):
        head = self.head_node is None
        kwargs.setdefault("labels", {NODE_LABEL: HEAD if head else WORKER})
        if not head:
            kwargs["resources"] = {**worker_tokens, **(kwargs.get("resources") or {})}
        return original_add_node(self, *args, **kwargs)

    ray.init = init
    ray.cluster_utils.Cluster.add_node = add_node


@pytest.fixture(scope="session", autouse=True)
def _grid_cluster_block(request, prefect_db):
    """With ``--grid-cluster=labelled``: the GridCluster block for the labelled nodes, saved to
    the tests' Prefect server (prefect-ray's ``prefect_db`` fixture) before any test runs."""
    if request.config.getoption("--grid-cluster") != "labelled":
        yield
        return
    from grid_flows.adapters.prefect.store import BoostStore

    with BoostStore() as store:
        store.save_cluster(_peer_spec())
    yield
