"""Soak test: four requesting processes for N minutes, a lender killed and restarted half way.

`make soak` (= `.venv/bin/python -m benchmarks.soak --minutes 10`); not part of `make test`.

It starts its own local Prefect server (temp PREFECT_HOME, the helper `benchmarks/integration.py`
uses) and its own 3-node local Ray cluster of the test shape with fast health checks, then:

* 4 worker processes (this module with ``--worker``) loop until the stop time: request a boost
  for ``gpu-master`` (0.5 or 1 CPU, 20-60 s, sometimes from a named source), sometimes extend it,
  hold it briefly and release it; a few are left to expire on their own (3-8 s). Each writes one
  JSON line per event to its own file. NoCapacity is expected and counted; any other error is
  recorded with its message.
* this process reads the history and then runs ``boosts.reconcile()`` every 10 s (the pass, in
  the boost controller, prunes the history to its newest 1,000; the records read here are
  noted, so every ended boost is counted), and samples every
  ~1 s: over-grants (the live records through ``ledger.check_invariants``, and Ray's view: lend
  tokens used, and the grid groups placed on each lender, within its total), orphan groups (a
  grid group with no live record in two samples >= 1 s apart), and the live-record read that
  status makes; every 10 s it times the real CLI, ``python -m grid_flows.cli.app boost status
  --json``, in a fresh process.
* half way it kills gpu1 (``LocalCluster.stop_node``) and restarts it 20 s later
  (``LocalCluster.restart_node``). Boosts on gpu1 at the kill are rightly ``lost``; a ``lost``
  record from another source, or one that ended outside kill .. restart + 30 s, is wrongly lost.
* at the end: the workers stop, reconcile runs once, every live boost is released, and no grid
  placement group may be left.

It prints a table and where the workers' time went (ledger lock, placement, Prefect's 503 retries),
and exits 1 when an acceptance check fails: 0 over-grant samples, 0 wrongly lost, 0 orphan groups,
every CLI status < 2 s, more than 1,000 x minutes/10 boosts ended (each with an ended record), no
unexpected errors. Every process it started is stopped at the end, also on Ctrl-C, SIGTERM or an
error. ``--keep-logs`` keeps the workers' JSON lines and the Prefect server's log (kept anyway on
a failure).
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import Stats, quiet_environment  # noqa: E402

WORKERS = 4
TARGET = "gpu-master"
KILLED = "gpu1"
SAMPLE_SECONDS = 1.0
RECONCILE_SECONDS = 10.0
CLI_SECONDS = 10.0
DOWN_SECONDS = 20.0  # gpu1 stays down this long
LOST_GRACE_SECONDS = 30.0  # a boost may end lost until restart + this
SENTINEL_LEAD_SECONDS = 15.0  # this process takes a boost on gpu1 this long before the kill
STATUS_LIMIT_SECONDS = 2.0
ENDED_PER_10_MINUTES = 1000
ABANDON_SHARE = 0.08  # boosts left to expire on their own
EXTEND_SHARE = 0.15


# ------------------------------------------------------------------------------------- worker


def worker(index: int, out_path: str, until: float, seed: int) -> int:
    """Request, sometimes extend, hold, release (or abandon) until ``until``; one JSON line per event."""
    from grid_flows.control import boosts
    from grid_flows.api import release_boost, request_boost
    from grid_flows.errors import InvalidRequest, NoCapacity

    rng = random.Random(seed)
    parts = _time_ray_steps()
    with open(out_path, "a", buffering=1) as out:

        def log(event: str, **data: object) -> None:
            out.write(json.dumps({"t": time.time(), "w": index, "event": event, **data}) + "\n")

        def error(op: str, exc: BaseException, **data: object) -> None:
            log("error", op=op, at=time.strftime("%H:%M:%S"), error=f"{type(exc).__name__}: {exc}"[:500], **data)

        log("started", pid=os.getpid())
        while time.time() < until:
            cpu = rng.choice((0.5, 1))
            pick = rng.random()
            source = None if pick < 0.6 else ("gpu1" if pick < 0.8 else "gpu2")
            abandon = rng.random() < ABANDON_SHARE
            duration = round(rng.uniform(3, 8) if abandon else rng.uniform(20, 60), 1)
            t0 = time.perf_counter()
            parts.clear()
            try:
                boost = request_boost(TARGET, cpu=cpu, duration=duration, source=source)
            except NoCapacity as exc:
                log("no_capacity", source=source, cpu=cpu, dt=time.perf_counter() - t0, parts=dict(parts),
                    why=str(exc)[:200])
                time.sleep(rng.uniform(0.1, 0.4))  # back off, as a real requester would
                continue
            except Exception as exc:  # noqa: BLE001 - recorded, judged by the main process
                error("request", exc, source=source, cpu=cpu)
                time.sleep(0.5)
                continue
            log("granted", id=boost.id, source=boost.source, asked_source=source, cpu=cpu, duration=duration,
                abandon=abandon, dt=time.perf_counter() - t0, parts=dict(parts))
            if rng.random() < (0.3 if abandon else EXTEND_SHARE):
                extra = round(rng.uniform(2, 4) if abandon else rng.uniform(5, 20), 1)
                try:
                    boosts.extend(boost.id, extra)
                    log("extended", id=boost.id, extra=extra)
                except InvalidRequest as exc:
                    # Refused because the boost ended meanwhile (lost with its node, or overdue): expected.
                    text = str(exc)
                    if " is lost;" in text or " is expired;" in text or "overdue" in text:
                        log("extend_refused", id=boost.id, why=text[:300])
                    else:
                        error("extend", exc, id=boost.id)
                except Exception as exc:  # noqa: BLE001
                    error("extend", exc, id=boost.id)
            if abandon:
                log("abandoned", id=boost.id)  # expire_overdue (any request) or reconcile ends it
                continue
            time.sleep(rng.uniform(0.05, 0.4))  # "use" it
            t0 = time.perf_counter()
            parts.clear()
            try:
                ended = release_boost(boost.id)
                log("released", id=boost.id, state=ended.state.value, dt=time.perf_counter() - t0, parts=dict(parts))
            except Exception as exc:  # noqa: BLE001
                error("release", exc, id=boost.id)
        log("stopped")
    return 0


def _time_ray_steps() -> dict[str, float]:
    """Seconds spent per operation waiting for and holding the ledger lock, for a group to be placed,
    and for a removed group's capacity to show free (wrappers around the Ray adapter, this process only)."""
    from grid_flows.adapters.ray import cluster as rc

    parts: dict[str, float] = {}
    holding = [False]  # this process holds the ledger lock

    def add(key: str, t0: float) -> None:
        parts[key] = parts.get(key, 0.0) + time.perf_counter() - t0

    lock, create, freed = rc.ledger_lock, rc.create_boost_group, rc.wait_group_freed

    @contextlib.contextmanager
    def timed_lock(*a, **k):
        t0 = time.perf_counter()
        with lock(*a, **k):
            add("lock_wait", t0)
            t1 = time.perf_counter()
            holding[0] = True
            try:
                yield
            finally:
                holding[0] = False
                add("lock_held", t1)

    def timed_create(*a, **k):
        t0 = time.perf_counter()
        try:
            return create(*a, **k)
        finally:
            add("group_place", t0)

    def timed_freed(*a, **k):
        t0 = time.perf_counter()
        try:
            return freed(*a, **k)
        finally:
            add("freed_wait", t0)

    rc.ledger_lock, rc.create_boost_group, rc.wait_group_freed = timed_lock, timed_create, timed_freed

    from grid_flows.adapters.prefect.store import BoostStore

    def timed_method(name: str, method):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return method(*a, **k)
            finally:
                add(f"store.{name}", t0)
        return timed

    class Retries(logging.Handler):
        """Prefect's client logs each retry of a 503 (SQLite "database is locked" on the server)
        before it sleeps 2**n s; count them and the seconds slept."""

        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            if "retryable status code 503" in text:
                parts["prefect_503"] = parts.get("prefect_503", 0) + 1
                with contextlib.suppress(ValueError, IndexError):
                    slept = float(text.split("will be made in ")[1].split("s.")[0])
                    parts["prefect_503_sleep"] = parts.get("prefect_503_sleep", 0.0) + slept
                    if holding[0]:
                        parts["prefect_503_sleep_locked"] = parts.get("prefect_503_sleep_locked", 0.0) + slept

    client_log = logging.getLogger("prefect.client")
    client_log.addHandler(Retries(logging.DEBUG))
    client_log.setLevel(logging.DEBUG)
    client_log.propagate = False  # counted here, not printed

    for name in ("__enter__", "load_cluster", "list", "create", "get", "save", "delete", "resolve",
                 "publish_boosts_table", "emit"):
        setattr(BoostStore, name, timed_method(name, getattr(BoostStore, name)))
    return parts


