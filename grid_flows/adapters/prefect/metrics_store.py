"""Keep the node-metrics history in a ``GridMetricsHistory`` block, so trends outlive a flow run.

Example:
    ```python
    from grid_flows.adapters.prefect.metrics_store import BlockHistoryStore, load_history
    from grid_flows.core.metrics import MetricsCollector

    collector = MetricsCollector(source, BlockHistoryStore("default"))
    history = load_history("default")
    ```
"""

from __future__ import annotations

from datetime import datetime

from grid_flows.adapters.prefect.blocks import GridMetricsHistory
from grid_flows.core.metrics import check_history_name, history_from_data
from grid_flows.core.models import utcnow
from grid_flows.core.pressure import MetricsHistory


HISTORY_BLOCK_DEFAULT = "default"


class BlockHistoryStore:
    """The persisted history in the ``GridMetricsHistory`` block document ``name``."""

    def __init__(self, name: str = HISTORY_BLOCK_DEFAULT) -> None:
        self.name = check_history_name(name)

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


def load_history(name: str = HISTORY_BLOCK_DEFAULT, now: datetime | None = None) -> MetricsHistory:
    """The persisted history (empty when none was saved yet)."""
    return history_from_data(BlockHistoryStore(name).load(), now=now or utcnow())
