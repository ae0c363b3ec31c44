"""`grid cluster status` and `grid resource-sharing status`.

Example:
    ```console
    $ grid cluster status            # role, liveness, capacity, lending, pressure per node
    $ grid cluster status --json
    $ grid resource-sharing status   # lenders, borrowers, policy and mode
    ```

Pressure and trends come from the metrics history the ``grid-rebalance`` flow keeps
(``GridMetricsHistory`` block); "—" means no sample was taken yet.
"""

from __future__ import annotations

from typing import Any, Optional

import typer
from rich.table import Table

from grid_flows.core.units import NO_VALUE, format_amount

cluster_app = typer.Typer(no_args_is_help=True, help="Inspect the cluster's nodes.")
sharing_app = typer.Typer(no_args_is_help=True, help="Inspect resource sharing: lenders, borrowers, policy.")


def _out():
    from grid_flows.cli.app import out

    return out


def _res_json(r) -> Optional[dict[str, Any]]:
    if r is None:
        return None
    return {"cpu": r.cpu, "gpu": r.gpu, "memory_bytes": r.memory}


@cluster_app.command("status")
def cluster_status_command(
    history: Optional[str] = typer.Option(
        None, "--history", help="GridMetricsHistory block with the pressure samples (default: named like the cluster)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Every node: role, liveness, total, lendable, lent and free capacity, pressure and trend."""
    from grid_flows.adapters.ray import cluster as rc
    from grid_flows.control.boosts import lend_token_mismatches
    from grid_flows.flows.rebalance import cluster_status, describe_resources
    from grid_flows.core.metrics import check_history_name
    from grid_flows.adapters.prefect.metrics_store import load_history
    from grid_flows.core.models import utcnow
    from grid_flows.adapters.prefect.store import BoostStore

    if history is not None:
        check_history_name(history)
    now = utcnow()
    with BoostStore() as store:
        spec = store.load_cluster()
        live = store.list()
    rc.connect()  # RayUnavailable (exit 4) names what to set
    nodes = rc.grid_nodes()
    status = cluster_status(spec, live, load_history(history, now), nodes, now)
    mismatches = {line.split(" ", 1)[0]: line for line in lend_token_mismatches(spec, nodes)}
    out = _out()
    if as_json:
        out.print_json(data=[
            {
                **{k: s[k] for k in ("node", "role", "status", "pressure")},
                "lend_tokens_mismatch": mismatches.get(s["node"]),
                "pressure_at": s["pressure_at"].isoformat() if s["pressure_at"] else None,
                "trends_per_minute": {f"{m}m": t for m, t in s["trends"].items()},
                **{k: _res_json(s[k]) for k in ("total", "lendable", "lent", "lendable_free", "borrowed", "free")},
            }
            for s in status
        ])
        return
    table = Table(title=f"grid cluster '{spec.name}' (lent capacity runs boosted tasks on the lender)",
                  title_justify="left")
    for column in ("Node", "Role", "Status", "Total", "Lendable", "Lent", "Free", "Pressure", "Trend 5/15/60 min"):
        table.add_column(column, no_wrap=True)
    for s in status:
        table.add_row(
            s["node"], s["role"], s["status"], describe_resources(s["total"]),
            s["lendable"].describe() if not s["lendable"].is_zero() else NO_VALUE,
            s["lent"].describe() if not s["lent"].is_zero() else NO_VALUE,
            describe_resources(s["free"]),
            NO_VALUE if s["pressure"] is None else f"{s['pressure']:.2f}",
            " / ".join(s["trends"].get(m, NO_VALUE) for m in (5, 15, 60)),
        )
    out.print(table)
    for line in mismatches.values():
        out.print(f"[yellow]warning:[/] {line}", highlight=False)


@sharing_app.command("status")
def sharing_status_command(
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Lenders (share, lent, free), borrowers (what they hold from whom), policy and mode."""
    from grid_flows.core.ledger import held_by_borrower, held_by_lender
    from grid_flows.core.models import Resources
    from grid_flows.adapters.prefect.store import BoostStore

    with BoostStore() as store:
        spec = store.load_cluster()
        live = [b for b in store.list() if not b.state.ended]
    sharing = spec.resource_sharing
    lenders = []
    lent_by = held_by_lender(live, count_pending=True)  # as `grid cluster status` counts them
    borrowed_by = held_by_borrower(live, count_pending=True)
    for node in spec.lenders():
        lent = lent_by.get(node.name, Resources())
        lenders.append({"node": node.name, "priority": node.resource_sharing.priority, "share": node.share,
                        "lent": lent, "free": node.share.minus(lent),
                        "boosts": sum(b.source == node.name for b in live)})
    borrowers = []
    for target in sorted({b.target for b in live}):
        held = [b for b in live if b.target == target]
        borrowers.append({"node": target, "borrowed": borrowed_by[target],
                          "from": sorted({b.source for b in held}), "boosts": len(held),
                          "by_rebalance": sum(b.origin == "rebalance" for b in held)})
    th = sharing.thresholds
    out = _out()
    if as_json:
        out.print_json(data={
            "enabled": sharing.enabled,
            "mode": sharing.mode.value,
            "policy": sharing.policy.value,
            "thresholds": th.model_dump(),
            "rebalance_interval_seconds": sharing.rebalance_interval_seconds,
            "lenders": [{**l, **{k: _res_json(l[k]) for k in ("share", "lent", "free")}} for l in lenders],
            "borrowers": [{**b, "borrowed": _res_json(b["borrowed"])} for b in borrowers],
        })
        return
    out.print(
        f"Resource sharing is [bold]{'enabled' if sharing.enabled else 'disabled'}[/]: mode "
        f"[bold]{sharing.mode.value}[/], policy [bold]{sharing.policy.value}[/], rebalance every "
        f"{format_amount(sharing.rebalance_interval_seconds)} s; busy above cpu {th.cpu.high:g} / memory "
        f"{th.memory.high:g} / gpu {th.gpu.high:g}, idle below {th.cpu.low:g} / {th.memory.low:g} / {th.gpu.low:g}.",
        highlight=False,
    )
    table = Table(title="lenders", title_justify="left")
    for column in ("Node", "Priority", "Share", "Lent", "Free to lend", "Boosts"):
        table.add_column(column, no_wrap=True)
    for l in lenders:
        table.add_row(l["node"], str(l["priority"]), l["share"].describe(),
                      l["lent"].describe() if not l["lent"].is_zero() else NO_VALUE, l["free"].describe(), str(l["boosts"]))
    out.print(table if lenders else "No node lends (set resource_sharing.can_share on a worker).")
    if borrowers:
        table = Table(title="borrowers", title_justify="left")
        for column in ("Node", "Borrowed", "From", "Boosts", "Made by rebalance"):
            table.add_column(column, no_wrap=True)
        for b in borrowers:
            table.add_row(b["node"], b["borrowed"].describe(), ", ".join(b["from"]), str(b["boosts"]),
                          str(b["by_rebalance"]))
        out.print(table)
    else:
        out.print("No node borrows right now.")

