"""Shared helpers for the benchmarks: quiet environment, statistics, result records."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

# Same quiet, light settings as tests/conftest.py; must be set before ray or prefect is imported.
QUIET_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_enable_worker_prestart": "0",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_INTEGRATIONS_GRID_GRANT_TIMEOUT_SECONDS": "2",
}


def quiet_environment() -> None:
    os.environ.update(QUIET_ENV)
    os.environ.pop("RAY_ADDRESS", None)


@dataclass
class Stats:
    """Median, min and max of a list of samples (any unit)."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    def pct(self, q: float) -> float:
        s = sorted(self.samples)
        k = min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))
        return s[k]

    def fmt(self, scale: float = 1.0, unit: str = "", digits: int = 2) -> str:
        return (f"{self.median * scale:.{digits}f}{unit} "
                f"[{self.min * scale:.{digits}f}..{self.max * scale:.{digits}f}]")


@dataclass
class Result:
    """One row of the table: a measurement against a same-run baseline, and its goal."""

    name: str
    measured: str  # absolute number(s) of the thing under test
    baseline: str  # absolute number(s) of the same-run baseline
    ratio: str  # measured / baseline: median [min..max] over repetitions
    goal: str
    passed: Optional[bool]  # None: no goal to judge (informational) or not run
    note: str = ""  # what dominates the number
    details: list[str] = field(default_factory=list)  # extra lines for BENCHMARKS.md

    @property
    def verdict(self) -> str:
        if self.passed is None:
            return "n/a"
        return "PASS" if self.passed else "FAIL"


def not_run(name: str, goal: str, why: str) -> Result:
    return Result(name, "not run", "-", "-", goal, None, why)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternating(measured: Callable[[], object], baseline: Callable[[], object],
                reps: int) -> tuple[list[float], list[float]]:
    """Wall times of ``measured`` and ``baseline`` over ``reps`` repetitions, run in turn (the order
    swaps every repetition, so neither always runs on a machine the other just warmed or loaded)."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(reps):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            times[which].append(timed((measured, baseline)[which]))
    return times


def run_alone(rows: Callable[[str], list[Result]]) -> int:
    """``python -m benchmarks.<one>``: ``rows(ray_address)`` against their own Prefect server and
    3-node Ray cluster, printed as ``make bench`` prints its table."""
    quiet_environment()  # before ray or prefect is imported
    from benchmarks import integration as I
    from benchmarks.run import table

    started = time.time()
    with I.grid() as (_spec, address):
        results = rows(address)
    print("\n" + "\n".join(table(results)))
    print(f"\n{time.time() - started:.0f} s")
    return 0


def ratio_stats(measured: list[float], baseline: list[float]) -> Stats:
    """Per-repetition ratios (the i-th measurement over the i-th baseline)."""
    return Stats([m / b for m, b in zip(measured, baseline)])
