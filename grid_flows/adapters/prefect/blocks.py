"""Prefect block types: the cluster definition and one durable record per boost.

Both show up in the Prefect UI under Blocks. Users edit the cluster in
``blocks/cluster.yaml`` and apply it with ``grid blocks apply``; boost records are
written by grid-flows itself (one document per boost, named ``boost-<id>``).

Example:
    >>> from grid_flows.adapters.prefect.blocks import GridCluster
    >>> cluster = GridCluster.load("default")          # doctest: +SKIP
    >>> cluster.to_spec().head.name                     # doctest: +SKIP
    'gpu-master'
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

from prefect.blocks.core import Block
from pydantic import Field

from grid_flows.core.models import (
    Boost,
    BoostState,
    ClusterSharing,
    ClusterSpec,
    NodeSpec,
    Priority,
    Resources,
)


class GridCluster(Block):
    """The grid-flows cluster definition: nodes, what each lends, and the sharing policy.

    Example:
        ```python
        from grid_flows.adapters.prefect.blocks import GridCluster
        spec = GridCluster.load("default").to_spec()
        print([n.name for n in spec.lenders()])
        ```
    """

    _block_type_name = "Grid Cluster"
    _block_type_slug = "grid-cluster"
    _description = "A Ray cluster of unequal machines: who lends what to whom (grid-flows)."
    _logo_url = None

    nodes: list[NodeSpec] = Field(..., description="The head and the workers, with what each lends.")
    resource_sharing: ClusterSharing = Field(default_factory=ClusterSharing, description="Cluster-wide policy.")

    @classmethod
    def from_spec(cls, spec: ClusterSpec) -> "GridCluster":
        return cls(nodes=spec.nodes, resource_sharing=spec.resource_sharing)

    def to_spec(self, name: str = "default") -> ClusterSpec:
        return ClusterSpec(
            name=name,
            nodes=[NodeSpec.model_validate(n.model_dump()) for n in self.nodes],
            resource_sharing=ClusterSharing.model_validate(self.resource_sharing.model_dump()),
        )


class GridBoost(Block):
    """One boost: a lease of a lender's capacity, held as a Ray placement group.

    Written by grid-flows; read it with ``grid_flows.list_boosts()`` or ``grid boost status``.
    """

    _block_type_name = "Grid Boost"
    _block_type_slug = "grid-boost"
    _description = "A grid-flows boost: capacity lent by a source node to a target (one record per boost)."
    _logo_url = None

    boost_id: str
    source: str = Field(..., description="Node that lends; boosted tasks run here.")
    target: str = Field(..., description="Node whose flows borrow the capacity.")
    cpu: float = 0.0
    gpu: float = 0.0
    memory_bytes: int = 0
    priority: Priority = Priority.normal
    state: BoostState = BoostState.pending
    created_at: datetime
    expires_at: datetime
    duration_seconds: float
    placement_group: str
    placement_group_id: Optional[str] = None
    granted_at: Optional[datetime] = None
    ended_at: Optional[datetime] = None
    reason: str = ""
    origin: str = "api"
    requested_by: str = Field("", description="Who asked: the flow run, or user@host for the CLI and Python API.")
    preempted_by: str = Field("", description="While active: the boost whose preemption of this one is under way.")

    @classmethod
    def from_boost(cls, boost: Boost) -> "GridBoost":
        data = boost.model_dump(exclude={"id", "resources"})
        return cls(
            boost_id=boost.id,
            cpu=boost.resources.cpu,
            gpu=boost.resources.gpu,
            memory_bytes=boost.resources.memory,
            **data,
        )


class GridBoostHistory(GridBoost):
    """An ended boost (released, expired, preempted, lost or failed), kept for the record.

    Live boosts are ``Grid Boost`` documents; when a boost ends its record moves here.
    """

    _block_type_name = "Grid Boost History"
    _block_type_slug = "grid-boost-history"
    _description = "An ended grid-flows boost, kept for the record."


def boost_from_data(data: dict) -> Boost:
    """A Boost from a GridBoost document's data (as read from the API)."""
    return Boost(
        id=data["boost_id"],
        resources=Resources(cpu=data.get("cpu", 0), gpu=data.get("gpu", 0), memory=data.get("memory_bytes", 0)),
        **{k: v for k, v in data.items() if k not in {"boost_id", "cpu", "gpu", "memory_bytes"}},
    )


def boost_document_name(boost_id: str) -> str:
    return f"boost-{boost_id}"


class GridMetricsHistory(Block):
    """Recent node metrics of grid-flows, so pressure trends survive between rebalance runs.

    Rows are ``[iso time, cpu %, memory %, swap %, load 1m, gpu util %, gpu memory %]`` per
    node, at most ``:data:`grid_flows.core.metrics.MAX_PERSISTED_PER_NODE``` per node.
    """

    _block_type_name = "Grid Metrics History"
    _block_type_slug = "grid-metrics-history"
    _description = "Recent per-node metrics (bounded) kept by grid-flows' rebalance flow."
    _logo_url = None

    samples: dict[str, list[list[Any]]] = Field(default_factory=dict)
    saved_at: Optional[str] = None
