"""Keep the node-metrics history in a ``GridMetricsHistory`` block, so trends outlive a flow run.

Example:
    ```python
    from grid_flows.adapters.prefect.metrics_store import BlockHistoryStore, load_history
    from grid_flows.core.metrics import MetricsCollector

    collector = MetricsCollector(source, BlockHistoryStore())   # this process's cluster's
    history = load_history("lab")                               # or the one named "lab"
    ```
"""

from __future__ import annotations

from datetime import datetime
from typing import Optional

from grid_flows.adapters.prefect.blocks import GridMetricsHistory
from grid_flows.core.metrics import check_history_name, history_from_data
from grid_flows.core.models import utcnow
from grid_flows.core.pressure import MetricsHistory


def history_name(name: Optional[str] = None) -> str:
    """``name``, or by default this process's cluster's: one ``GridMetricsHistory`` document per
    cluster, named like its GridCluster block, so clusters sharing a server keep apart trends."""
    if name is None:
        from grid_flows.adapters.prefect.settings import GridSettings

        name = GridSettings().cluster_block
    return check_history_name(name)


class BlockHistoryStore:
    """The persisted history in the ``GridMetricsHistory`` block document ``name`` (default: the cluster's)."""

    def __init__(self, name: Optional[str] = None) -> None:
        self.name = history_name(name)

    def load(self) -> dict:
        cls = GridMetricsHistory
        try:
            block = cls.load(self.name, _sync=True)  # _sync: also from inside an async flow
        except ValueError:  # no such document yet (or the type is not registered yet)
            return {}
        return dict(block.samples or {})

    def save(self, data: dict) -> None:
        cls = GridMetricsHistory
        cls(samples=data, saved_at=utcnow().isoformat()).save(self.name, overwrite=True, _sync=True)


def load_history(name: Optional[str] = None, now: datetime | None = None) -> MetricsHistory:
    """The persisted history (empty when none was saved yet)."""
    return history_from_data(BlockHistoryStore(name).load(), now=now or utcnow())
