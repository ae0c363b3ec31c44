"""Checks for scripts/e2e-real.sh against the live Prefect server and Ray cluster.

Each subcommand prints what it saw and exits non-zero with a one-line reason on failure.
    ray-nodes NAME...                      every named grid node is alive in Ray
    run-example --out FILE                 run the boosted-example deployment; check its tasks
    released --example FILE --status FILE  the example's boost was released
    expire-ran [--timeout S]               the grid-expire deployment has completed scheduled runs
    rebalance-sampled NODE... [--timeout S] two scheduled grid-rebalance runs completed; every node's sample is fresh
    lender-busy BUSY CALM --boost ID [--timeout S]
                                           BUSY (its GPU loaded) is seen as busy by the scheduled rebalance,
                                           CALM is not; boost ID, lent by BUSY, is reclaimed
    automation-fired --boost ID --since EPOCH [--timeout S]
                                           boost ID ended lost, and the Automation on grid.boost.lost
                                           ran grid-reconcile (a run created by it, after EPOCH)
    grant-loop --until FILE --out FILE     request and release 1 CPU from gpu1 over and over (while the
                                           server restarts) until 10 s after FILE exists; outcomes to --out
    grants-durable --grants FILE --down EPOCH --up EPOCH
                                           every acknowledged grant has its record; every refusal was a
                                           clear grid-flows error; grants succeeded before and after the restart
    active ID --status FILE                boost ID is listed active
    released-id ID --status FILE           boost ID is released
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time


class CheckFailed(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def ray_nodes(names: list[str]) -> None:
    from grid_flows.adapters.ray.cluster import connect, grid_nodes

    connect()
    deadline = time.monotonic() + 30
    while True:
        nodes = grid_nodes()
        missing = [n for n in names if n not in nodes or not nodes[n].alive]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    check(not missing, f"Ray nodes not alive: {', '.join(missing)}")
    for n in names:
        print(f"  ray node {n}: {nodes[n].node_id[:12]}, size {nodes[n].size.describe()}")


async def _run_example(out: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.deployments import run_deployment

    from grid_flows.adapters.ray.cluster import connect, grid_nodes

    started = time.monotonic()
    flow_run = await run_deployment("boosted-example/boosted-example", timeout=600, poll_interval=2)
    print(f"  flow run {flow_run.name} ({flow_run.id}): {flow_run.state.type.value} "
          f"after {time.monotonic() - started:.0f} s")
    check(flow_run.state.is_completed(), f"boosted-example ended {flow_run.state.type.value}: {flow_run.state.message}")
    rows = await flow_run.state.aresult()
    check(isinstance(rows, list) and len(rows) == 6, f"expected 6 task reports, got {rows!r}")

    # The boost this run held: the newest gpu1 -> gpu-master boost made by a flow.
    from grid_flows.api import list_boosts

    mine = [b for b in list_boosts(include_ended=True)
            if b.source == "gpu1" and b.target == "gpu-master" and b.origin == "flow"]
    check(bool(mine), "no gpu1 -> gpu-master boost made by a flow is recorded (did the flow run unboosted?)")
    boost = max(mine, key=lambda b: b.created_at)
    connect()
    nodes = grid_nodes()
    lender_id, head_id = nodes["gpu1"].node_id, nodes["gpu-master"].node_id
    in_boost = [r for r in rows if r["placement_group_id"]]
    for r in rows:
        where = {lender_id: "gpu1", head_id: "gpu-master"}.get(r["node_id"], r["node_id"][:12])
        print(f"  task {r['task']}: node {where}, placement group {r['placement_group_id'] or '-'}")
    check(bool(in_boost), "no task ran inside a placement group (the boost was not used)")
    check(all(r["placement_group_id"] == boost.placement_group_id for r in in_boost),
          f"tasks ran in a placement group other than the boost's {boost.placement_group_id}")
    check(all(r["node_id"] == lender_id for r in in_boost), "a task in the boost did not run on the lender gpu1")
    check(all(r["node_id"] in (lender_id, head_id) for r in rows), "a task ran outside the head and the boost")
    print(f"  {len(in_boost)} of 6 tasks ran inside boost {boost.id} on gpu1; the rest on gpu-master")

    async with get_client() as client:
        keys = {"grid-boosts", "grid-placements"}
        deadline = time.monotonic() + 30  # both are written before the run ends; the bound is for a slow server
        while True:
            # grid-boosts is the cluster's (attached to grid-flows' own runs); grid-placements is this run's.
            boosts = await client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["grid-boosts"])), limit=1)
            placements = await client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["grid-placements"]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])),
                limit=1)
            have = {a.key for a in boosts + placements}
            if keys <= have or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        check(keys <= have, f"missing artifacts: {', '.join(sorted(keys - have))}")
        print(f"  artifacts present: {', '.join(sorted(keys))}")
    with open(out, "w") as fh:
        json.dump({"flow_run_id": str(flow_run.id), "flow_run_name": flow_run.name, "boost_id": boost.id,
                   "boost": boost.model_dump(mode="json"), "rows": rows}, fh, indent=1)


def released(example: str, status: str) -> None:
    boost_id = json.load(open(example))["boost_id"]
    released_id(boost_id, status)


def _find(boost_id: str, status: str) -> dict:
    boosts = json.load(open(status))
    match = [b for b in boosts if b["id"] == boost_id]
    check(len(match) == 1, f"boost {boost_id} is not listed by `grid boost status --json` ({len(boosts)} listed)")
    return match[0]


def released_id(boost_id: str, status: str) -> None:
    b = _find(boost_id, status)
    check(b["state"] == "released", f"boost {boost_id} is {b['state']}, expected released")
    print(f"  boost {boost_id}: released ({b.get('reason') or 'no reason'})")


def active(boost_id: str, status: str) -> None:
    b = _find(boost_id, status)
    check(b["state"] == "active", f"boost {boost_id} is {b['state']} after the restart, expected active")
    print(f"  boost {boost_id}: still active after the server restart, {b['seconds_left']:.0f} s left")


async def _expire_ran(timeout: float) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    deadline = time.monotonic() + timeout
    async with get_client() as client:
        deployment = await client.read_deployment_by_name("grid-expire-boosts/grid-expire")
        check(bool(deployment.schedules), "grid-expire has no schedule")
        while True:
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["grid-expire"])))
            runs = [r for r in runs if r.deployment_id == deployment.id]
            done = [r for r in runs if r.state and r.state.is_completed()]
            if done or time.monotonic() > deadline:
                break
            await asyncio.sleep(3)
        states = sorted({r.state.type.value for r in runs if r.state})
        print(f"  grid-expire: {len(runs)} runs ({', '.join(states)}), {len(done)} completed, "
              f"schedule every {deployment.schedules[0].schedule.interval}")
        check(bool(done), f"no completed grid-expire run within {timeout:.0f} s")
        auto = [r for r in done if r.auto_scheduled]
        check(bool(auto), "grid-expire runs completed, but none was created by its schedule")


async def _rebalance_sampled(nodes: list[str], timeout: float, fresh_seconds: float = 90) -> None:
    """The scheduled grid-rebalance runs sample every node: after two completed runs, the
    metrics history holds a sample of each node at most ``fresh_seconds`` old."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    from grid_flows.adapters.prefect.metrics_store import load_history
    from grid_flows.core.models import utcnow

    deadline = time.monotonic() + timeout
    async with get_client() as client:
        deployment = await client.read_deployment_by_name("grid-rebalance/grid-rebalance")
        while True:
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["grid-rebalance"])))
            runs = [r for r in runs if r.deployment_id == deployment.id and r.state and r.state.is_final()]
            completed = [r for r in runs if r.state.is_completed() and r.auto_scheduled]
            now = utcnow()
            history = await asyncio.to_thread(load_history, now=now)
            ages = {n: (now - s.at).total_seconds() if (s := history.latest(n)) else None for n in nodes}
            fresh = all(a is not None and a <= fresh_seconds for a in ages.values())
            if (len(completed) >= 2 and fresh) or time.monotonic() > deadline:
                break
            await asyncio.sleep(3)
    states = [f"{r.state.type.value}" + (f" ({r.state.message[:80]})" if r.state.message else "") for r in runs]
    print(f"  grid-rebalance: {len(runs)} finished runs: {'; '.join(states)}")
    print("  newest sample age per node: " + ", ".join(f"{n} {a:.0f} s" if a is not None else f"{n} none"
                                                       for n, a in ages.items()))
    check(len(completed) >= 2, f"fewer than two scheduled grid-rebalance runs completed within {timeout:.0f} s")
    check(fresh, f"not every node has a sample fresher than {fresh_seconds:.0f} s: {ages}")


