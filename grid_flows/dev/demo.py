"""The demo: a local three-node Ray cluster, a local Prefect server, a boost and its table.

Run it with ``make demo`` (or ``python -m grid_flows.dev.demo``). It starts everything it
needs on this machine and stops it again by PID at the end; the Prefect database stays
in ``.demo/prefect`` so the UI can show the run afterwards.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

console = Console(width=None if sys.stdout.isatty() else 120)
REPO = Path(__file__).resolve().parents[2]  # grid_flows/dev/demo.py -> the repository


def step(text: str) -> None:
    console.rule(f"[bold]{text}", align="left")


def grid(*args: str) -> None:
    """Run the real `grid` CLI as a user would, in a child process."""
    console.print(f"[dim]$ grid {' '.join(args)}[/]")
    subprocess.run([sys.executable, "-m", "grid_flows.cli.app", *args], check=True, env=os.environ.copy(), timeout=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cluster-file", default=str(REPO / "blocks" / "cluster.yaml"))
    parser.add_argument("--home", default=str(REPO / ".demo"), help="where the demo keeps its Prefect database")
    parser.add_argument("--keep", action="store_true", help="keep the server and cluster up until Ctrl-C")
    args = parser.parse_args(argv)

    from grid_flows.adapters.ray.cluster import quiet_ray_environment

    quiet_ray_environment()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

    from grid_flows.core.cluster_file import load_cluster_file
    from grid_flows.dev.local_prefect import local_prefect_server
    from grid_flows.adapters.ray.local_cluster import local_cluster

    spec = load_cluster_file(args.cluster_file)
    started = time.monotonic()
    step("1. Local Prefect server")
    with local_prefect_server(Path(args.home) / "prefect") as api_url:
        console.print(f"Prefect API at {api_url} (UI: {api_url.removesuffix('/api')})")
        step("2. Local Ray cluster: one Ray node per machine in the cluster file")
        with local_cluster(spec) as address:
            for node in spec.nodes:
                lends = node.share.describe() if node.resource_sharing.can_share else "nothing"
                console.print(f"  {node.name:<11} {node.role.value:<6} {node.size.describe():<22} lends {lends}")
            console.print(f"Ray at {address} (RAY_ADDRESS is set for child processes)")
            step("3. Apply the cluster definition as a Prefect block; start the boost controller")
            grid("blocks", "apply", args.cluster_file)
            start_controller()
            run_boost_demo(spec)
            if args.keep:
                console.print("Everything is still up; press Ctrl-C to stop.")
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    pass
    console.print(f"[green]Demo finished in {time.monotonic() - started:.0f} s; every process it started is stopped.[/]")
    return 0


def start_controller() -> None:
    """Start the cluster's boost controller now, as it runs on a real cluster before any flow
    does (the first boost request would start it otherwise, inside that flow's time)."""
    import ray

    from grid_flows.control import client

    ray.get(client.controller().status.remote(), timeout=120)
    console.print("The boost controller runs: one Ray actor per cluster, on the head.")


def run_boost_demo(spec) -> None:
    from prefect import flow, task
    from rich.table import Table

    from grid_flows import BoostRayTaskRunner, boosted, list_boosts
    from grid_flows.adapters.ray import cluster as rc

    head = spec.head.name
    lender = max(spec.lenders(), key=lambda n: n.share.cpu)
    names = {info.node_id: name for name, info in rc.grid_nodes().items()}

    @task
    def crunch(i: int) -> dict:
        import ray

        started = time.time()
        time.sleep(1.0)  # stands in for real work
        ctx = ray.get_runtime_context()
        return {"i": i, "node_id": ctx.get_node_id(), "group": ctx.get_placement_group_id() or "", "start": started}

    @boosted(cpu=2, source=lender.name, priority="high", duration="10m")
    @flow(name="demo-boosted-flow", task_runner=BoostRayTaskRunner(allow_offload=False))
    def demo_boosted_flow(n: int = 6) -> dict:
        # While the flow runs the boost is live; meanwhile the runner's warm-up starts the Ray
        # workers the tasks will run in (on by default for @boosted flows).
        grid("boost", "status")
        submitted = time.time()
        futures = crunch.map(range(n))
        rows = [f.result(timeout=300) for f in futures]
        makespan = time.time() - submitted
        for row, future in zip(rows, futures):
            row["placement"] = future.placement.kind.value
            row["reason"] = future.placement.reason
        return {"rows": rows, "makespan": makespan}

    step(f"4. Run a boosted flow: {head} has {spec.head.size.describe()}, borrows 2 CPU from {lender.name}")
    started = time.time()
    result = demo_boosted_flow(n=6)
    elapsed = time.time() - started
    rows = result["rows"]

    step("5. Where each task ran, and why")
    table = Table(show_lines=False)
    for column in ("task", "ran on", "inside the boost", "decision", "reason"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            f"crunch-{row['i']}",
            names.get(row["node_id"], row["node_id"][:8]),
            "yes" if row["group"] else "no",
            row["placement"],
            row["reason"],
        )
    console.print(table)
    slots = int(spec.head.size.cpu) + 2  # the head's CPUs and the boost's
    ideal = math.ceil(len(rows) / slots) * 1.0
    console.print(
        f"6 one-second tasks: makespan {result['makespan']:.1f} s on {slots} slots ({head} runs "
        f"{int(spec.head.size.cpu)} at a time, the boost adds 2 on {lender.name}); ideal {ideal:.1f} s "
        f"({result['makespan'] / ideal:.2f}x). The whole flow run took {elapsed:.1f} s: the boost's request "
        f"and release, `grid boost status` in it, and Prefect's start and end of the run."
    )

    step("6. After the flow: the boost is released")
    grid("boost", "status", "--all")
    live = list_boosts()
    console.print("No live boost is left." if not live else f"[red]Still live: {[b.id for b in live]}[/]")
    console.print("The Prefect UI shows the 'grid-boosts' artifact, and the flow run's 'grid-placements' (a row per task run).")


if __name__ == "__main__":
    # Run the imported module, not __main__: Ray pickles __main__'s functions by value,
    # dragging the console (and its lock) along; grid_flows.dev.demo is pickled by reference.
    from grid_flows.dev.demo import main as demo_main
    from grid_flows.errors import GridError

    try:
        sys.exit(demo_main())
    except GridError as exc:  # e.g. a cluster file that cannot be read: one line, no traceback
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