# ------------------------------------------------------------------------------------- main


@dataclass
class Observations:
    samples: int = 0
    over_grant_samples: int = 0
    over_grant_examples: list[str] = field(default_factory=list)
    orphan_seen_twice: set[str] = field(default_factory=set)  # group names
    cli_times: list[float] = field(default_factory=list)
    cli_slow: list[str] = field(default_factory=list)
    import_times: list[float] = field(default_factory=list)  # `python -c "import prefect"`, same run
    list_times: list[float] = field(default_factory=list)
    reconcile_passes: int = 0
    reconcile_times: list[float] = field(default_factory=list)
    reconcile_counts: Counter = field(default_factory=Counter)
    ended: dict[str, dict] = field(default_factory=dict)  # boost id -> {state, source, ended_at, reason}
    errors: list[str] = field(default_factory=list)  # unexpected, in this process
    max_live: int = 0
    kill_at: float | None = None
    restarted_at: float | None = None
    next_progress: float = field(default_factory=lambda: time.time() + 60)
    sentinel: str | None = None  # a boost this process holds on gpu1 across the kill
    lock: threading.Lock = field(default_factory=threading.Lock)

    def error(self, where: str, exc: BaseException | str) -> None:
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        with self.lock:
            self.errors.append(f"{time.strftime('%H:%M:%S')} {where}: {text}"[:500])

    def note_history(self, history) -> None:
        with self.lock:
            for b in history:
                self.ended[b.id] = {"state": b.state.value, "source": b.source,
                                    "ended_at": b.ended_at.timestamp() if b.ended_at else None, "reason": b.reason}


