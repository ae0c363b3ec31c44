"""grid-flows: Prefect flows that borrow CPU, GPU and memory across a Ray cluster.

Example:
    ```python
    from grid_flows import request_boost, release_boost

    boost = request_boost("gpu-master", cpu=2, duration="30m")
    release_boost(boost.id)
    ```
"""

from grid_flows.api import boost, boosted, list_boosts, release_boost, request_boost
from grid_flows.cluster_file import load_cluster_file
from grid_flows.models import (
    Boost,
    BoostState,
    BoostsDisabled,
    ClusterSpec,
    GridError,
    InvalidRequest,
    NoCapacity,
    Priority,
    Resources,
)
from grid_flows.ray_cluster import local_cluster
from grid_flows.requirements import requires
from grid_flows.runner import BoostRayTaskRunner

__all__ = [
    "BoostRayTaskRunner",
    "boost",
    "boosted",
    "requires",
    "Boost",
    "BoostState",
    "BoostsDisabled",
    "ClusterSpec",
    "GridError",
    "InvalidRequest",
    "NoCapacity",
    "Priority",
    "Resources",
    "list_boosts",
    "load_cluster_file",
    "local_cluster",
    "release_boost",
    "request_boost",
]
