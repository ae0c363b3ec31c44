"""The placements report: a row per task run up to the limit, exact counts for all (core.placement_report)."""

from __future__ import annotations

import pytest

from grid_flows.core.placement_report import COLUMNS, Placed, PlacementReport
from grid_flows.core.units import NO_VALUE


def _placed(i: int, decision: str = "target", node: str = "gpu-master", boost: str = "") -> Placed:
    return Placed(f"square-{i}", f"{i:08x}", decision, node, boost, f"reason {i}", 0.25 * i, 0.5 if i % 2 else None)


@pytest.mark.parametrize("added,limit,rows,more_line", [
    (0, 3, 0, None),
    (2, 3, 2, None),
    (3, 3, 3, None),
    (4, 3, 3, "... and 1 more task run"),
    (10, 3, 3, "... and 7 more task runs"),
])
def test_rows_are_bounded_with_a_line_for_the_rest(added, limit, rows, more_line):
    report = PlacementReport(limit=limit)
    for i in range(added):
        report.add(_placed(i))
    table = report.rows()
    assert len(table) == rows + (more_line is not None)
    assert all(tuple(row) == COLUMNS for row in table)
    if more_line:
        assert table[-1]["Task"] == more_line and table[-1]["Node"] == ""
    assert report.total == added


def test_a_row_shows_the_decision_the_boost_the_wait_and_the_pressure():
    report = PlacementReport()
    report.add(_placed(1, "boost", "gpu1", "3f2a9c1b"))
    report.add(_placed(2))
    boosted, plain = report.rows()
    assert boosted == {"Task": "square-1", "Task run": "00000001", "Decision": "boost", "Node": "gpu1",
                       "Boost": "3f2a9c1b", "Queue wait": "0.25 s", "Pressure": "0.50", "Reason": "reason 1"}
    assert (plain["Boost"], plain["Pressure"]) == (NO_VALUE, NO_VALUE)


def test_the_summary_counts_every_task_run_per_node_and_per_decision():
    report = PlacementReport(limit=2)
    for i in range(3):
        report.add(_placed(i))
    report.add(_placed(3, "boost", "gpu1", "3f2a9c1b"))
    report.add(_placed(4, "offload", "gpu2"))
    summary = report.summary("local_first")
    assert summary.startswith("5 task runs (strategy local_first). By node: gpu-master 3 (target 3), "
                              "gpu1 1 (boost 1), gpu2 1 (offload 1). By decision: boost 1, offload 1, target 3.")
    assert "The table shows the first 2." in summary
    assert "The table shows" not in PlacementReport().summary("local_first")