@contextlib.contextmanager
def _watch_history(obs: Observations) -> Iterator[None]:
    """Note every ended record this process reads: the reconciler reads the history before each
    pass, and the retention rule keeps more than end between two passes, so every one is seen."""
    from grid_flows.adapters.prefect.store import BoostStore

    original = BoostStore.history

    def history(self):
        ended = original(self)
        obs.note_history(ended)
        return ended

    BoostStore.history = history
    try:
        yield
    finally:
        BoostStore.history = original


@contextlib.contextmanager
def soak_grid(spec_data: dict, log_dir: Path) -> Iterator[tuple[object, object]]:
    """Prefect server (temp PREFECT_HOME) first, so the Ray nodes inherit PREFECT_API_URL; then the
    cluster, with fast health checks (a killed node is seen in ~0.6 s). Both stop on exit."""
    home = tempfile.mkdtemp(prefix="grid-soak-prefect-")
    os.environ["PREFECT_HOME"] = home
    from grid_flows.core.cluster_file import parse_cluster
    from grid_flows.dev.local_prefect import local_prefect_server
    from grid_flows.adapters.ray.local_cluster import LocalCluster
    from grid_flows.adapters.prefect.store import BoostStore

    try:
        with local_prefect_server(home=home, log_file=log_dir / "prefect-server.log"):
            spec = parse_cluster(spec_data)
            with BoostStore() as store:
                store.save_cluster(spec)
            with LocalCluster(spec, fast_health_check=True) as cluster:
                yield spec, cluster
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _ray_view_problems(spec, nodes_raw: list[dict], available: dict[str, dict], table: dict) -> list[str]:
    """Lend tokens as Ray sees them: none used beyond a lender's total, every total equal to the
    share (also after the restart), and the grid groups placed on a lender within its total."""
    from grid_flows.adapters.ray.tokens import node_tokens
    from grid_flows.core.ledger import PLACEMENT_GROUP_PREFIX
    from grid_flows.adapters.ray.cluster import NODE_LABEL

    problems = []
    name_of = {n["NodeID"]: (n.get("Labels") or {}).get(NODE_LABEL) for n in nodes_raw}
    placed: dict[str, Counter] = {}
    for row in table.values():
        if not (row.get("name") or "").startswith(PLACEMENT_GROUP_PREFIX) or row.get("state") != "CREATED":
            continue
        for index, bundle in (row.get("bundles") or {}).items():
            node = name_of.get((row.get("bundles_to_node_id") or {}).get(index))
            for key, amount in bundle.items():
                if key.startswith("grid.lend."):
                    placed.setdefault(node, Counter())[key] += amount
    for lender in spec.lenders():
        tokens = node_tokens(lender)
        for n in nodes_raw:
            if (n.get("Labels") or {}).get(NODE_LABEL) != lender.name or not n.get("Alive"):
                continue
            total = n.get("Resources") or {}
            free = available.get(n["NodeID"], {})
            for key, share in tokens.items():
                have = total.get(key, 0.0)
                if abs(have - share) > 1e-6:
                    problems.append(f"{lender.name} runs with {key}={have:g}, its share is {share:g}")
                if key in free and (free[key] < -1e-6 or have - free[key] > have + 1e-6):
                    problems.append(f"{lender.name}: {key} available {free[key]:g} of {have:g}")
        for key, amount in placed.get(lender.name, Counter()).items():
            if amount > tokens.get(key, 0.0) + 1e-6:
                problems.append(f"{lender.name}: grid groups placed hold {key}={amount:g}, its share is "
                                f"{tokens.get(key, 0.0):g}")
    return problems


