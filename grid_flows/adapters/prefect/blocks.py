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
from pydantic import Field, model_validator

from grid_flows.adapters.prefect.records import BOOST_HISTORY_SLUG, BOOST_SLUG
from grid_flows.core.units import NO_VALUE, format_bytes, format_duration
from grid_flows.core.models import (
    DEFAULT_CLUSTER,
    Boost,
    BoostState,
    ClusterSharing,
    ClusterSpec,
    NodeSpec,
    Priority,
)


SUMMARY_SEPARATOR = " · "


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

    # First, so the UI shows it on top. The UI shows a list or a mapping (`nodes`) as one clipped
    # JSON line, and a string wrapped (newlines collapsed): so one string, nodes joined by " · ".
    summary: str = Field("", title="Nodes at a glance",
                         description="Each node in a few words, written from `nodes` by `grid blocks apply` "
                         "(an edit of `nodes` in the UI shows here after the next apply).")
    nodes: list[NodeSpec] = Field(..., description="The head and the workers, with what each lends.")
    resource_sharing: ClusterSharing = Field(default_factory=ClusterSharing, description="Cluster-wide policy.")

    @model_validator(mode="after")
    def _summarise(self) -> "GridCluster":
        # Derived, so never validated again.
        self.__dict__["summary"] = SUMMARY_SEPARATOR.join(f"{node.name}: {node.describe()}" for node in self.nodes)
        return self

    @classmethod
    def from_spec(cls, spec: ClusterSpec) -> "GridCluster":
        return cls(nodes=spec.nodes, resource_sharing=spec.resource_sharing)

    def to_spec(self, name: str = DEFAULT_CLUSTER) -> ClusterSpec:
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
    _block_type_slug = BOOST_SLUG
    _description = ("A grid-flows boost: capacity lent by a source node to a target (one record per boost). "
                    "Managed by grid-flows: read it with `grid boost status`; do not use or edit it in flows.")
    _logo_url = None

    boost_id: str = Field(..., title="Boost id")
    source: str = Field(..., title="Source (lender)", description="Node that lends; boosted tasks run here.")
    target: str = Field(..., title="Target (borrower)", description="Node whose flows borrow the capacity.")
    cpu: float = Field(0.0, title="CPU")
    gpu: float = Field(0.0, title="GPU")
    memory_bytes: int = Field(0, title="Memory (bytes)")
    memory: str = Field("", title="Memory", description="memory_bytes with units (written by grid-flows).")
    duration: str = Field("", title="Duration", description="duration_seconds with units (written by grid-flows).")
    priority: Priority = Field(Priority.normal, title="Priority")
    state: BoostState = Field(BoostState.pending, title="State")
    created_at: datetime = Field(..., title="Requested at")
    expires_at: datetime = Field(..., title="Expires at")
    duration_seconds: float = Field(..., title="Duration (seconds)")
    placement_group: str = Field(..., title="Ray placement group")
    placement_group_id: Optional[str] = Field(None, title="Ray placement group id")
    granted_at: Optional[datetime] = Field(None, title="Granted at")
    ended_at: Optional[datetime] = Field(None, title="Ended at")
    reason: str = Field("", title="Reason")
    origin: str = Field("api", title="Origin", description="api, or rebalance for boosts the rebalance flow granted.")
    requested_by: str = Field("", title="Requested by",
                              description="Who asked: the flow run, or user@host for the CLI and Python API.")
    preempted_by: str = Field("", title="Being preempted by",
                              description="While active: the boost whose preemption of this one is under way.")
    cluster: str = Field(DEFAULT_CLUSTER, title="Cluster", description="The GridCluster block this boost belongs to.")
    ray_session: str = Field("", title="Ray session",
                             description="The Ray cluster it was granted in (Ray's session name, new at each head start).")

    @classmethod
    def from_boost(cls, boost: Boost) -> "GridBoost":
        data = boost.model_dump(exclude={"id", "resources"})
        return cls(
            boost_id=boost.id,
            cpu=boost.resources.cpu,
            gpu=boost.resources.gpu,
            memory_bytes=boost.resources.memory,
            memory=format_bytes(boost.resources.memory) if boost.resources.memory else NO_VALUE,
            duration=format_duration(boost.duration_seconds),
            **data,
        )


class GridBoostHistory(GridBoost):
    """An ended boost (released, expired, preempted, lost or failed), kept for the record.

    Live boosts are ``Grid Boost`` documents; when a boost ends its record moves here.
    """

    _block_type_name = "Grid Boost History"
    _block_type_slug = BOOST_HISTORY_SLUG
    _description = ("An ended grid-flows boost, kept for the record (reconcile deletes the oldest past the "
                    "cluster's history retention). Managed by grid-flows: `grid boost status --all` lists them.")


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
