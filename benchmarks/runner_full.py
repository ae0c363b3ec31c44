"""Row 6 at the issue's size: a flow of 500 trivial tasks, BoostRayTaskRunner vs prefect-ray.

`make bench` runs the runner benchmark with 150 tasks to stay inside its time budget; this
script runs the same benchmark with 500 (about 10 minutes here) and prints the row.

    .venv/bin/python -m benchmarks.runner_full [TASKS] [REPETITIONS]
"""

from __future__ import annotations

import sys
import time

from benchmarks.common import quiet_environment


def main(argv: list[str]) -> int:
    tasks = int(argv[0]) if argv else 500
    reps = int(argv[1]) if len(argv) > 1 else 5
    quiet_environment()
    from benchmarks import integration as I

    started = time.time()
    with I.grid() as (_spec, address):
        row = I.runner_overhead(address, tasks, reps)
    print(f"| {row.name} | {row.measured} | {row.baseline} | {row.ratio} | {row.goal} | {row.verdict} |")
    print(f"{time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
