"""Controller chaos: the boost controller killed at random points of request, release and expiry.

`make chaos` (= `.venv/bin/python -m benchmarks.chaos --kills 30`); not part of `make test`.

It starts its own local Prefect server and 3-node local Ray cluster (``benchmarks.integration.grid``),
then for each round picks an operation and kills the controller actor (``ray.kill``, Ray restarts
it) a random 0-150 ms after the operation started:

* ``request``: 1 CPU from the lender with room for 60 s, in a thread; it is resent transparently until
  the restarted controller answers (requests carry a key, so a resent one returns the first grant);
* ``release``: of a boost an earlier round granted, in a thread;
* ``expiry``: a 1-second boost granted just before, so its deadline falls in the kill window.

After each round it waits for the controller to answer again (the restart time) and checks:

* **no lost record**: every boost a call acknowledged has its record;
* **no orphan group**: every grid placement group in Ray has a live record (by group name);
* **no live record without its group**: every active record's group is in Ray;
* **nothing past its deadline**: no record is active more than 1 s plus the restart time past
  its ``expires_at``; an expiry round's boost ended within that bound;
* **no unclear error**: an operation either returned, or raised a grid-flows error.

It prints a table and exits 1 when any check fails. Every process it started is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import Stats, quiet_environment  # noqa: E402

quiet_environment()  # before ray or prefect is imported

OPERATIONS = ("request", "release", "expiry")
RESTART_WAIT_SECONDS = 60.0


@dataclass
class Chaos:
    acknowledged: set[str] = field(default_factory=set)  # boosts a request returned
    live: list[str] = field(default_factory=list)  # granted, not yet released by a round
    expiring: dict[str, float] = field(default_factory=dict)  # boost id -> the restart time of its round
    restarts: list[float] = field(default_factory=list)
    rounds: Counter = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except Exception as exc:  # judged by the round: a grid-flows error is clear, anything else is not
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _started_at() -> str | None:
    import ray

    from grid_flows.control import client

    try:
        return ray.get(client.controller().status.remote(), timeout=5)["started_at"]
    except Exception:  # dead or restarting
        return None


def _kill_and_time_restart(before: str) -> float:
    """Kill the controller (Ray restarts it); seconds until a new instance (started after
    ``before``) answers."""
    import ray

    from grid_flows.control import client

    killed = time.monotonic()
    ray.kill(client.controller(), no_restart=False)
    deadline = killed + RESTART_WAIT_SECONDS
    while True:
        started = _started_at()
        if started is not None and started != before:
            return time.monotonic() - killed
        if time.monotonic() > deadline:
            raise RuntimeError(f"the controller did not come back within {RESTART_WAIT_SECONDS:g} s")
        time.sleep(0.05)  # polling the restarting actor, bounded by the deadline


def _round(chaos: Chaos, operation: str, rng: random.Random) -> None:
    from grid_flows import release_boost, request_boost
    from grid_flows.errors import GridError

    source = None  # the lender with room: a named one may be full with the boost kept live
    if operation == "release" and not chaos.live:
        operation = "request"
    if operation == "request":
        call = lambda: request_boost("gpu-master", cpu=1, source=source, duration=60)  # noqa: E731
    elif operation == "release":
        boost_id = chaos.live.pop(rng.randrange(len(chaos.live)))
        call = lambda: release_boost(boost_id)  # noqa: E731
    else:
        short = request_boost("gpu-master", cpu=1, source=source, duration=1)
        chaos.acknowledged.add(short.id)
        call = lambda: short  # noqa: E731
    chaos.rounds[operation] += 1
    before = _started_at()
    thread, outcome = _in_thread(call)
    time.sleep(rng.uniform(0, 0.15))  # the random point of the operation at which the controller dies
    restart = _kill_and_time_restart(before)
    chaos.restarts.append(restart)
    thread.join(RESTART_WAIT_SECONDS + 30)
    if thread.is_alive():
        chaos.violations.append(f"{operation}: no answer {RESTART_WAIT_SECONDS + 30:g} s after the kill")
        return
    if "error" in outcome:
        exc = outcome["error"]
        (chaos.errors if isinstance(exc, GridError) else chaos.violations).append(
            f"{operation}: {type(exc).__name__}: {exc}")
        return
    boost = outcome["value"]
    if operation == "request":
        chaos.acknowledged.add(boost.id)
        chaos.live.append(boost.id)
    elif operation == "expiry":
        chaos.expiring[boost.id] = restart
    if len(chaos.live) > 1:  # keep room on the lenders (gpu1 lends 2 CPU, gpu2 1)
        release_boost(chaos.live.pop(0))


def _check(chaos: Chaos, restart: float) -> None:
    """The invariants, on the records and Ray's groups as they are now."""
    from grid_flows.adapters.prefect.store import BoostStore
    from grid_flows.adapters.ray import cluster as rc
    from grid_flows.core.models import BoostState, utcnow

    with BoostStore() as store:
        records = {b.id: b for b in store.list(include_ended=True)}
    groups = rc.grid_groups()
    live_groups = {b.placement_group for b in records.values() if not b.state.ended}
    now = utcnow()
    for boost_id in sorted(chaos.acknowledged - set(records)):
        chaos.violations.append(f"acknowledged boost {boost_id[:8]} has no record")
    for name in sorted(set(groups) - live_groups):
        chaos.violations.append(f"orphan group {name}")
    for boost in records.values():
        if boost.state is BoostState.active and boost.placement_group not in groups:
            chaos.violations.append(f"active boost {boost.short_id} has no group")
        late = (now - boost.expires_at).total_seconds()
        if boost.state is BoostState.active and late > 1.0 + restart:
            chaos.violations.append(f"boost {boost.short_id} active {late:.1f} s past its deadline")
    for boost_id, round_restart in list(chaos.expiring.items()):
        boost = records.get(boost_id)
        if boost is not None and boost.state.ended:
            late = (boost.ended_at - boost.expires_at).total_seconds()
            if late > 1.0 + round_restart:
                chaos.violations.append(f"expiry of {boost.short_id} {late:.1f} s late (restart {round_restart:.1f} s)")
            del chaos.expiring[boost_id]