def sampler(spec, obs: Observations, stop: threading.Event) -> None:
    """Every ~1 s: over-grants (records and Ray), orphan groups, in-process list time."""
    import ray
    from ray._private.state import available_resources_per_node
    from ray.util import placement_group_table

    from grid_flows.adapters.ray import cluster as rc
    from grid_flows.core.ledger import check_invariants
    from grid_flows.errors import InvariantViolation
    from grid_flows.adapters.prefect.store import BoostStore

    previous: tuple[float, set[str]] = (0.0, set())
    with BoostStore() as store:
        while not stop.wait(SAMPLE_SECONDS):
            try:
                # Groups before records (as reconcile reads): a group seen first had its record
                # written before it, so a missing live record means no record, or one that ended.
                groups = set(rc.grid_groups())
                t0 = time.perf_counter()
                live = store.list()  # the read `grid boost status` makes
                listed = time.perf_counter() - t0
                nodes_raw = ray.nodes()
                available = available_resources_per_node()
                table = placement_group_table()
                now = time.monotonic()
                problems = []
                try:
                    check_invariants(spec, live)
                except InvariantViolation as exc:
                    problems.append(f"records: {exc}")
                problems += [f"ray: {p}" for p in _ray_view_problems(spec, nodes_raw, available, table)]
                orphans = groups - {b.placement_group for b in live}
            except Exception as exc:  # noqa: BLE001 - a read that fails under load is a finding
                obs.error("sampler", exc)
                continue
            with obs.lock:
                obs.samples += 1
                obs.list_times.append(listed)
                obs.max_live = max(obs.max_live, len(live))
                if problems:
                    obs.over_grant_samples += 1
                    if len(obs.over_grant_examples) < 10:
                        obs.over_grant_examples.append(f"{time.strftime('%H:%M:%S')} " + "; ".join(problems))
                if now - previous[0] >= 1.0:
                    obs.orphan_seen_twice |= orphans & previous[1]
                    previous = (now, orphans)


def reconciler(obs: Observations, stop: threading.Event) -> None:
    """reconcile() every 10 s, each pass after a read of the history (see _watch_history)."""
    from grid_flows.adapters.prefect.store import BoostStore
    from grid_flows.control.boosts import reconcile

    while not stop.wait(RECONCILE_SECONDS):
        try:
            # The pass runs in the boost controller, out of _watch_history's sight: read the
            # history here first (it keeps the newest 1,000; fewer than that end in 10 s).
            with BoostStore() as store:
                store.history()
            t0 = time.perf_counter()
            report = reconcile()
            obs.reconcile_times.append(time.perf_counter() - t0)
            obs.reconcile_passes += 1
            for what in ("removed_groups", "lost", "failed", "expired", "restored", "pruned"):
                obs.reconcile_counts[what] += len(getattr(report, what))
        except Exception as exc:  # noqa: BLE001
            obs.error("reconcile", exc)


