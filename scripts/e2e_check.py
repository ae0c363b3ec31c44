"""Browser check of the Prefect UI for scripts/e2e-real.sh (Playwright + Debian's Chromium).

Opens, in turn: the `grid-boosts` artifact while a boost is live; the boosted example's
flow run (logs, artifacts tab, placements table); the Blocks page and the GridCluster
block; the Deployments page; the Event Feed filtered to the example's boost. Each check
fails when its content is missing, and each page is saved as a full-page screenshot
(and its text) under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


class CheckFailed(Exception):
    pass


async def cluster_block_url(ui: str) -> str:
    """The UI address of the GridCluster block document ``default``."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        doc = await client.read_block_document_by_name("default", "grid-cluster")
    return f"{ui}/blocks/block/{doc.id}"


async def artifact_url(ui: str, key: str, flow_run: str | None = None) -> str:
    """The UI address of the latest artifact with ``key`` (of one flow run, if given), checked
    against the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async with get_client() as client:
        if flow_run is None:
            found = await client.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
            latest = found[0].latest_id if found else None
        else:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]),
                                               flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run])),
                sort=ArtifactSort.CREATED_DESC, limit=1)
            latest = found[0].id if found else None
    if latest is None:
        raise CheckFailed(f"no artifact with key {key}{f' on flow run {flow_run}' if flow_run else ''} in the API")
    # /artifacts/key/KEY is the version timeline; the latest version's table is its own page.
    return f"{ui}/artifacts/artifact/{latest}"


def wait_for_texts(page, texts: list[str], timeout_s: float, what: str, line: str | None = None) -> str:
    """The page's text once it shows every one of ``texts`` (and ``line`` as a whole line, if given)."""
    import time

    deadline = time.monotonic() + timeout_s
    body = ""
    while time.monotonic() < deadline:
        body = page.inner_text("body")
        if all(t in body for t in texts) and (line is None or line in body.splitlines()):
            return body
        page.wait_for_timeout(500)
    missing = [t for t in texts if t not in body] + ([line] if line and line not in body.splitlines() else [])
    raise CheckFailed(f"{what}: not shown in the UI: {missing}")


