"""``grid offload run|scan`` and ``grid node limits``.

Example:
    ```console
    $ grid offload run --cpu 2 --memory 4GiB --timeout 3600 --cwd /srv/proj -- python train.py --epochs 3
    $ grid offload run --node gpu1 -- ffmpeg -i in.mkv out.mp4
    $ grid offload scan --node gpu-master --json
    $ grid node limits gpu1
    ```

``run`` exits with the command's exit code (124 when it timed out, 126/127 when it could not
be executed, 2 for user errors, among them a node whose ``allow_offload_commands`` is
false). ``--secret-env KEY=BLOCK`` passes the value of a Prefect ``Secret`` block; ``--env``
values are stored in the flow run's parameters.
"""

from __future__ import annotations

import os
import sys
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from grid_flows.errors import InvalidRequest
from grid_flows.core.units import NO_VALUE

offload_app = typer.Typer(no_args_is_help=True, help="Run commands where capacity is; find candidates to move.")

out = Console(width=None if sys.stdout.isatty() else 160)


@offload_app.command(
    "run",
    context_settings={"allow_interspersed_args": False},
)
def offload_run(
    command: List[str] = typer.Argument(..., help="The program and its arguments (after `--`). No shell is used."),
    node: Optional[str] = typer.Option(None, "--node", help="Run on this node (through its lendable share)."),
    cpu: str = typer.Option("1", "--cpu", help="CPUs the command needs."),
    gpu: str = typer.Option("0", "--gpu", help="GPUs the command needs."),
    memory: Optional[str] = typer.Option(None, "--memory", help="Memory, e.g. 4GiB (a scheduling number)."),
    priority: str = typer.Option("normal", "--priority", help="Priority of a boost if one is needed."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Seconds; then its processes are killed."),
    cwd: Optional[str] = typer.Option(None, "--cwd", help="Working directory on the node (absolute)."),
    env: List[str] = typer.Option(
        [], "--env", help="KEY=VALUE added to the minimal environment; repeatable. Values are stored in the flow "
                          "run's parameters; use --secret-env for secrets."),
    secret_env: List[str] = typer.Option(
        [], "--secret-env", help="KEY=BLOCK: set KEY to the value of the Prefect Secret block BLOCK, loaded inside "
                                 "the run (only the block name is stored); repeatable."),
    strategy: str = typer.Option("local_first", "--strategy", help="Placement strategy."),
    use_boost: str = typer.Option("auto", "--boost", help="auto, always or never."),
) -> None:
    """Run CMD ARGS... on the best node: `grid offload run --cpu 2 -- python train.py`.

    Only nodes with `allow_offload_commands: true` (off by default) run commands.
    """
    from grid_flows.flows.offload import check_request, offload
    from grid_flows.errors import OffloadFailed
    from grid_flows.core.placement import Strategy

    if timeout is not None and not timeout > 0:
        raise InvalidRequest(f"--timeout must be greater than zero, got {timeout:g}")
    if cwd is not None and not os.path.isabs(cwd):
        raise InvalidRequest(f"--cwd must be an absolute path (it is used on the node), got {cwd!r}")
    env_vars = parse_assignments(env, "--env")
    secrets = parse_assignments(secret_env, "--secret-env")
    argv, env_vars, secrets, needs = check_request(
        list(command), env_vars, secrets, cpu=cpu, gpu=gpu, memory=memory, use_boost=use_boost,
        timeout_seconds=timeout, cwd=cwd, priority=priority)
    try:
        Strategy.parse(strategy)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    state = offload(command=argv, node=node, cpu=needs.cpu, gpu=needs.gpu, memory=needs.memory or None, priority=priority,
                    timeout_seconds=timeout, cwd=cwd, env=env_vars, strategy=strategy, use_boost=use_boost,
                    secret_env=secrets or None, return_state=True)
    if state.is_completed():
        return
    if state.is_cancelled():
        raise OffloadFailed(f"cancelled: {state.message}", 130)
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, BaseException):
        raise exc
    raise OffloadFailed(state.message or "the offload run failed", 1)