def cli_status(obs: Observations, stop: threading.Event) -> None:
    """Time the real `grid boost status --json` in a fresh process every 10 s; every third time
    also `python -c "import prefect"` (same-run baseline: what the interpreter and Prefect's import
    cost before the CLI does anything)."""
    command = [sys.executable, "-m", "grid_flows.cli.app", "boost", "status", "--json"]
    baseline = [sys.executable, "-c", "import prefect"]
    rounds = 0
    while not stop.wait(CLI_SECONDS / 2 if not obs.cli_times else CLI_SECONDS):
        rounds += 1
        t0 = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            obs.cli_times.append(60.0)
            obs.cli_slow.append(f"{time.strftime('%H:%M:%S')} no answer within 60 s")
            obs.error("grid boost status", "no answer within 60 s")
            continue
        dt = time.perf_counter() - t0
        obs.cli_times.append(dt)
        if dt >= STATUS_LIMIT_SECONDS:
            obs.cli_slow.append(f"{time.strftime('%H:%M:%S')} {dt:.2f} s")
        if done.returncode != 0:
            obs.error("grid boost status", f"exit {done.returncode}: {done.stderr.strip()[-300:]}")
        else:
            try:
                json.loads(done.stdout)
            except ValueError:
                obs.error("grid boost status", f"not JSON: {done.stdout[:200]!r}")
        if rounds % 3 == 1:
            t0 = time.perf_counter()
            subprocess.run(baseline, cwd=ROOT, env=os.environ.copy(), capture_output=True, timeout=60)
            obs.import_times.append(time.perf_counter() - t0)


def _start_workers(log_dir: Path, until: float, seed: int) -> list[tuple[subprocess.Popen, Path]]:
    procs = []
    for i in range(WORKERS):
        out = log_dir / f"worker-{i}.jsonl"
        err = open(log_dir / f"worker-{i}.stderr", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.soak", "--worker", str(i), "--out", str(out), "--until", str(until),
             "--seed", str(seed * 100 + i)],
            cwd=ROOT, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=err,
            start_new_session=True,  # Ctrl-C reaches this process only; it stops them itself
        )
        err.close()
        procs.append((proc, out))
    return procs


def _stop_workers(procs: list[tuple[subprocess.Popen, Path]], wait_seconds: float) -> None:
    deadline = time.monotonic() + wait_seconds
    for proc, _ in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    for proc, _ in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    for proc, _ in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def _orphans_now() -> set[str]:
    from grid_flows.adapters.ray import cluster as rc
    from grid_flows.adapters.prefect.store import BoostStore

    groups = set(rc.grid_groups())
    with BoostStore() as store:
        live = store.list()
    return groups - {b.placement_group for b in live}


