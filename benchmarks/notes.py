"""Static text for BENCHMARKS.md: goals, method, findings and plans (the numbers are in the table)."""

NOTES = """
## Goals and method

1. **Decision cost** (pure, `benchmarks/pure.py`): `scheduler.place` on a synthetic view whose target is
   full and whose flow boosts are full, so every decision scans every node for offload (worst case;
   half the nodes can lend, 1 in 50 is down). Per strategy, 1,000 nodes (and 100) vs a 10-node /
   10-boost baseline. Goal <= 50 µs per decision at 1,000 nodes. A separate row sweeps the number of
   boosts handed to `place` (10 .. 10,000) on 10 nodes: the runner hands `place` only the boosts bound
   to its flow, so cluster-wide boosts never reach it; 1,000 nodes with 10,000 cluster-wide boosts
   and 3 bound costs the same as the 1,000-node row.
2. **Admission scale** (pure): 2,000 interleaved operations (~1,250 requests, ~750 releases) against a
   100-lender ledger (each lends 2 CPU/1 GPU/4 GiB), mirroring `boosts.request`: first fit on free
   share, else `preemption.plan_preemption`, `ledger.new_boost` + `transition`, and
   `ledger.check_invariants` over the live ledger after every grant. Baseline: the same records and
   transitions without planning or checks. Goal: no invariant broken (the rate is reported, no goal
   was set for it).
3. **Grant latency**: `boosts.request(cpu=1, source=gpu1)` until it returns active (then read back
   with a fresh client: durable), vs `ray_cluster.create_boost_group` with an unrelated name and the
   same bundle, alternating, 15 repetitions. Each adapter call on the path is timed by wrapping it.
4. **Release / expiry latency**: (a) from calling `boosts.release` on a boost holding all of gpu1's
   lendable CPU until a raw placement group of the same shape on gpu1 is ready (poll the lend tokens
   every 20 ms, then create: DESIGN.md's advice, since an immediate re-create pays ~1 s of Ray
   backoff), 8 repetitions; (b) a 2 s boost with no maintenance flow, a loop calling
   `boosts.expire_overdue` every 100 ms; from `expires_at` to the same raw group ready, 5 repetitions.
   Baseline: `remove_placement_group` of a raw group, then the same wait. With n=8 and n=5 the "p99"
   is the maximum.
5. **Throttle accuracy**: 100 concurrent `guard.throttle_gpu_start("gpu1", 50, key=<fresh>)` calls from
   10 warm Ray worker processes on gpu1 (as `tests/integration/test_guard.py`), 5 repetitions with a
   fresh throttle actor each. The slot span is compared with the ideal 99 x 50 ms; the smallest gap
   between slots must not be under 50 ms.
6. **Runner overhead**: one flow mapping a trivial task over N inputs, with `BoostRayTaskRunner`
   (local_first, an active 2-CPU boost on gpu1 attached) vs prefect-ray's `RayTaskRunner(address=<the
   cluster>)` on the same cluster, alternating order, 5 repetitions after one warm-up run each. **N is
   50, not the issue's 500:** on this shared 2-core machine a Prefect task run costs ~0.3-0.5 s of
   API work (2-3 tasks/s for both runners), so N=500 x 2 runners x 5 repetitions alone would take
   ~40 minutes. Set `GRID_BENCH_RUNNER_TASKS=500` to run the issue's size.
7. **Priority isolation** (`benchmarks/isolation.py`): a flow of 20 one-second tasks that may run
   only inside a high-priority 2-CPU boost on gpu1 (granted before the flood; node_specific, no
   offload), alone and while a competing Prefect flow in its own process floods gpu1 with plain
   prefect-ray tasks (batches of 8 one-second tasks, `num_cpus=1`, pinned to gpu1 by label, for as
   long as the measurement runs; it is started, paused and resumed through files, and the timed run
   starts only once flood tasks are running). Baseline: the same 20 tasks pinned to gpu1 with plain
   prefect-ray, alone and under the same flood. 5 repetitions, alternating order. The flood's tasks
   sleep: every node of this local cluster shares the same 2 cores, and the question is whether the
   lender's Ray capacity stays reserved, not whether 2 cores can do 3 nodes' work.

### Expiry latency with the maintenance flows served (issue 4; not part of `make bench`)

Command: `.venv/bin/python -m benchmarks.expiry_with_maintenance` (a local Prefect server, the test
cluster, `grid maintenance serve` with its real 30 s `grid-expire` interval; 4 boosts of 5, 15, 25 and
35 s; nothing else touches the ledger and no runner holds them). Run 2026-11-23 16:52 UTC on this
machine: `expires_at` -> record ended 26.9, 16.0, 5.6, 25.6 s; -> placement group gone 27.1, 16.2,
5.8, 25.8 s (median 21.0 s, max 27.1 s). As expected it is bounded by the schedule interval (30 s)
plus a flow run's start-up, and uniform in between. Without the flow the same boosts end on the next
ledger touch (row 4b) or, when a runner holds them, within the grace after expiry (the runner ends
them itself; `tests/integration/test_lifecycle.py` asserts < grace + 1.5 s).

## Findings

### Decision cost misses 50 µs at 1,000 nodes (full-scan strategies)

`place` is already a single pass with inlined fit checks; the cost is ~0.15-0.55 µs per node
(CPython attribute reads on the pydantic `Resources` plus one score call per fitting node; best_fit's
`_leftover_score` and performance_optimized's `_headroom_score` are the dearest). cProfile of 200
best_fit decisions at 1,000 nodes: `place` 53% self time, `_leftover_score` 42% (500 calls per
decision). node_specific (one node) and the early-return paths of local_first (target or a boost fits)
are a few µs at any size. The 50 µs goal at 1,000 nodes means < 50 ns per node, which a per-node Python
loop cannot reach. Plan (not done here, scheduler.py left unchanged):
- keep, per runner, an index of offload candidates ordered by each strategy's score (a heap or sorted
  list keyed by score, updated only when a node's lendable_free/pressure/in_flight changes), so a
  decision pops the best fitting node instead of scanning; typical cost O(log n);
- or hold the node columns (cpu, gpu, memory, score inputs) in arrays and vectorise the fit+score
  (numpy: ~10-20 µs for 1,000 nodes);
- the runner also rebuilds its `ClusterView` (one NodeView per node) for every dispatch round: the
  same index removes that too. With today's 3-node clusters the cost is ~10 µs.

### Admission: no invariant broken; plan_preemption is O(lenders x active boosts)

cProfile (1,000 operations): 34% in `preemption._active_on`'s list comprehension (for each of the
100 lenders it rescans every active boost), then pydantic validation of `Resources` built by `+`/`minus`
inside `check_invariants`/`held_by_lender` (`units.check_amount`, `parse_memory`). Cheap fixes, in
`preemption.py`/`ledger.py` (not changed here): group active boosts by source once per call; stop at
the first lender whose free share already holds the request (a no-victim plan always wins); sum
resources as plain floats in `held_by_lender` and construct one `Resources` per lender.

### Grant path: ~0.4-0.5 s, not 60 ms; the Prefect client dominates, Ray is ~3 ms

Per `boosts.request` (timed wrappers; see the breakdown under row 3 above):
- `store.create` and `store.save` each cost ~100-170 ms, of which the HTTP call
  (`create_block_document` / `update_block_document`) is only ~30 ms: the rest is **client-side**
  `Block._to_block_document`, which calls `_field_has_secrets` -> `model_json_schema` for every field
  (cProfile: 54 JSON-schema generations per document). Fix in `store.py`: build the block document
  data directly (`boost.model_dump(mode="json")` plus the block schema/type ids cached after
  `_register`) instead of `Block._to_block_document`, or cache the secret-field analysis per class:
  saves ~200 ms per grant.
- `read_block_document_by_name` x3 (~20 ms each): `store.get` inside `_activate` re-reads the record
  just created; and `_doc_id` lookups. The record written by `create` could be kept (the store
  already caches doc ids) and the lock-protected re-read made a single call.
- `publish_boosts_table` (one `create_table_artifact`, ~50 ms) and a second `store.list` for it
  (`read_block_documents_by_type`, ~17 ms each, 2 per request incl. `expire_overdue`'s): the table
  is a view; publishing it off the critical path (after returning, or from the maintenance flow)
  saves ~65 ms.
- `BoostStore.__enter__` (get_client, ~25 ms) and `load_cluster` (~25 ms) per request: a process-wide
  client and a cached spec (invalidated by block `updated`) save ~50 ms.
- `emit` (<1 ms, events are sent in the background), `ledger_lock` acquire (~3 ms, a Ray actor call),
  `grid_nodes` (~1-3 ms) and the placement group itself (~3 ms) are small.
Even with all of that, 3-4 sequential Prefect writes at ~30 ms each on this machine put the p50 near
~100 ms: meeting 60 ms also needs fewer writes (e.g. create the record directly as active after the
group is ready, with the pending record only as a crash marker written in the same call).

### Release / expiry

Both meet p99 <= 1 s. Release costs the lock, two Prefect writes (history create + live delete), the
artifact and a list before the group is removed; Ray then frees the bundle ~100 ms after removal
(the baseline). Expiry adds up to the 100 ms touch interval plus `store.list`.

### Throttle and expiry under load

The throttle never handed out two slots closer than 50 ms (smallest gap 50.000 ms in every
repetition). The span goal fails only when the machine is busy: `reserve` gives `max(now, next)`, so
when the 100 callers' actor calls arrive more than 50 ms apart (worker processes starved of CPU by
other sessions on these 2 cores) the slots stretch; a development run on a quieter machine measured
5.27 s (1.064x, PASS), and this run's min..max show the spread. Expiry (4b) likewise depends on
prompt scheduling: its worst case is the 100 ms touch interval plus two Prefect writes and a
`store.list` on a loaded SQLite server.

### Runner overhead

Both runners run at ~2-3 trivial tasks/s here: each task run's Prefect API work (task run create
and state transitions from the Ray worker, to a SQLite server on a shared 2-core machine) dominates
by far; the grid runner's `place()` per task (~10 µs at 3 nodes) and its dispatcher thread are
invisible at that scale. The grid runner also limits itself to the head (1 CPU) plus the boost
(2 CPU), while prefect-ray may use all 7 CPUs of the cluster, yet it was not slower: with the Prefect
server and Ray on 2 real cores, more parallel workers mostly contend.
"""
