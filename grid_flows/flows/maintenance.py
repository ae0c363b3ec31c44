"""The built-in maintenance flows with their schedules, for `serve()` or `grid maintenance serve`.

Each deployment runs at most one at a time; a run that comes due while the previous
one still runs is cancelled (``CANCEL_NEW``). ``deployments/prefect.yaml`` declares the
same flows, schedules and triggers (Automations) for a work pool; ``SCHEDULES`` and
``triggers()`` are the source, and a test holds the file (and the rebalance interval of
``blocks/cluster.yaml``) equal to them.

Clusters sharing one Prefect server each serve their own: the deployments of a cluster other
than ``default`` are named ``grid-expire-<cluster>`` and so on, and its Automation reacts
only to its own boosts' events (label ``grid.cluster``). The cluster is the one the serving
process is set to (``PREFECT_INTEGRATIONS_GRID_CLUSTER_BLOCK``), and its flow runs judge
only that cluster's boosts.

Example:
    ```python
    from prefect import serve
    from grid_flows import maintenance_deployments

    serve(*maintenance_deployments())          # or: grid maintenance serve
    ```
"""

from __future__ import annotations

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from grid_flows.flows.lifecycle import expire_boosts, reconcile_boosts
from grid_flows.flows.rebalance import cluster_status_snapshot, rebalance
from grid_flows.core.models import DEFAULT_CLUSTER, ClusterSpec, cluster_scoped

# name -> (flow, interval seconds).
SCHEDULES = {
    "grid-expire": (expire_boosts, 30),
    "grid-reconcile": (reconcile_boosts, 300),
    "grid-rebalance": (rebalance, 30),
    "grid-cluster-status": (cluster_status_snapshot, 60),
}



def triggers(name: str, cluster: str = DEFAULT_CLUSTER) -> list[dict]:
    """The Automations that also run deployment ``name`` of ``cluster`` (deployment triggers).

    A lost boost's lender died: the boost controller ends it within seconds, and a reconcile
    pass of the same cluster runs at once.
    """
    if name != "grid-reconcile":
        return []
    return [{
        "type": "event", "enabled": True, "name": f"{cluster_scoped(name, cluster)} on grid.boost.lost",
        "description": "A boost was lost with its lender; make Ray and the records agree now.",
        "match": {"prefect.resource.id": "grid.boost.*", "grid.cluster": cluster}, "expect": ["grid.boost.lost"],
    }]


def maintenance_deployments(interval_scale: float = 1.0, spec: ClusterSpec | None = None) -> list:
    """RunnerDeployments of the maintenance flows; ``interval_scale`` shortens intervals for tests.

    ``grid-rebalance`` runs every ``resource_sharing.rebalance_interval_seconds`` of ``spec``
    (default: the saved cluster block, when there is one); the others on ``SCHEDULES``. The
    deployments belong to the cluster this process is set to, the one their flow runs judge;
    a ``spec`` of another cluster is refused rather than served under the wrong name.
    """
    from grid_flows.adapters.prefect.settings import GridSettings
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    from grid_flows.errors import InvalidRequest

    one_at_a_time = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
    intervals = {name: seconds for name, (_, seconds) in SCHEDULES.items()}
    cluster = GridSettings().cluster_block
    if spec is not None and spec.name not in (cluster, DEFAULT_CLUSTER):  # a cluster file's spec is unnamed
        raise InvalidRequest(
            f"the cluster spec is named {spec.name!r} but this process is set to cluster {cluster!r} "
            "(PREFECT_INTEGRATIONS_GRID_CLUSTER_BLOCK); the maintenance flows would judge the wrong boosts"
        )
    spec = spec if spec is not None else _saved_cluster()
    if spec is not None:
        intervals["grid-rebalance"] = spec.resource_sharing.rebalance_interval_seconds
    return [
        flow.to_deployment(
            name=cluster_scoped(name, cluster),
            interval=max(1.0, intervals[name] * interval_scale),
            concurrency_limit=one_at_a_time,
            tags=["grid-flows", "maintenance", f"grid-cluster:{cluster}"],
            description=(flow.description or "").strip().splitlines()[0] if flow.description else None,
            triggers=[DeploymentEventTrigger.model_validate(t) for t in triggers(name, cluster)],
        )
        for name, (flow, _) in SCHEDULES.items()
    ]


def _saved_cluster() -> ClusterSpec | None:
    from grid_flows.adapters.prefect.store import BoostStore
    from grid_flows.errors import ClusterNotConfigured

    try:
        with BoostStore() as store:
            return store.load_cluster()
    except ClusterNotConfigured:
        return None


def serve_maintenance(interval_scale: float = 1.0) -> None:
    """Serve every maintenance flow in this process until interrupted."""
    from prefect import serve

    serve(*maintenance_deployments(interval_scale), print_starting_message=True)
