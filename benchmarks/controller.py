"""The boost controller's rows alone (3, 4a/4b, 4c, 9 of `make bench`), with their own
Prefect server and 3-node Ray cluster; prints the table.

    .venv/bin/python -m benchmarks.controller
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import Result, quiet_environment  # noqa: E402

quiet_environment()  # before ray or prefect is imported


def main() -> int:
    from benchmarks import admission_throughput
    from benchmarks import integration as I
    from benchmarks.run import machine, table, versions

    started = time.time()
    results = []
    with I.grid() as (_spec, address):
        for label, step in (
            ("grant latency", lambda: [I.grant_latency(15)[0]]),
            ("release/expiry latency", lambda: I.release_latency(8, 20)),
            ("runner notification", lambda: [I.runner_notification(10)]),
            ("admission throughput", lambda: [admission_throughput.admission_throughput(address)]),
        ):
            print(f"{label} ...", flush=True)
            try:
                results += step()
            except Exception as exc:  # report, don't hide: the row says it failed to run
                results.append(Result(label, f"ERROR: {type(exc).__name__}: {exc}"[:300], "-", "-", "-", False))
            I._clean()
    print(f"\n{machine()}\n{versions()}\n")
    print("\n".join(table(results)))
    for r in results:
        if r.note:
            print(f"- **{r.name}**: {r.note}")
        for line in r.details or []:
            print(f"  - {line}")
    print(f"\n{time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
