"""grid-flows: Prefect flows that borrow CPU, GPU and memory across a Ray cluster.

Example:
    ```python
    from grid_flows import request_boost, release_boost

    boost = request_boost("gpu-master", cpu=2, duration="30m")
    release_boost(boost.id)
    ```

The public names are loaded on first use (PEP 562), so importing a pure module such as
``grid_flows.scheduler`` loads neither Ray nor Prefect.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "BoostRayTaskRunner": "grid_flows.runner",
    "boost": "grid_flows.api",
    "boosted": "grid_flows.api",
    "list_boosts": "grid_flows.api",
    "release_boost": "grid_flows.api",
    "request_boost": "grid_flows.api",
    "requires": "grid_flows.requirements",
    "load_cluster_file": "grid_flows.cluster_file",
    "local_cluster": "grid_flows.ray_cluster",
    "Boost": "grid_flows.models",
    "BoostState": "grid_flows.models",
    "BoostsDisabled": "grid_flows.models",
    "ClusterSpec": "grid_flows.models",
    "GridError": "grid_flows.models",
    "InvalidRequest": "grid_flows.models",
    "NoCapacity": "grid_flows.models",
    "Priority": "grid_flows.models",
    "Resources": "grid_flows.models",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'grid_flows' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs only
    from grid_flows.api import boost, boosted, list_boosts, release_boost, request_boost
    from grid_flows.cluster_file import load_cluster_file
    from grid_flows.models import (
        Boost, BoostsDisabled, BoostState, ClusterSpec, GridError, InvalidRequest, NoCapacity, Priority, Resources,
    )
    from grid_flows.ray_cluster import local_cluster
    from grid_flows.requirements import requires
    from grid_flows.runner import BoostRayTaskRunner