def parse_assignments(items: List[str], option: str) -> dict[str, str]:
    """``["K=V", ...]`` as a dict (the last of a repeated KEY wins); InvalidRequest naming the
    option, never a value."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidRequest(f"{option}: expected KEY=VALUE, got {item!r}")  # no '=': no value to hide
        if not key:
            raise InvalidRequest(f"{option}: expected KEY=VALUE, got an empty KEY")
        out[key] = value
    return out


@offload_app.command("scan")
def offload_scan(
    node: Optional[str] = typer.Option(None, "--node", help="Node to scan; default the head."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
    min_cpu: float = typer.Option(20.0, "--min-cpu", help="Percent of one CPU a candidate uses at least."),
    min_age: float = typer.Option(60.0, "--min-age", help="Seconds a candidate has run at least."),
    show_skipped: bool = typer.Option(False, "--skipped", help="Also list skipped processes and why."),
) -> None:
    """List heavy processes on NODE that could run elsewhere, with the command that moves them."""
    rows, skipped = scan(node, min_cpu_percent=min_cpu, min_age_seconds=min_age)
    if as_json:
        data: Any = {"candidates": rows}
        if show_skipped:
            data["skipped"] = skipped
        out.print_json(data=data)
        return
    if not rows:
        out.print("No offload candidates.")
    else:
        table = Table(title="offload candidates", title_justify="left")
        for column in ("PID", "User", "CPU %", "RSS", "Command", "Best node", "Confidence", "Reason", "Move with"):
            table.add_column(column, overflow="fold")
        for r in rows:
            table.add_row(str(r["pid"]), r["user"], f"{r['cpu_percent']:.0f}", r["rss_human"], r["command"],
                          r["best_node"] or NO_VALUE, f"{r['confidence']:.2f}", r["reason"], r["offload_command"] or NO_VALUE)
        out.print(table)
    if show_skipped and not as_json:
        for s in skipped:
            out.print(f"skipped {s['pid']} {s['name']}: {s['why']}", highlight=False)


def scan(node: Optional[str], **limits: Any) -> tuple[list[dict], list[dict]]:
    """Scan ``node`` (default the head) with psutil there; rows of candidates and skipped processes."""
    import shlex

    import ray

    from grid_flows.adapters.host import processes
    from grid_flows.core import offload_rules
    from grid_flows.adapters.ray import cluster as rc
    from grid_flows.core.placement import PlacementKind, Requirement, place
    from grid_flows.adapters.prefect.store import BoostStore
    from grid_flows.core.units import format_bytes

    with BoostStore() as store:
        spec = store.load_cluster()
    name = node or spec.head.name
    spec.node(name)
    rc.connect()
    nodes = rc.grid_nodes()
    if name not in nodes or not nodes[name].alive:
        raise InvalidRequest(f"node '{name}' is not up in the Ray cluster")
    task = ray.remote(num_cpus=0, max_retries=0)(processes.scan_processes)
    candidates, skipped = ray.get(task.options(label_selector={rc.NODE_LABEL: name}).remote(**limits), timeout=120)
    view = offload_rules.cluster_view(spec, nodes, name, exclude_target=True)
    rows = []
    for c in candidates:
        p = placement = place(Requirement(c.resources), view, [], "local_first")
        movable = placement.kind is PlacementKind.offload
        rows.append({
            "pid": c.proc.pid, "user": c.proc.username or str(c.proc.uid), "name": c.proc.name,
            "command": shlex.join(c.proc.cmdline), "kind": c.kind, "cpu_percent": round(c.proc.cpu_percent, 1),
            "rss": c.proc.rss, "rss_human": format_bytes(c.proc.rss), "age_seconds": round(c.age_seconds),
            "needs": c.resources.describe(), "best_node": p.node if movable else None,
            "confidence": round(p.confidence, 2), "reason": p.reason,
            "offload_command": offload_rules.offload_command(c.proc.cmdline, p.node, c.resources, c.proc.cwd)
            if movable else None,
        })
    skipped_rows = [{"pid": s.proc.pid, "name": s.proc.name, "why": s.why} for s in skipped]
    return rows, skipped_rows


def node_limits(
    name: str = typer.Argument(..., help="Node name from the cluster definition."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Show the resource mode in force on NAME and what a probe process there actually gets."""
    import ray

    from grid_flows.adapters.ray import cluster as rc
    from grid_flows.core.modes import limits_for
    from grid_flows.adapters.prefect.store import BoostStore

    with BoostStore() as store:
        spec = store.load_cluster()
    node_spec = spec.node(name)
    limits = limits_for(node_spec)
    rc.connect()
    nodes = rc.grid_nodes()
    if name not in nodes or not nodes[name].alive:
        raise InvalidRequest(f"node '{name}' is not up in the Ray cluster")
    probe = ray.remote(num_cpus=0, max_retries=0, max_calls=1)(_probe_limits)
    live = ray.get(probe.options(label_selector={rc.NODE_LABEL: name}).remote(limits), timeout=120)
    info = nodes[name]
    data = {
        "node": name, "mode": limits.mode.value, "limits": limits.describe(),
        "nice": limits.nice, "ionice": limits.ionice_class, "vram_cap": limits.vram_cap,
        "gpu_interval_ms": limits.gpu_interval_ms, "probe": live,
        "lendable_free": info.lendable_free.describe(), "lendable_total": info.lendable_total.describe(),
        "free": info.free.describe(),
    }
    if as_json:
        out.print_json(data=data)
        return
    out.print(f"[bold]{name}[/]: {limits.describe()}", highlight=False)
    out.print(f"  probe process: nice {live['nice_before']} -> {live['nice']}, "
              f"ionice {live['ionice_before']} -> {live['ionice']}", highlight=False)
    for note in live["notes"]:
        out.print(f"    {note}", highlight=False)
    out.print(f"  GPU: {live['gpu']}", highlight=False)
    out.print(f"  lendable share free: {data['lendable_free']} of {data['lendable_total']}; "
              f"raw free: {data['free']}", highlight=False)


def _probe_limits(limits) -> dict:
    """On the node: apply the mode to this (throwaway) process and report what it got."""
    import psutil

    from grid_flows.adapters.host.guard import NvmlProbe, apply_process_priority

    applied = apply_process_priority(limits)
    me = psutil.Process()
    io = me.ionice()
    names = {0: "none", 1: "realtime", 2: "best-effort", 3: "idle"}
    probe = NvmlProbe()
    devices = probe.devices()
    if devices:
        used = max(d.used_bytes / d.total_bytes for d in devices if d.total_bytes) if devices else 0
        gpu = f"{probe.status}; most used device at {used:.0%} of VRAM (cap {limits.vram_cap:.0%})"
    else:
        gpu = f"no GPU ({probe.status})"
    return {
        "nice_before": applied["nice_before"], "nice": me.nice(),
        "ionice_before": applied["ionice_before"],
        "ionice": names.get(int(io.ioclass), str(int(io.ioclass))) + (f" {io.value}" if int(io.ioclass) == 2 else ""),
        "notes": applied["notes"], "gpu": gpu,
    }


__all__ = ["offload_app", "node_limits", "scan"]