def run(minutes: float, log_dir: Path, seed: int) -> int:
    from benchmarks.integration import BENCH_CLUSTER
    from grid_flows.control import boosts
    from grid_flows.adapters.ray import cluster as rc
    from grid_flows.adapters.prefect.store import BoostStore

    obs = Observations()
    started_wall = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    print(f"soak: {minutes:g} min, {WORKERS} requesting processes; logs in {log_dir}", flush=True)
    print("starting a local Prefect server and a 3-node Ray cluster (fast health checks) ...", flush=True)
    with soak_grid(BENCH_CLUSTER, log_dir) as (spec, cluster), _watch_history(obs):
        stop = threading.Event()
        _on_sigterm_unwind()  # Ray's driver installed its own handler, which exits without cleaning up
        # Each thread runs in a copy of this thread's context: Prefect keeps the API URL of the
        # server started above in a context variable, and a thread started without it would
        # talk to an ephemeral server of its own.
        jobs = ((sampler, (spec, obs, stop)), (reconciler, (obs, stop)), (cli_status, (obs, stop)))
        threads = [threading.Thread(target=contextvars.copy_context().run, args=(f, *a), name=f.__name__,
                                    daemon=True) for f, a in jobs]
        procs: list[tuple[subprocess.Popen, Path]] = []
        try:
            t_start = time.time()
            until = t_start + minutes * 60
            procs = _start_workers(log_dir, until, seed)
            for t in threads:
                t.start()
            kill_at = t_start + minutes * 30
            _sleep_until(kill_at - SENTINEL_LEAD_SECONDS, obs, log_dir)
            obs.sentinel = _hold_sentinel(obs, until=kill_at)
            _sleep_until(kill_at, obs, log_dir)
            obs.kill_at = time.time()
            print(f"[{time.strftime('%H:%M:%S')}] killing {KILLED}", flush=True)
            cluster.stop_node(KILLED)
            _sleep_until(obs.kill_at + DOWN_SECONDS, obs, log_dir)
            cluster.restart_node(KILLED)
            _on_sigterm_unwind()
            obs.restarted_at = time.time()
            print(f"[{time.strftime('%H:%M:%S')}] {KILLED} restarted ({obs.restarted_at - obs.kill_at:.1f} s down)",
                  flush=True)
            _sleep_until(until, obs, log_dir)
            print(f"[{time.strftime('%H:%M:%S')}] stop time: waiting for the workers to finish their operation",
                  flush=True)
            _stop_workers(procs, wait_seconds=90)
            stop.set()
            for t in threads:
                t.join(timeout=90)
            # The end: orphans before the final reconcile, then reconcile, release all, nothing left.
            end_orphans = _orphans_now()
            report = boosts.reconcile()
            obs.reconcile_passes += 1
            for what in ("removed_groups", "lost", "failed", "expired", "restored", "pruned"):
                obs.reconcile_counts[what] += len(getattr(report, what))
            with BoostStore() as store:
                held = store.list()
            final_release = {}
            for b in held:
                try:
                    final_release[b.id] = boosts.release(b.id, reason="soak end").state.value
                except Exception as exc:  # noqa: BLE001
                    obs.error("final release", exc)
            with BoostStore() as store:
                store.history()  # noted by _watch_history
                left_live = store.list()
            left_groups = set(rc.grid_groups())
        finally:
            stop.set()
            _stop_workers(procs, wait_seconds=0)
            for t in threads:
                if t.ident is not None:  # started
                    t.join(timeout=30)
    return report_results(obs, procs, minutes, end_orphans, left_groups, left_live, final_release, started_wall,
                          t_start)


def _hold_sentinel(obs: Observations, until: float) -> str | None:
    """Take a boost on the lender about to be killed and hold it (the workers may hold none there
    at that moment): its record must end ``lost``. None if gpu1 stayed full until ``until``."""
    from grid_flows.control import boosts
    from grid_flows.errors import NoCapacity

    while time.time() < until:
        try:
            return boosts.request(TARGET, cpu=0.5, source=KILLED, duration=600).id
        except NoCapacity:
            time.sleep(1.0)
        except Exception as exc:  # noqa: BLE001
            obs.error("sentinel request", exc)
            return None
    return None


def _on_sigterm_unwind() -> None:
    """SIGTERM unwinds like Ctrl-C, so every process this run started is stopped. Installed again
    after Ray starts a node or connects: Ray replaces the handler with one that exits at once."""

    def terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)


def _sleep_until(when: float, obs: Observations, log_dir: Path) -> None:
    """Sleep until ``when``, printing a progress line every minute."""
    while True:
        left = when - time.time()
        if left <= 0:
            return
        time.sleep(min(left, 5.0))
        if time.time() >= obs.next_progress:
            obs.next_progress = time.time() + 60
            _progress(obs, log_dir)


def _progress(obs: Observations, log_dir: Path) -> None:
    granted = 0
    for out in log_dir.glob("worker-*.jsonl"):
        with contextlib.suppress(OSError):
            granted += out.read_text().count('"event": "granted"')
    with obs.lock:
        cli = max(obs.cli_times, default=float("nan"))
        print(f"[{time.strftime('%H:%M:%S')}] granted {granted}, ended records seen {len(obs.ended)}, samples "
              f"{obs.samples} ({obs.over_grant_samples} over-grant), reconcile passes {obs.reconcile_passes}, "
              f"status max {cli:.2f} s, errors {len(obs.errors)} here", flush=True)


def _read_worker_logs(procs) -> list[dict]:
    rows = []
    for proc, out in procs:
        if out.exists():
            for line in out.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    rows.append(json.loads(line))
        if proc.returncode not in (0, None):
            rows.append({"event": "error", "op": "process", "error": f"worker exited with code {proc.returncode}"})
    return rows


