"""The placements report of one flow run: a row per task run, and exact counts on top.

The runner adds one ``Placed`` per task it hands to Ray and publishes the report as the
flow run's ``grid-placements`` table artifact. The table keeps the first ``limit`` rows
and says how many more there were; the counts cover every task run.

Example:
    ```python
    from grid_flows.core.placement_report import Placed, PlacementReport

    report = PlacementReport(limit=1)
    report.add(Placed("square-0", "1b2c3d4e", "target", "gpu-master", "", "fits on the target", 0.0, None))
    report.add(Placed("square-1", "5f6a7b8c", "boost", "gpu1", "3f2a9c1b", "target full; boost has room", 0.4, 0.15))
    report.summary("local_first")
    # '2 task runs (strategy local_first). By node: gpu-master 1 (target 1), gpu1 1 (boost 1). ...'
    report.rows()[-1]["Task"]   # '... and 1 more task run'
    ```
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional

from grid_flows.core.units import NO_VALUE

ROW_LIMIT = 200  # rows the table shows; a table artifact of thousands of rows is unreadable in the UI
COLUMNS = ("Task", "Task run", "Decision", "Node", "Boost", "Queue wait", "Pressure", "Reason")


@dataclass(frozen=True)
class Placed:
    """One task run handed to Ray: where, why, and how long it waited in the runner's queue."""

    task: str
    task_run: str  # short id, as the UI shows task runs
    decision: str  # PlacementKind value: target, boost or offload
    node: str
    boost: str  # the boost's short id, or "" outside a boost
    reason: str
    queue_wait_seconds: float
    pressure: Optional[float]  # the node's pressure score the decision saw; None: no fresh sample


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


class PlacementReport:
    """Rows for the first ``limit`` task runs, exact counts for all."""

    def __init__(self, limit: int = ROW_LIMIT) -> None:
        self.limit = limit
        self._rows: list[Placed] = []
        self.total = 0
        self.by_decision: Counter = Counter()
        self.by_node: dict[str, Counter] = {}

    def add(self, placed: Placed) -> None:
        self.total += 1
        self.by_decision[placed.decision] += 1
        self.by_node.setdefault(placed.node, Counter())[placed.decision] += 1
        if len(self._rows) < self.limit:
            self._rows.append(placed)

    def rows(self) -> list[dict[str, str]]:
        """The table: one row per kept task run, then an "and N more" row when some were left out."""
        table = [{
            "Task": p.task, "Task run": p.task_run, "Decision": p.decision, "Node": p.node, "Boost": p.boost or NO_VALUE,
            "Queue wait": f"{p.queue_wait_seconds:.2f} s", "Pressure": NO_VALUE if p.pressure is None else f"{p.pressure:.2f}",
            "Reason": p.reason,
        } for p in self._rows]
        left_out = self.total - len(self._rows)
        if left_out:
            table.append({column: "" for column in COLUMNS} | {"Task": f"... and {_plural(left_out, 'more task run')}"})
        return table

    def summary(self, strategy: str) -> str:
        """One paragraph of exact counts: per node (with its decisions) and per decision."""
        nodes = ", ".join(
            f"{node} {sum(kinds.values())} ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))})"
            for node, kinds in sorted(self.by_node.items()))
        decisions = ", ".join(f"{k} {n}" for k, n in sorted(self.by_decision.items()))
        shown = "" if self.total <= self.limit else f" The table shows the first {self.limit}."
        return (f"{_plural(self.total, 'task run')} (strategy {strategy}). By node: {nodes}. "
                f"By decision: {decisions}.{shown} 'target': the flow's own node; 'boost': inside a boost's "
                f"placement group on the lender; 'offload': within another node's lendable share.")