def _settled_check(chaos: Chaos, restart: float) -> None:
    """Check once the restarted controller has had its bound (1 s plus the restart) to end what is due;
    groups removed by the rebuild take a moment to leave Ray's table."""
    deadline = time.monotonic() + 1.0 + restart + 2.0
    while True:
        trial = Chaos(acknowledged=set(chaos.acknowledged), expiring=dict(chaos.expiring))
        _check(trial, restart)
        if not trial.violations or time.monotonic() > deadline:
            chaos.violations += trial.violations
            chaos.expiring = trial.expiring
            return
        time.sleep(0.2)  # polling the records and Ray's groups, bounded by the deadline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=30, help="rounds, one controller kill each (default 30)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: printed, from the clock)")
    args = parser.parse_args(argv)
    if not 1 <= args.kills <= 1000:
        parser.error(f"--kills: give 1 to 1000, got {args.kills}")
    seed = args.seed if args.seed is not None else int(time.time())
    rng = random.Random(seed)

    from benchmarks import integration as I
    from grid_flows import release_boost

    chaos = Chaos()
    started = time.time()
    with I.grid():
        for n in range(1, args.kills + 1):
            operation = OPERATIONS[(n - 1) % len(OPERATIONS)] if n <= len(OPERATIONS) else rng.choice(OPERATIONS)
            before = len(chaos.violations)
            try:
                _round(chaos, operation, rng)
            except Exception as exc:  # the round's own setup failed: a finding, not a crash of the run
                chaos.violations.append(f"round {n} ({operation}): {type(exc).__name__}: {exc}")
            _settled_check(chaos, chaos.restarts[-1] if chaos.restarts else 0.0)
            state = "ok" if len(chaos.violations) == before else "; ".join(chaos.violations[before:])[:200]
            restart = f"{chaos.restarts[-1]:.2f} s" if chaos.restarts else "-"
            print(f"  kill {n:>3}/{args.kills} during {operation:<8} restart {restart}: {state}", flush=True)
        for boost_id in chaos.live:
            release_boost(boost_id)
        I._clean()
    restarts = Stats(chaos.restarts) if chaos.restarts else None
    print(f"\nseed {seed}; {args.kills} kills in {time.time() - started:.0f} s; rounds: "
          + ", ".join(f"{op} {chaos.rounds[op]}" for op in OPERATIONS))
    print("| check | result |\n|---|---|")
    print(f"| controller restart (kill to answering) | median {restarts.median:.2f} s, max {restarts.max:.2f} s |"
          if restarts else "| controller restart | none measured |")
    print(f"| acknowledged grants | {len(chaos.acknowledged)}, each with its record |"
          if not any("no record" in v for v in chaos.violations) else "| acknowledged grants | some lost |")
    print(f"| grid-flows errors returned to callers | {len(chaos.errors)} |")
    print(f"| violations | {len(chaos.violations)} |")
    for line in chaos.errors[:5]:
        print(f"- error: {line[:200]}")
    for line in chaos.violations[:20]:
        print(f"- VIOLATION: {line[:200]}")
    print("PASS" if not chaos.violations else "FAIL")
    return 0 if not chaos.violations else 1


if __name__ == "__main__":
    sys.exit(main())
