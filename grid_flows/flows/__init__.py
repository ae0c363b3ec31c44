"""Boost lifecycle as Prefect flows, so each step can be run, scheduled and seen in the UI.

Example:
    ```python
    from grid_flows.flows import request_boost_flow, release_boost_flow
    boost = request_boost_flow(target="gpu-master", cpu=2, duration="30m")
    release_boost_flow(boost_id=boost["id"])
    ```
"""

from grid_flows.flows.lifecycle import (
    expire_boosts,
    extend_boost_flow,
    reconcile_boosts,
    release_boost_flow,
    request_boost_flow,
)

__all__ = ["expire_boosts", "extend_boost_flow", "reconcile_boosts", "release_boost_flow", "request_boost_flow"]
