"""Crash safety and concurrency: SIGKILLed requesters, reconcile, and many writers at once."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from grid_flows.adapters.ray import cluster as rc
from grid_flows.control.boosts import reconcile
from grid_flows.core.models import BoostState, Resources
from grid_flows.adapters.prefect.store import BoostStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

# A fork server: imports Prefect, Ray and grid-flows once, then forks one requester per
# line of input, so each of the many kills costs a fork and a Ray connect, not a cold start.
# Each requester requests and releases in a loop until it is killed.
_FORK_SERVER = textwrap.dedent(
    """
    import os, random, signal, sys, threading, time
    from grid_flows import NoCapacity, release_boost, request_boost
    from grid_flows.adapters.ray import cluster as rc
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # killed requesters are reaped by the kernel
    server = os.getpid()

    def die_with_server():  # a requester must never outlive the test's fork server
        while os.getppid() == server:
            time.sleep(0.2)
        os._exit(1)

    for line in sys.stdin:
        if os.fork() == 0:
            threading.Thread(target=die_with_server, daemon=True).start()
            rc.connect()
            os.write(1, f"READY {os.getpid()}\\n".encode())  # one write: lines of children never mix
            held = []
            while True:
                if held and random.random() < 0.5:
                    release_boost(held.pop(random.randrange(len(held))))
                else:
                    try:
                        held.append(request_boost("gpu-master", cpu=0.5, source=random.choice(["gpu1", "gpu2"]),
                                                  duration=600).id)
                    except NoCapacity:
                        pass
    """
)


def _lenders(grid) -> dict[str, Resources]:
    return {n.name: n.share for n in grid.spec.lenders()}


def _assert_consistent(grid) -> None:
    """No orphan group, no live record without its group, and no capacity leaked or lent twice."""
    with BoostStore() as store:
        records = store.list()
    live = [b for b in records if not b.state.ended]
    groups = rc.grid_groups()
    assert all(b.state is BoostState.active for b in live), [b.state for b in live]
    assert sorted(groups) == sorted(b.placement_group for b in live)
    for lender, share in _lenders(grid).items():
        held = Resources()
        for b in live:
            if b.source == lender:
                held = held + b.resources
        assert held.fits_in(share), (lender, held, share)
        # Every token the lender declared is either free or held by a live record.
        assert rc.wait_for_lendable(lender, share.minus(held), timeout_seconds=5), lender


def test_sigkill_at_random_points_of_request_and_release_leaves_nothing_behind(grid):
    rng = random.Random(20261123)
    server = subprocess.Popen([sys.executable, "-c", _FORK_SERVER], env=grid.env(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    kills = 0
    started: list[int] = []
    try:
        while kills < 32:
            server.stdin.write("fork\n" * 4)
            server.stdin.flush()
            pids = []
            while len(pids) < 4:
                line = server.stdout.readline()
                assert line, "the fork server stopped"
                words = line.split()
                if len(words) == 2 and words[0] == "READY":  # other output (Ray's, Prefect's) is skipped
                    pids.append(int(words[1]))
            started += pids
            for pid in pids:
                time.sleep(rng.uniform(0.05, 0.6))  # a random point in the request/release loop
                os.kill(pid, signal.SIGKILL)
                kills += 1
    finally:
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        server.kill()
        server.wait(timeout=30)
    reconcile(pending_timeout_seconds=0)  # every requester is dead: nothing is in flight
    assert reconcile(pending_timeout_seconds=0).changed is False, "reconcile is not idempotent"
    _assert_consistent(grid)
    assert kills >= 30


_WORKER = textwrap.dedent(
    """
    import json, random, sys
    from grid_flows import NoCapacity, InvalidRequest, release_boost, request_boost
    from grid_flows.control.boosts import extend
    rng = random.Random(int(sys.argv[1]))
    held, log = [], []
    for _ in range(int(sys.argv[2])):
        op = rng.choice(["request", "request", "release", "extend"]) if held else "request"
        if op == "request":
            try:
                b = request_boost("gpu-master", cpu=rng.choice([0.5, 1]), source=rng.choice(["gpu1", "gpu2"]),
                                  duration=600)
                held.append(b.id); log.append(["granted", b.id])
            except NoCapacity:
                log.append(["refused", None])
        elif op == "release":
            boost_id = held.pop(rng.randrange(len(held)))
            release_boost(boost_id); log.append(["released", boost_id])
        else:
            extend(rng.choice(held), 30); log.append(["extended", None])
    print(json.dumps({"held": held, "log": log}))
    """
)


def test_120_random_operations_from_4_processes_keep_every_share_and_every_record(grid):
    stop = threading.Event()
    violations: list[str] = []

    def watch() -> None:
        shares = _lenders(grid)
        while not stop.is_set():
            with BoostStore() as store:
                # The invariant is about grants: a pending record may name a lender it never gets.
                live = [b for b in store.list() if b.state is BoostState.active]
            for lender, share in shares.items():
                held = Resources()
                for b in live:
                    if b.source == lender:
                        held = held + b.resources
                if not held.fits_in(share):
                    violations.append(f"{lender} lends {held.describe()} > {share.describe()}")
            stop.wait(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    procs = [
        subprocess.Popen([sys.executable, "-c", _WORKER, str(seed), "30"], env=grid.env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for seed in range(4)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=360)
        assert proc.returncode == 0, err[-2000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    stop.set()
    watcher.join(timeout=10)

    assert violations == []
    granted = {boost_id for o in outputs for kind, boost_id in o["log"] if kind == "granted"}
    released = {boost_id for o in outputs for kind, boost_id in o["log"] if kind == "released"}
    held = {boost_id for o in outputs for boost_id in o["held"]}
    assert sum(len(o["log"]) for o in outputs) == 120
    with BoostStore() as store:
        records = {b.id: b for b in store.list(include_ended=True)}
    assert granted <= set(records), "a granted boost has no record"
    assert {b for b in granted if records[b].state is BoostState.released} == released
    assert {b for b in granted if records[b].state is BoostState.active} == held
    _assert_consistent(grid)