def time_split(rows: list[dict]) -> list[str]:
    """What the workers' requests and releases spent their time on (from the per-call parts)."""
    lines = []
    for event, what in (("granted", "granted requests"), ("no_capacity", "refused requests (NoCapacity)"),
                        ("released", "releases")):
        calls = [r for r in rows if r["event"] == event]
        if calls:
            dt = Stats([r["dt"] for r in calls])
            lines.append(f"{what}: {len(calls)}, p50 {dt.median:.2f} s, p90 {dt.pct(90):.2f} s, max {dt.max:.2f} s")
    calls = [r for r in rows if r["event"] in ("granted", "no_capacity", "released")]
    parts: Counter = Counter()
    for r in calls:
        parts.update(r.get("parts", {}))
    total = sum(r["dt"] for r in calls)
    retried = sum(1 for r in calls if r.get("parts", {}).get("prefect_503"))
    lines += [
        f"in all {total:.0f} s in {len(calls)} calls: ledger lock waited {parts['lock_wait']:.0f} s and held "
        f"{parts['lock_held']:.0f} s; placement-group placing {parts['group_place']:.0f} s (2 s grant timeouts "
        f"when two requesters race for the same capacity), freeing {parts['freed_wait']:.0f} s",
        f"Prefect API answered 503 (SQLite 'database is locked') {parts['prefect_503']:.0f} times in {retried} "
        f"calls; Prefect's client slept {parts['prefect_503_sleep']:.0f} s before retrying (2**n s each), "
        f"{parts['prefect_503_sleep_locked']:.0f} s of it while holding the ledger lock",
    ]
    return lines


