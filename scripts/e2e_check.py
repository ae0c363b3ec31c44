"""Browser check of the Prefect UI for scripts/e2e-real.sh (Playwright + Debian's Chromium).

Opens the `grid-boosts` artifact page (found through the API: artifact key -> UI
/artifacts/key/grid-boosts) while a boost is live, and the boosted example's flow run
page (logs and artifacts tabs). Asserts the boosts' id, source, target and resources
appear, and saves full-page screenshots under --out.
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


def wait_for_texts(page, texts: list[str], timeout_s: float, what: str) -> str:
    import time

    deadline = time.monotonic() + timeout_s
    body = ""
    while time.monotonic() < deadline:
        body = page.inner_text("body")
        if all(t in body for t in texts):
            return body
        page.wait_for_timeout(500)
    missing = [t for t in texts if t not in body]
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
