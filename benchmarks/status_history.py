"""`grid boost status` against a long history: 10 ended boosts vs 10,000 (GRID_BENCH_HISTORY).

Run alone: `.venv/bin/python -m benchmarks.status_history` (a local Prefect server and the 3-node
test cluster, ~5-8 minutes here); `make bench` runs it as one step.

Status reads only the live records (``grid-boost`` documents) unless ``--all``, so its cost must not
depend on how many ``grid-boost-history`` documents there are. The ended records are written
directly as history documents (as ``BoostStore.save`` writes an ended boost), from a few threads,
each with its own client.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import json
import os
import sys
import threading
import time
import uuid
from datetime import timedelta

from benchmarks.common import Result, Stats, ratio_stats

HISTORY = int(os.environ.get("GRID_BENCH_HISTORY", "10000"))
BASE_HISTORY = 10  # the baseline's ended records
LIVE = 3  # live boosts (1 CPU each: two on gpu1, one on gpu2)
REPS = 9  # status and list_boosts, alternating, per phase
ALL_REPS = 3  # `--all`, per phase (it reads the whole history at the large size)
PRUNE_LABEL = "delete the records past retention (BoostStore.prune_history)"
WRITERS = 2  # threads writing history documents, each with its own BoostStore (the server is the limit)


def status_cli(*args: str) -> tuple[float, list]:
    """`grid boost status --json ARGS` through the real entry point, in process; (seconds, rows)."""
    from grid_flows.cli.app import main

    argv, buf = sys.argv, io.StringIO()
    sys.argv = ["grid", "boost", "status", "--json", *args]
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(buf):
            main()
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    finally:
        sys.argv = argv
    dt = time.perf_counter() - t0
    if code:
        raise RuntimeError(f"grid boost status exited with {code}")
    return dt, json.loads(buf.getvalue())


def _say(text: str) -> None:
    print(f"  [status-history] {text}", file=sys.stderr, flush=True)


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def _ended_boost(i: int, now):
    """The i-th ended record: released i seconds before ``now`` (newest first by i), 10 minutes long."""
    from grid_flows.core.ledger import Event, new_boost, transition
    from grid_flows.core.models import DEFAULT_CLUSTER, Priority, Resources

    ended = now - timedelta(seconds=i)
    b = new_boost(uuid.uuid4().hex, source="gpu1", target="gpu-master", resources=Resources(cpu=1),
                  priority=Priority.normal, duration_seconds=600, now=ended - timedelta(minutes=10),
                  requested_by="bench@history", cluster=DEFAULT_CLUSTER)
    b = transition(b, Event.grant, ended - timedelta(minutes=10), placement_group_id="bench")
    return transition(b, Event.release, ended, reason="released by request (bench)")


def write_history(start: int, stop: int, now, threads: int = WRITERS) -> tuple[float, int]:
    """Create history documents for records start..stop-1; (seconds, documents written)."""
    from grid_flows.adapters.prefect.blocks import GridBoostHistory
    from grid_flows.adapters.prefect.store import BoostStore, _register

    _register(GridBoostHistory)  # once, before the threads
    boosts = [_ended_boost(i, now) for i in range(start, stop)]
    errors: list[BaseException] = []

    def writer(chunk) -> None:
        try:
            with BoostStore() as store:
                for boost in chunk:
                    for attempt in range(3):  # SQLite may refuse a write under contention
                        try:
                            store._create(GridBoostHistory, boost)
                            break
                        except Exception as exc:
                            from prefect.exceptions import ObjectAlreadyExists

                            if isinstance(exc, ObjectAlreadyExists):
                                break  # a retried write that had gone through
                            if attempt == 2:
                                raise
                            time.sleep(0.2)
        except BaseException as exc:
            errors.append(exc)

    t0 = time.perf_counter()
    # Each thread runs in a copy of this context: the API URL is a context-local Prefect setting
    # (a bare thread would find none and start an ephemeral server of its own).
    workers = [threading.Thread(target=contextvars.copy_context().run, args=(writer, boosts[k::threads]))
               for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0, len(boosts)


def _history_count() -> int:
    from grid_flows.adapters.prefect.store import BoostStore

    with BoostStore() as store:
        return len(store.history())


def _load_cluster_once() -> float:
    """One plain Prefect read (the cluster document by name): a noise reference for both phases."""
    from grid_flows.adapters.prefect.store import BoostStore

    with BoostStore() as store:
        t0 = time.perf_counter()
        store.load_cluster()
        return time.perf_counter() - t0


def _phase(n_ended: int) -> dict[str, list[float]]:
    """Time status, list_boosts and a plain read, alternating; then `--all`."""
    from grid_flows import list_boosts

    t: dict[str, list[float]] = {"status": [], "list": [], "read": [], "all": [], "all_list": []}
    status_cli()  # warm (imports, the CLI's first client)
    list_boosts()
    for i in range(REPS):
        order = ("status", "list", "read") if i % 2 == 0 else ("read", "list", "status")
        for what in order:
            if what == "status":
                dt, rows = status_cli()
                assert len(rows) == LIVE, f"status showed {len(rows)} boosts, expected the {LIVE} live ones"
            elif what == "list":
                dt, boosts = _timed(list_boosts)
                assert len(boosts) == LIVE
            else:
                dt = _load_cluster_once()
            t[what].append(dt)
    for _ in range(ALL_REPS):
        dt, rows = status_cli("--all")
        assert len(rows) == LIVE + n_ended, f"--all showed {len(rows)}, expected {LIVE + n_ended}"
        t["all"].append(dt)
        dt, boosts = _timed(lambda: list_boosts(include_ended=True))
        t["all_list"].append(dt)
    return t


def _ms(s: Stats) -> str:
    return s.fmt(1000, " ms", 1)


def status_history(n_history: int = HISTORY) -> list[Result]:
    from benchmarks.integration import _CallTimer, _clean
    from grid_flows.control import boosts
    from grid_flows.core.models import utcnow
    from grid_flows.adapters.prefect.store import BoostStore

    _clean()
    _say(f"requesting {LIVE} live boosts")
    live = [boosts.request("gpu-master", cpu=1, duration="30m") for _ in range(LIVE)]
    try:
        now = utcnow()
        existing = _history_count()  # _clean() may have ended boosts of an earlier step
        if existing:
            with BoostStore() as store:
                store.prune_history(store.history(), 0, 0)
        write_history(0, BASE_HISTORY, now)
        _say(f"timing status with {BASE_HISTORY} ended")
        base = _phase(BASE_HISTORY)
        rec_base_t, rec_base = _timed(boosts.reconcile)
        assert not rec_base.pruned and not rec_base.changed, rec_base.lines()

        _say(f"writing {n_history - BASE_HISTORY:,} history documents")
        write_t, written = write_history(BASE_HISTORY, n_history, now)
        _say(f"  {write_t:.0f} s")
        assert _history_count() == n_history
        _say(f"timing status with {n_history:,} ended")
        big = _phase(n_history)
        _say("reconcile (prunes to the retention)")

        timer = _CallTimer()
        timer.wrap(BoostStore, "history", "read the history (BoostStore.history)")
        timer.wrap(BoostStore, "prune_history", PRUNE_LABEL)
        timer.active = True
        try:
            rec_t, rec = _timed(boosts.reconcile)
        finally:
            timer.restore()
        keep = 1000  # ClusterSharing.history_keep_count's default; the bench cluster does not set it
        assert len(rec.pruned) == max(0, n_history - keep), len(rec.pruned)
        assert not rec.changed, rec.lines()
        with BoostStore() as store:
            kept = store.history()
        assert len(kept) == min(n_history, keep)
        oldest_kept = min(b.ended_at for b in kept)
        assert oldest_kept >= now - timedelta(seconds=keep), "prune kept an older record than it deleted"
        after_all, after_all_list = [], []
        for _ in range(ALL_REPS):
            dt, rows = status_cli("--all")
            assert len(rows) == LIVE + len(kept)
            after_all.append(dt)
            after_all_list.append(_timed(lambda: boosts.list_boosts(include_ended=True))[0])
    finally:
        for b in live:
            with contextlib.suppress(Exception):
                boosts.release(b.id)

    n = f"{n_history:,}"
    s_big, s_base = Stats(big["status"]), Stats(base["status"])
    l_big, l_base = Stats(big["list"]), Stats(base["list"])
    r_big, r_base = Stats(big["read"]), Stats(base["read"])
    status_ratio = ratio_stats(big["status"], base["status"])
    list_ratio = ratio_stats(big["list"], base["list"])
    a_big, a_base, a_after = Stats(big["all"]), Stats(base["all"]), Stats(after_all)
    al_big, al_base, al_after = Stats(big["all_list"]), Stats(base["all_list"]), Stats(after_all_list)
    rec_parts = {label: sum(ts) for label, ts in timer.times.items()}
    prune_t = sum(timer.times[PRUNE_LABEL])
    common = (f"{LIVE} live boosts; ended records written straight as grid-boost-history documents; "
              f"{REPS} repetitions per size, status / list_boosts / a plain read alternating")
    writing = (f"writing {written:,} history documents took {write_t:.0f} s with {WRITERS} threads "
               f"({written / write_t:.0f} documents/s)")
    normalised = Stats([(sb / rb) / (s0 / r0) for sb, rb, s0, r0 in
                        zip(big["status"], big["read"], base["status"], base["read"])])
    noise = (f"noise reference, one plain Prefect read (the cluster document by name): "
             f"{_ms(r_base)} with {BASE_HISTORY} ended, {_ms(r_big)} with {n} ended; the status ratio with each "
             f"status call divided by the plain read of its repetition: {normalised.fmt(1, 'x', 2)}")
    return [
        Result(
            name=f"8a. `grid boost status --json` with {n} ended boosts",
            measured=f"{_ms(s_big)} with {n} ended",
            baseline=f"{_ms(s_base)} with {BASE_HISTORY} ended (same run, before the history was written)",
            ratio=status_ratio.fmt(1, "x", 2),
            goal="ratio <= 1.2",
            passed=status_ratio.median <= 1.2,
            note=f"the real entry point (`grid_flows.cli.app.main`) in process, output captured; it reads only the live "
                 f"records: one `POST /block_documents/filter` page of grid-boost documents (plus opening a "
                 f"client). The store filters by `block_documents.block_type_id`, which the (block_type_id, "
                 f"name) index serves; a filter by block-type slug made SQLite visit every document, history "
                 f"included (~1 ms per 1,000 ended records: BENCHMARKS.md, Findings). {common}. The sizes "
                 f"cannot be interleaved (the history only grows), so a plain read is timed beside them as a "
                 f"noise reference",
            details=[writing, noise,
                     f"`grid_flows.list_boosts()`: {_ms(l_big)} with {n} ended vs {_ms(l_base)} with "
                     f"{BASE_HISTORY}, ratio {list_ratio.fmt(1, 'x', 2)}"],
        ),
        Result(
            name=f"8b. `grid_flows.list_boosts()` with {n} ended boosts",
            measured=f"{_ms(l_big)} with {n} ended",
            baseline=f"{_ms(l_base)} with {BASE_HISTORY} ended (same run)",
            ratio=list_ratio.fmt(1, "x", 2),
            goal="ratio <= 1.2",
            passed=list_ratio.median <= 1.2,
            note="the Python API behind status: one BoostStore, one page of live records (the same indexed "
                 "read as row 8a)",
        ),
        Result(
            name=f"8c. `grid boost status --all --json` with {n} ended boosts",
            measured=f"{a_big.fmt(1, ' s', 2)} with {n} ended (n={ALL_REPS})",
            baseline=f"{_ms(a_base)} with {BASE_HISTORY} ended",
            ratio=ratio_stats(big["all"], base["all"]).fmt(1, "x", 0),
            goal="none (slower by design)",
            passed=None,
            note=f"expected to be slower: `--all` reads the whole history ({n_history // 200 + 1} requests of up "
                 f"to 200 documents) and prints every record; reading alone (`list_boosts(include_ended=True)`) "
                 f"takes {al_big.fmt(1, ' s', 2)} of it (vs {_ms(al_base)} with {BASE_HISTORY}); the rest is "
                 f"printing {n_history:,} records with Rich's `print_json`. Reconcile trims the history to the "
                 f"retention (row 8d), so this is bounded by `history_keep_count`",
        ),
        Result(
            name=f"8d. reconcile pass pruning {n} ended records to 1,000 (the default retention)",
            measured=f"{rec_t:.1f} s, {len(rec.pruned):,} deleted ({prune_t / max(1, len(rec.pruned)) * 1000:.1f} ms "
                     f"per deletion)",
            baseline=f"a pass with {BASE_HISTORY} ended (nothing to prune): {rec_base_t * 1000:.0f} ms",
            ratio=f"{rec_t / rec_base_t:.0f}x (one pass each)",
            goal="none (informational)",
            passed=None,
            note="the pass reads the live records and the whole history, then deletes one document per HTTP "
                 "call. A pass this large happens once, when a history that outgrew the retention is first "
                 "reconciled; afterwards each pass deletes the few records that ended since the last one. "
                 f"Then `status --all` with 1,000 ended: {a_after.fmt(1, ' s', 2)} "
                 f"(reading {al_after.fmt(1, ' s', 2)}), vs {a_big.fmt(1, ' s', 2)} at {n}",
            details=[f"{label}: {sec:.1f} s" for label, sec in sorted(rec_parts.items(), key=lambda kv: -kv[1])],
        ),
    ]


def main() -> int:
    from benchmarks.common import quiet_environment

    quiet_environment()
    from benchmarks import integration as I
    from benchmarks.run import table

    t0 = time.time()
    with I.grid():
        results = status_history()
        I._clean()
    print("\n".join(table(results)))
    for r in results:
        print(f"- {r.name}: {r.note}")
        for d in r.details:
            print(f"  - {d}")
    print(f"{time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