async def _lender_busy(busy: str, calm: str, boost_id: str, timeout: float) -> None:
    """A lender made busy is seen as busy: the scheduled grid-rebalance runs sample its loaded
    GPU, count it busy (and not the calm lender), and reclaim the boost it lent; the
    ``grid-pressure`` table shows the load."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from grid_flows.adapters.prefect.metrics_store import load_history
    from grid_flows.adapters.prefect.store import BoostStore
    from grid_flows.core.models import BoostState, utcnow
    from grid_flows.core.policy import busy_reason

    deadline = time.monotonic() + timeout
    with BoostStore() as store:
        spec = store.load_cluster()
    while True:
        now = utcnow()
        history = await asyncio.to_thread(load_history, now=now)
        why_busy, why_calm = busy_reason(spec, history, busy, now), busy_reason(spec, history, calm, now)
        with BoostStore() as store:
            boost = next((b for b in store.list(include_ended=True) if b.id == boost_id), None)
        if (why_busy and boost is not None and boost.state.ended) or time.monotonic() > deadline:
            break
        await asyncio.sleep(3)
    sample = history.latest(busy)
    print(f"  {busy}: newest sample GPU {sample.gpu_util_percent if sample else None}% util; "
          f"busy: {why_busy or 'no'}; {calm} busy: {why_calm or 'no'}")
    check(bool(why_busy), f"{busy} was not seen as busy within {timeout:.0f} s")
    check(not why_calm, f"{calm} was seen as busy too: {why_calm}")
    check(boost is not None and boost.state is BoostState.preempted,
          f"boost {boost_id} lent by {busy} is {boost.state.value if boost else 'gone'}, expected preempted")
    print(f"  boost {boost_id[:8]}: {boost.state.value} ({boost.reason})")
    check(busy in boost.reason, f"the reclaim's reason does not name {busy}: {boost.reason}")
    async with get_client() as client:
        newest = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["grid-pressure"])), sort=ArtifactSort.CREATED_DESC,
            limit=1)
    check(bool(newest), "no grid-pressure artifact")
    rows = {r["Node"]: r for r in json.loads(newest[0].data)}
    print(f"  grid-pressure: {busy} GPU {rows[busy]['GPU']}, pressure {rows[busy]['Pressure (0-1)']}; "
          f"{calm} pressure {rows[calm]['Pressure (0-1)']}")
    check(rows[busy]["GPU"].startswith("100 % util"), f"grid-pressure does not show {busy}'s GPU load: {rows[busy]['GPU']}")


async def _automation_fired(boost_id: str, since: float, timeout: float) -> None:
    """The lender of boost ``boost_id`` was killed at ``since``: the boost controller ends the
    boost ``lost``, and the Automation declared in deployments/prefect.yaml runs grid-reconcile."""
    from datetime import datetime, timezone

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    from grid_flows.adapters.prefect.store import BoostStore

    deadline = time.monotonic() + timeout
    killed = datetime.fromtimestamp(since, timezone.utc)
    boost, triggered = None, []
    async with get_client() as client:
        automations = [a for a in await client.read_automations() if "grid.boost.lost" in str(a.trigger)]
        check(bool(automations), "no Automation on grid.boost.lost: deployments/prefect.yaml declares one")
        while time.monotonic() < deadline:
            with BoostStore() as store:
                boost = next((b for b in store.list(include_ended=True) if b.id == boost_id), None)
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["grid-reconcile"])))
            triggered = [r for r in runs if r.created and r.created >= killed and r.created_by
                         and r.created_by.type == "AUTOMATION"]
            if triggered and boost is not None and boost.state.ended:
                break
            await asyncio.sleep(1)
    check(boost is not None and boost.state.value == "lost",
          f"boost {boost_id} is {boost.state.value if boost else 'gone'}, expected lost")
    print(f"  boost {boost_id[:8]}: lost {(boost.ended_at.timestamp() - since):.1f} s after the kill ({boost.reason})")
    check(bool(triggered), f"no grid-reconcile run created by an Automation within {timeout:.0f} s of the kill")
    first = min(triggered, key=lambda r: r.created)
    print(f"  grid-reconcile run {first.name} created by {first.created_by.display_value or 'an Automation'} "
          f"{(first.created.timestamp() - since):.1f} s after the kill, "
          f"{(first.created.timestamp() - boost.ended_at.timestamp()):.1f} s after the boost was lost")
    async with get_client() as client:  # and the worker ran it
        run_deadline = time.monotonic() + 90
        while True:
            run = await client.read_flow_run(first.id)
            if (run.state and run.state.is_final()) or time.monotonic() > run_deadline:
                break
            await asyncio.sleep(1)
    check(run.state is not None and run.state.is_completed(),
          f"the triggered grid-reconcile run ended {run.state.type.value if run.state else 'without a state'}")
    print(f"  it completed {(run.end_time.timestamp() - since):.1f} s after the kill" if run.end_time
          else "  it completed")


def grant_loop(until: str, out: str) -> None:
    """Request and release 1 CPU from gpu1 until 10 s after the file ``until`` appears (at
    most 5 minutes); write each outcome (and when it was acknowledged or refused) to ``out``.
    Boosts whose release failed are released at the end, once the server answers again."""
    import os

    from grid_flows import release_boost, request_boost
    from grid_flows.errors import GridError

    outcomes: list[dict] = []
    unreleased: list[str] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if os.path.exists(until):
            deadline = min(deadline, os.path.getmtime(until) - time.time() + time.monotonic() + 10)
        asked = time.time()
        try:
            boost = request_boost("gpu-master", cpu=1, source="gpu1", duration="2m")
            outcomes.append({"asked": asked, "at": time.time(), "granted": boost.id})
        except Exception as exc:  # recorded, judged by grants-durable
            outcomes.append({"asked": asked, "at": time.time(), "refused": f"{type(exc).__name__}: {exc}",
                             "clear": isinstance(exc, GridError)})
            time.sleep(0.2)  # a refusal (no room, or the server restarting) is not worth asking again at once
            continue
        outcomes[-1]["release_asked"] = time.time()
        try:
            release_boost(boost.id)
        except Exception as exc:
            outcomes[-1]["release_failed"] = f"{type(exc).__name__}: {exc}"
            unreleased.append(boost.id)
        outcomes[-1]["released_at"] = time.time()
    for boost_id in unreleased:
        for _ in range(30):
            try:
                release_boost(boost_id)
                break
            except Exception:
                time.sleep(1)  # the server is still coming back
    with open(out, "w") as f:
        json.dump(outcomes, f)
    print(f"  {sum('granted' in o for o in outcomes)} grants, {sum('refused' in o for o in outcomes)} refusals")


def grants_durable(grants: str, down: float, up: float) -> None:
    from grid_flows import list_boosts

    outcomes = json.load(open(grants))
    granted = [o for o in outcomes if "granted" in o]
    records = {b.id: b for b in list_boosts(include_ended=True)}
    missing = [o["granted"] for o in granted if o["granted"] not in records]
    check(not missing, f"{len(missing)} acknowledged grants have no record after the restart: {missing[:3]}")
    live = [o["granted"] for o in granted if not records[o["granted"]].state.ended]
    check(not live, f"{len(live)} grants of the loop are still live after it released them: {live[:3]}")
    unclear = [o["refused"] for o in outcomes if "refused" in o and not o["clear"]]
    check(not unclear, f"{len(unclear)} refusals were not grid-flows errors, e.g. {unclear[:1]}")
    before = [o for o in granted if o["at"] < down]
    after = [o for o in granted if o["asked"] > up]
    check(bool(before) and bool(after),
          f"the loop did not span the restart: {len(before)} grants before it, {len(after)} after")
    during = [o for o in outcomes if o["asked"] < up and o["at"] > down]
    releases = [o for o in granted if "release_asked" in o and o["release_asked"] < up and o["released_at"] > down]
    refusals = sorted({o["refused"].split(":")[0] for o in during if "refused" in o})
    print(f"  {len(granted)} grants, every one recorded and released ({len(before)} before the server stopped, "
          f"{len(after)} after it was back); {len(during)} requests overlapped the restart: "
          f"{sum('granted' in o for o in during)} granted, {sum('refused' in o for o in during)} refused "
          f"({', '.join(refusals) or 'none'}); {len(releases)} releases overlapped it "
          f"({sum('release_failed' in o for o in releases)} failed and were released again after)")
    for o in releases[:2]:
        print(f"    a release waited {o['released_at'] - o['release_asked']:.1f} s"
              + (f", failed: {o['release_failed'][:160]}" if "release_failed" in o else ", then succeeded"))
    for o in [o for o in during if "refused" in o][:2]:
        print(f"    refused: {o['refused'][:160]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ray-nodes"); p.add_argument("names", nargs="+")
    p = sub.add_parser("run-example"); p.add_argument("--out", required=True)
    p = sub.add_parser("released"); p.add_argument("--example", required=True); p.add_argument("--status", required=True)
    p = sub.add_parser("expire-ran"); p.add_argument("--timeout", type=float, default=120)
    p = sub.add_parser("rebalance-sampled"); p.add_argument("nodes", nargs="+"); p.add_argument("--timeout", type=float, default=180)
    p = sub.add_parser("automation-fired"); p.add_argument("--boost", required=True)
    p.add_argument("--since", type=float, required=True); p.add_argument("--timeout", type=float, default=45)
    p = sub.add_parser("lender-busy"); p.add_argument("busy"); p.add_argument("calm"); p.add_argument("--boost", required=True)
    p.add_argument("--timeout", type=float, default=180)
    p = sub.add_parser("grant-loop"); p.add_argument("--until", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("grants-durable"); p.add_argument("--grants", required=True)
    p.add_argument("--down", type=float, required=True); p.add_argument("--up", type=float, required=True)
    for name in ("active", "released-id"):
        p = sub.add_parser(name); p.add_argument("boost_id"); p.add_argument("--status", required=True)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "ray-nodes":
            ray_nodes(args.names)
        elif args.cmd == "run-example":
            asyncio.run(_run_example(args.out))
        elif args.cmd == "released":
            released(args.example, args.status)
        elif args.cmd == "expire-ran":
            asyncio.run(_expire_ran(args.timeout))
        elif args.cmd == "rebalance-sampled":
            asyncio.run(_rebalance_sampled(args.nodes, args.timeout))
        elif args.cmd == "automation-fired":
            asyncio.run(_automation_fired(args.boost, args.since, args.timeout))
        elif args.cmd == "lender-busy":
            asyncio.run(_lender_busy(args.busy, args.calm, args.boost, args.timeout))
        elif args.cmd == "grant-loop":
            grant_loop(args.until, args.out)
        elif args.cmd == "grants-durable":
            grants_durable(args.grants, args.down, args.up)
        elif args.cmd == "active":
            active(args.boost_id, args.status)
        elif args.cmd == "released-id":
            released_id(args.boost_id, args.status)
    except CheckFailed as exc:
        print(f"CHECK FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