def report_results(obs: Observations, procs, minutes: float, end_orphans: set[str], left_groups: set[str],
                   left_live: list, final_release: dict, started_wall: str, t_start: float) -> int:
    rows = _read_worker_logs(procs)
    events = Counter(r["event"] for r in rows)
    granted = {r["id"]: r for r in rows if r["event"] == "granted"}
    released_log = {r["id"]: r["state"] for r in rows if r["event"] == "released"}
    abandoned = {r["id"] for r in rows if r["event"] == "abandoned"}
    # Ended: every granted boost whose ended record was seen (history reads) or whose release returned it.
    final_state = {**released_log, **final_release, **{i: e["state"] for i, e in obs.ended.items()}}
    ended_ids = {i for i in granted if i in final_state}
    ended_states = Counter(final_state[i] for i in ended_ids)
    unaccounted = sorted(set(granted) - ended_ids)
    # Wrongly lost: a lost record from another lender, or ended lost outside the kill window.
    kill, restart = obs.kill_at or 0.0, (obs.restarted_at or obs.kill_at or 0.0)
    lost = {i: e for i, e in obs.ended.items() if e["state"] == "lost"}
    wrongly = {i: e for i, e in lost.items()
               if e["source"] != KILLED or e["ended_at"] is None
               or not (kill <= e["ended_at"] <= restart + LOST_GRACE_SECONDS)}
    errors = [f"{r.get('at', '')} worker {r.get('w', '?')} {r.get('op')}: {r.get('error')}"
              for r in rows if r["event"] == "error"]
    errors += obs.errors
    orphans = (obs.orphan_seen_twice & end_orphans) | left_groups
    sentinel = obs.ended.get(obs.sentinel or "", {})
    sentinel_ok = None if obs.sentinel is None else (
        sentinel.get("state") == "lost" and obs.sentinel not in wrongly)
    if obs.sentinel is None:
        sentinel_text = f"none: {KILLED} had no free share before the kill"
    elif not sentinel.get("ended_at"):
        sentinel_text = f"{obs.sentinel[:8]}: no ended record"
    else:
        sentinel_text = (f"{obs.sentinel[:8]} ended {sentinel['state']} ({sentinel['reason']}) "
                         f"{sentinel['ended_at'] - kill:.1f} s after the kill")
    cli = Stats(obs.cli_times or [float("nan")])
    lst = Stats(obs.list_times or [float("nan")])
    rec = Stats(obs.reconcile_times or [float("nan")])
    imp = Stats(obs.import_times or [float("nan")])
    need_ended = ENDED_PER_10_MINUTES * minutes / 10
    checks = [
        ("boosts granted", f"{len(granted)} ({events['extended']} extended, {len(abandoned)} left to expire)", None),
        ("boosts ended", f"{len(ended_ids)}: " + ", ".join(f"{n} {s}" for s, n in ended_states.most_common())
         + f"; {len(unaccounted)} granted without an ended record",
         len(ended_ids) > need_ended and not unaccounted),
        ("no-capacity answers", f"{events['no_capacity']} (expected)", None),
        ("extends refused (boost already ended)", f"{events['extend_refused']} (expected)", None),
        ("unexpected errors", str(len(errors)), not errors),
        ("over-grant samples", f"{obs.over_grant_samples} of {obs.samples} samples (max {obs.max_live} live records)",
         obs.over_grant_samples == 0 and obs.samples > 0),
        ("wrongly lost", f"{len(wrongly)} ({len(lost) - len(wrongly)} rightly lost: on {KILLED}, ended in the "
         "kill window)", not wrongly),
        (f"boost held on {KILLED} across the kill (must end lost)", sentinel_text, sentinel_ok),
        ("orphan groups", f"{len(orphans)} (without a live record in 2 samples >= 1 s apart: "
         f"{len(obs.orphan_seen_twice)}; at the end before the last reconcile: {len(end_orphans)}; left after it "
         f"and the release of every boost: {len(left_groups)}); live records left: {len(left_live)}",
         not orphans and not left_live),
        ("`grid boost status --json` (CLI process)",
         f"p50 {cli.median:.2f} s, max {cli.max:.2f} s; {len(obs.cli_slow)} of {len(obs.cli_times)} took 2 s or more",
         bool(obs.cli_times) and cli.max < STATUS_LIMIT_SECONDS),
        ("baseline: `python -c \"import prefect\"`", f"p50 {imp.median:.2f} s, max {imp.max:.2f} s "
         f"(n={len(obs.import_times)})", None),
        ("live-record read (`store.list()`, what status reads), in-process",
         f"p50 {lst.median * 1000:.0f} ms, max {lst.max * 1000:.0f} ms (n={len(obs.list_times)})", None),
        ("reconcile passes", f"{obs.reconcile_passes} (p50 {rec.median:.2f} s, max {rec.max:.2f} s); "
         + ", ".join(f"{k} {v}" for k, v in sorted(obs.reconcile_counts.items())), obs.reconcile_passes > 0),
    ]
    lines = ["| check | result | verdict |", "|---|---|---|"]
    for name, value, ok in checks:
        lines.append(f"| {name} | {value} | {'n/a' if ok is None else ('PASS' if ok else 'FAIL')} |")
    failed = [name for name, _, ok in checks if ok is False]
    print()
    print(f"Soak {minutes:g} min, started {started_wall}, {time.time() - t_start:.0f} s in all; {KILLED} killed at "
          f"+{kill - t_start:.0f} s and restarted {restart - kill:.1f} s later")
    print("\n".join(lines))
    print(f"\nended needed: > {need_ended:g}")
    print("\nwhere the workers' time went:\n" + "\n".join(f"  {line}" for line in time_split(rows)))
    for title, items in (("unexpected errors", Counter(errors)),
                         ("over-grant examples", Counter(obs.over_grant_examples)),
                         ("wrongly lost", Counter(f"{i[:8]} {e['source']} {e['reason']}" for i, e in wrongly.items())),
                         ("orphans", Counter(orphans)), ("slow status", Counter(obs.cli_slow)),
                         ("granted without an ended record", Counter(unaccounted[:20]))):
        if items:
            print(f"\n{title}:")
            for text, n in items.most_common(20):
                print(f"  {n} x {text}")
    print(f"\n{'FAIL: ' + ', '.join(failed) if failed else 'PASS'}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the requesters run (default 10)")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    parser.add_argument("--keep-logs", action="store_true", help="keep the workers' JSON lines after a pass")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--until", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return worker(args.worker, args.out, args.until, args.seed)
    if args.minutes <= 0:
        parser.error("--minutes must be > 0")
    quiet_environment()  # before ray or prefect is imported

    _on_sigterm_unwind()
    log_dir = Path(tempfile.mkdtemp(prefix="grid-soak-"))
    code = 1
    try:
        code = run(args.minutes, log_dir, args.seed)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: everything started is stopped by now
        print(f"interrupted ({exc or 'Ctrl-C'}); every process this run started is stopped", file=sys.stderr)
        code = 130
    finally:
        if code == 0 and not args.keep_logs:
            shutil.rmtree(log_dir, ignore_errors=True)
        else:
            print(f"worker logs kept in {log_dir}")
    return code


if __name__ == "__main__":
    sys.exit(main())
