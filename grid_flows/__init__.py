"""grid-flows: Prefect flows that borrow CPU, GPU and memory across a Ray cluster.

Example:
    ```python
    from grid_flows import request_boost, release_boost

    boost = request_boost("gpu-master", cpu=2, duration="30m")
    release_boost(boost.id)
    ```

The public names are loaded on first use (PEP 562), so importing a pure module such as
``grid_flows.core.placement`` loads neither Ray nor Prefect.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "BoostRayTaskRunner": "grid_flows.runner.task_runner",
    "boost": "grid_flows.api",
    "boosted": "grid_flows.api",
    "list_boosts": "grid_flows.api",
    "release_boost": "grid_flows.api",
    "request_boost": "grid_flows.api",
    "requires": "grid_flows.runner.requirements",
    "load_cluster_file": "grid_flows.core.cluster_file",
    "local_cluster": "grid_flows.adapters.ray.local_cluster",
    "Boost": "grid_flows.core.models",
    "BoostState": "grid_flows.core.models",
    "BoostsDisabled": "grid_flows.errors",
    "ClusterSpec": "grid_flows.core.models",
    "GridError": "grid_flows.errors",
    "InvalidRequest": "grid_flows.errors",
    "NoCapacity": "grid_flows.errors",
    "Priority": "grid_flows.core.models",
    "Resources": "grid_flows.core.models",
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
    from grid_flows.core.cluster_file import load_cluster_file
    from grid_flows.core.models import Boost, BoostState, ClusterSpec, Priority, Resources
    from grid_flows.errors import BoostsDisabled, GridError, InvalidRequest, NoCapacity
    from grid_flows.adapters.ray.local_cluster import local_cluster
    from grid_flows.runner.requirements import requires
    from grid_flows.runner.task_runner import BoostRayTaskRunner
