"""The demo: a local three-node Ray cluster, a local Prefect server, a boost and its table.

Run it with ``make demo`` (or ``python -m grid_flows.demo``). It starts everything it
needs on this machine and stops it again by PID at the end; the Prefect database stays
in ``.demo/prefect`` so the UI can show the run afterwards.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

console = Console(width=None if sys.stdout.isatty() else 120)
REPO = Path(__file__).resolve().parents[1]


def step(text: str) -> None:
    console.rule(f"[bold]{text}", align="left")


def grid(*args: str) -> None:
    """Run the real `grid` CLI as a user would, in a child process."""
    console.print(f"[dim]$ grid {' '.join(args)}[/]")
    subprocess.run([sys.executable, "-m", "grid_flows.cli", *args], check=True, env=os.environ.copy(), timeout=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cluster-file", default=str(REPO / "blocks" / "cluster.yaml"))
    parser.add_argument("--home", default=str(REPO / ".demo"), help="where the demo keeps its Prefect database")
    parser.add_argument("--keep", action="store_true", help="keep the server and cluster up until Ctrl-C")
    args = parser.parse_args(argv)

    from grid_flows.ray_cluster import quiet_ray_environment

    quiet_ray_environment()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

    from grid_flows.cluster_file import load_cluster_file
    from grid_flows.local_prefect import local_prefect_server
    from grid_flows.ray_cluster import local_cluster

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
            step("3. Apply the cluster definition as a Prefect block")
            grid("blocks", "apply", args.cluster_file)
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


def run_boost_demo(spec) -> None:
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from grid_flows import ray_cluster as rc
    from grid_flows.api import release_boost, request_boost

    head = spec.head.name
    step(f"4. Request a boost: 2 CPU lent to {head}")
    boost = request_boost(head, cpu=2, priority="high", duration="30m")
    console.print(
        f"Granted {boost.id}: {boost.source} -> {boost.target}, {boost.resources.describe()}. "
        f"Ray placement group {boost.placement_group} holds the CPUs on {boost.source}."
    )
    grid("boost", "status")

    step("5. Two tasks run inside the boost")

    @ray.remote(num_cpus=1, max_retries=0)
    def where_am_i(i: int) -> tuple[int, str, str]:
        ctx = ray.get_runtime_context()
        return i, ctx.get_node_id(), ctx.get_placement_group_id() or ""

    names = {info.node_id: name for name, info in rc.grid_nodes().items()}
    group = rc._group_handle(boost.placement_group_id)
    strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
    for i, node_id, group_id in ray.get([where_am_i.options(scheduling_strategy=strategy).remote(i) for i in range(2)], timeout=120):
        inside = "inside the boost" if group_id == boost.placement_group_id else "OUTSIDE the boost"
        console.print(f"  task {i} ran on {names.get(node_id, node_id)}, {inside}")

    step("6. Release the boost")
    release_boost(boost.id)
    grid("boost", "status", "--all")


if __name__ == "__main__":
    sys.exit(main())
