"""grid-flows settings: ``PREFECT_INTEGRATIONS_GRID_*`` variables or ``[integrations.grid]`` in prefect.toml.

Example:
    >>> import os
    >>> os.environ["PREFECT_INTEGRATIONS_GRID_CLUSTER_BLOCK"] = "lab"
    >>> GridSettings().cluster_block
    'lab'
    >>> del os.environ["PREFECT_INTEGRATIONS_GRID_CLUSTER_BLOCK"]
"""

from __future__ import annotations

import os
from typing import Optional

from prefect.settings.base import PrefectBaseSettings, build_settings_config
from pydantic import Field

from grid_flows.core.models import DEFAULT_CLUSTER

# One Ray namespace everywhere: detached groups and actors are found by name only
# from the namespace that made them (docs/architecture.md, "Ray facts").
RAY_NAMESPACE = "grid-flows"


class GridSettings(PrefectBaseSettings):
    model_config = build_settings_config(("integrations", "grid"))

    ray_address: Optional[str] = Field(
        None, description="Ray cluster address; falls back to RAY_ADDRESS, then to a running local Ray."
    )
    cluster_block: str = Field(DEFAULT_CLUSTER, description="Name of the GridCluster block document to use.")
    grant_timeout_seconds: float = Field(
        2.0, gt=0, description="How long a boost's placement group may take to be placed before the grant fails."
    )
    lock_timeout_seconds: float = Field(30.0, gt=0, description="How long to wait for the ledger lock.")
    controller: bool = Field(
        True, description="Send boost operations to the cluster's boost controller (a Ray actor on the head). "
        "Off: every process changes the records itself under the cluster-wide ledger lock, and a boost "
        "ends when the grid-expire flow or the next request sees it overdue.",
    )
    controller_wait_seconds: float = Field(
        60.0, gt=0, description="How long a caller waits for the boost controller to answer (or to come back "
        "after a restart) before it gives up with an error.",
    )
    exit_wait_seconds: float = Field(
        600.0, ge=0, description="How long a BoostRayTaskRunner waits at the flow's end for tasks nobody waited on; "
        "then it fails those not yet started and leaves the running ones to Ray, saying which.",
    )
    vram_wait_seconds: float = Field(
        30.0, ge=0, description="How long a GPU task waits on its node for its VRAM to fit under the cap before it fails."
    )


def ray_address(explicit: str | None = None) -> str | None:
    """Respect Ray's own convention: an explicit address, then our setting, then RAY_ADDRESS."""
    return explicit or GridSettings().ray_address or os.environ.get("RAY_ADDRESS") or None


def prefect_env_for_workers() -> dict[str, str]:
    """The Prefect setting a Ray worker process needs before any task reaches it: the API URL.

    Without it every worker would start its own temporary server.
    The API key is deliberately not here: Ray keeps a job's runtime environment in plain
    text (GCS, logs, dashboard). Each task carries its flow run's settings, key included,
    in its serialized context, the way Prefect's own task runners pass it.
    """
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    return {"PREFECT_API_URL": url} if url else {}