def save_page(page, out: Path, name: str) -> None:
    """A full-page screenshot and the page's text, for a person to check after the run."""
    page.screenshot(path=str(out / f"{name}.png"), full_page=True)
    (out / f"{name}.txt").write_text(page.inner_text("body"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ui", required=True, help="Prefect UI base URL, e.g. http://127.0.0.1:4200")
    parser.add_argument("--flow-run", required=True, help="id of the boosted example's flow run")
    parser.add_argument("--example", required=True, help="JSON written by e2e_verify.py run-example")
    parser.add_argument("--live", required=True, help="JSON of the live boost (grid boost request --json)")
    parser.add_argument("--out", default="e2e-artifacts")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    example = json.load(open(args.example))
    live = json.load(open(args.live))
    ex_boost = example["boost"]

    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="e2e-chromium-")
    failures: list[str] = []
    try:
        url = asyncio.run(artifact_url(args.ui, "grid-boosts"))
        # Before Playwright starts: its sync API runs an event loop of its own in this thread.
        placements_url = asyncio.run(artifact_url(args.ui, "grid-placements", args.flow_run))
        cluster_block_url_ = asyncio.run(cluster_block_url(args.ui))
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                profile, executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1500, "height": 1000},
            )
            page = ctx.new_page()

            # 0. The key's version timeline, for the record.
            page.goto(f"{args.ui}/artifacts/key/grid-boosts", wait_until="networkidle", timeout=60_000)
            page.wait_for_timeout(2000)
            page.screenshot(path=str(out / "grid-boosts-versions.png"), full_page=True)

            # 1. The live boosts table (latest version of grid-boosts).
            page.goto(url, wait_until="networkidle", timeout=60_000)
            try:
                # The table shows the 8-character short id (a 32-character one pushed the state off screen).
                body = wait_for_texts(page, [live["id"][:8], "gpu2", "gpu-master"], 45, "grid-boosts artifact")
                if not re.search(r"\b1 CPU\b", body) and not re.search(r"CPU\s*\n?.*\b1\b", body):
                    raise CheckFailed("grid-boosts artifact: the live boost's 1 CPU is not shown")
                print(f"  grid-boosts page shows boost {live['id']} gpu2 -> gpu-master with 1 CPU")
            except CheckFailed as exc:
                failures.append(str(exc))
            save_page(page, out, "grid-boosts-artifact")

            # 2. The boosted example's flow run: logs name the boost, source, target and size.
            page.goto(f"{args.ui}/runs/flow-run/{args.flow_run}", wait_until="networkidle", timeout=60_000)
            try:
                wait_for_texts(page, [ex_boost["id"][:8], "gpu1", "gpu-master", "2 CPU"], 45, "flow run logs")
                print(f"  flow run page logs show boost {ex_boost['id'][:8]} gpu1 -> gpu-master, 2 CPU")
            except CheckFailed as exc:
                failures.append(str(exc))
            save_page(page, out, "flow-run-logs")

            # 3. Its artifacts tab: the placements table.
            page.goto(f"{args.ui}/runs/flow-run/{args.flow_run}", wait_until="networkidle",
                      timeout=60_000)
            page.wait_for_timeout(1500)
            tab = page.get_by_text("Artifacts", exact=True)
            if tab.count():
                tab.last.click()
                page.wait_for_timeout(2500)
                try:
                    wait_for_texts(page, ["grid-placements"], 30, "flow run artifacts tab")
                    print("  flow run artifacts tab lists the placements artifact")
                except CheckFailed as exc:
                    failures.append(str(exc))
                save_page(page, out, "flow-run-artifacts")

            # 4. The placements table itself: a row per task run, the counts on top.
            page.goto(placements_url, wait_until="networkidle", timeout=60_000)
            try:
                wait_for_texts(page, ["6 task runs (strategy", "Decision", "Queue wait", "boost", ex_boost["id"][:8]],
                               45, "placements artifact")
                print("  placements artifact shows a row per task run, with the boost, and the counts")
            except CheckFailed as exc:
                failures.append(str(exc))
            save_page(page, out, "placements-artifact")

            def check(name: str, url: str, texts: list[str], what: str, said: str) -> None:
                page.goto(url, wait_until="networkidle", timeout=60_000)
                try:
                    wait_for_texts(page, texts, 45, what)
                    print(f"  {said}")
                except CheckFailed as exc:
                    failures.append(str(exc))
                save_page(page, out, name)

            # 5. Blocks: the cluster definition and the boost records, by type. The page lists ten
            # documents at a time by name (many boost records come before "default"): search it.
            def blocks(name: str, search: str, texts: list[str], said: str, absent: str = "",
                       count: str = "1 Block") -> None:
                page.goto(f"{args.ui}/blocks", wait_until="networkidle", timeout=60_000)
                try:
                    page.get_by_placeholder("Search blocks").last.fill(search, timeout=30_000)
                    body = wait_for_texts(page, texts, 45, f"Blocks page searched for {search!r}", line=count)
                    if absent and absent in body:
                        raise CheckFailed(f"Blocks page searched for {search!r}: shows {absent!r}")
                    print(f"  {said}")
                except CheckFailed as exc:
                    failures.append(str(exc))
                except Exception as exc:  # no search box: the page changed
                    failures.append(f"Blocks page: could not search it: {type(exc).__name__}: {exc}")
                save_page(page, out, name)

            blocks("blocks", "default", ["Grid Cluster", "Grid Metrics History"],
                   "Blocks page lists the GridCluster and metrics blocks", count="2 Blocks")
            blocks("blocks-live-boost", live["id"], [f"boost-{live['id']}", "Grid Boost"],
                   "Blocks page lists the live boost's Grid Boost record", absent="Grid Boost History")
            blocks("blocks-ended-boost", ex_boost["id"], [f"boost-{ex_boost['id']}", "Grid Boost History"],
                   "Blocks page lists the example's ended boost as Grid Boost History")
            # 6. The GridCluster block: its nodes as readable lines, not one JSON line.
            check("grid-cluster-block", cluster_block_url_, ["Nodes at a glance",
                                                             "gpu1: worker, 4 CPU, 1 GPU, 8 GiB; lends 2 CPU, 1 GPU, 4 GiB"],
                  "GridCluster block", "GridCluster block shows one readable line per node")
            # 7. Deployments: the four maintenance deployments, with their schedules.
            check("deployments", f"{args.ui}/deployments",
                  ["grid-expire", "grid-reconcile", "grid-rebalance", "grid-cluster-status", "Every 30 seconds",
                   "Every 5 minutes", "Every minute"],
                  "Deployments page", "Deployments page lists the four maintenance deployments and their schedules")
            # 8. The Event Feed, filtered to the example's boost: granted, then released.
            check("event-feed", f"{args.ui}/events?resource=grid.boost.{ex_boost['id']}",
                  ["grid.boost.granted", "grid.boost.released"], "Event Feed",
                  f"Event Feed shows grid.boost.granted and grid.boost.released for boost {ex_boost['id'][:8]}")
            ctx.close()
    except CheckFailed as exc:
        failures.append(str(exc))
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    print(f"  screenshots in {out}/")
    for f in failures:
        print(f"CHECK FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
