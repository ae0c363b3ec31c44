"""The ``grid`` command.

Example:
    ```console
    $ grid blocks apply blocks/cluster.yaml
    $ ray start $(grid node ray-args gpu1 --address 10.0.0.1:6379)
    $ grid boost request gpu-master cpu 2 --priority high --duration 1800
    $ grid boost request gpu-master --cpu 2 --gpu 1 --memory 4GiB
    $ grid boost status --json
    $ grid boost release 3f2a9c1b
    ```

User errors print one line and exit with code 2, 3 when no node can lend, 4 when the Prefect
API or the Ray cluster cannot be reached; never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from grid_flows.cli.cluster import cluster_app, sharing_app
from grid_flows.core.ledger import PENDING_TIMEOUT_SECONDS
from grid_flows.core.models import Boost, utcnow
from grid_flows.errors import (
    ClusterNotConfigured, GpuUnavailable, GridError, IllegalTransition, InvalidRequest, NoCapacity, OffloadFailed,
    ControllerUnavailable, RayUnavailable, VramCapExceeded,
)
from grid_flows.core.units import NO_VALUE, format_amount, format_bytes, format_duration

app = typer.Typer(add_completion=False, no_args_is_help=True, help="grid-flows: borrow capacity across a Ray cluster.")
blocks_app = typer.Typer(no_args_is_help=True, help="Apply block documents (the cluster definition).")
node_app = typer.Typer(no_args_is_help=True, help="Per-node helpers.")
boost_app = typer.Typer(no_args_is_help=True, help="Request, inspect and release boosts.")
app.add_typer(blocks_app, name="blocks")
app.add_typer(node_app, name="node")
maintenance_app = typer.Typer(no_args_is_help=True, help="Run the scheduled maintenance flows.")
app.add_typer(boost_app, name="boost")
app.add_typer(maintenance_app, name="maintenance")
from grid_flows.cli.offload import offload_app, node_limits  # noqa: E402

app.add_typer(offload_app, name="offload")
node_app.command("limits")(node_limits)
app.add_typer(cluster_app, name="cluster")
app.add_typer(sharing_app, name="resource-sharing")

# Full-width tables even when piped (Rich would assume 80 columns and truncate ids).
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
DEFAULT_CLUSTER_FILE = Path("blocks/cluster.yaml")
SEED_RESOURCES = ("cpu", "gpu", "memory")


# -- blocks -----------------------------------------------------------------------------


@blocks_app.command("apply")
def blocks_apply(
    file: Path = typer.Argument(..., help="Cluster definition, e.g. blocks/cluster.yaml."),
    name: Optional[str] = typer.Option(None, "--name", help="Name of the GridCluster block document "
                                      "(default: PREFECT_INTEGRATIONS_GRID_CLUSTER_BLOCK, else default)."),
) -> None:
    """Validate a cluster file and save it as a GridCluster block (nothing is saved on error)."""
    from grid_flows.core.cluster_file import load_cluster_file
    from grid_flows.adapters.prefect.store import BoostStore

    spec = load_cluster_file(file)
    if name is None:
        from grid_flows.adapters.prefect.settings import GridSettings

        name = GridSettings().cluster_block
    _check_block_name(name)
    with BoostStore() as store:
        store.save_cluster(spec, name)
    lenders = ", ".join(f"{n.name} ({n.share.describe()})" for n in spec.lenders()) or "none"
    out.print(f"Saved GridCluster '{name}': {len(spec.nodes)} nodes, head {spec.head.name}, lenders: {lenders}")


def _check_block_name(name: str) -> None:
    import re

    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise InvalidRequest(f"--name: '{name}' must hold only lowercase letters, digits and dashes")


# -- node -------------------------------------------------------------------------------


@node_app.command("ray-args")
def node_ray_args(
    name: str = typer.Argument(..., help="Node name from the cluster file."),
    address: Optional[str] = typer.Option(None, "--address", help="Head address HOST:PORT, for workers."),
    file: Path = typer.Option(DEFAULT_CLUSTER_FILE, "--file", help="Cluster definition to read."),
) -> None:
    """Print the `ray start` flags for NAME: its grid.node label and its lending limits.

    Use: ray start $(grid node ray-args gpu1 --address HEAD:6379)
    """
    from grid_flows.core.cluster_file import load_cluster_file
    from grid_flows.core.models import NodeRole, address_problem
    from grid_flows.adapters.ray.cluster import ray_start_args

    problem = address_problem(address) if address is not None else None
    if problem:  # printed into a `ray start` command line: one token, no extra flags
        raise InvalidRequest(f"--address: {problem}")
    spec = load_cluster_file(file)
    node = spec.node(name)
    if node.role is NodeRole.head:
        head_address = None
    else:
        head_address = address or (f"{spec.head.address}:6379" if spec.head.address else None)
        if not head_address:
            raise InvalidRequest(
                f"{name} is a worker: pass --address HEAD_HOST:6379 (or set `address` on the head in {file})"
            )
    out.print(" ".join(ray_start_args(node, head_address)), highlight=False, soft_wrap=True)


# -- boost ------------------------------------------------------------------------------


@boost_app.command("request")
def boost_request(
    target: str = typer.Argument(..., help="Node that borrows, e.g. gpu-master."),
    resource: Optional[str] = typer.Argument(None, help="Seed form: cpu, gpu or memory ..."),
    amount: Optional[str] = typer.Argument(None, help="... and its amount, e.g. `cpu 2` or `memory 4GiB`."),
    cpu: Optional[str] = typer.Option(None, "--cpu", help="CPUs to borrow."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="GPUs to borrow."),
    memory: Optional[str] = typer.Option(None, "--memory",
                                         help="Memory with a unit, e.g. 4GiB or 512MiB (at least 1 MiB)."),
    # A str, not a typer Enum: typer reports a bad choice in a multi-line usage box; here it is one line, as for any bad input.
    priority: str = typer.Option("normal", "--priority", help="low, normal, high or critical."),
    duration: Optional[str] = typer.Option(None, "--duration", help="Seconds or e.g. 30m; default from the cluster."),
    source: Optional[str] = typer.Option(None, "--source", help="Lender to borrow from; default: the roomiest."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray address; default RAY_ADDRESS."),
    as_json: bool = typer.Option(False, "--json", help="Print the boost as JSON."),
) -> None:
    """Borrow capacity for TARGET: `request gpu-master cpu 2` or `request gpu-master --cpu 2 --gpu 1`."""
    from grid_flows.api import request_boost

    amounts: dict[str, Any] = {"cpu": cpu, "gpu": gpu, "memory": memory}
    if resource is not None:
        key = resource.lower()
        if key not in SEED_RESOURCES:
            raise InvalidRequest(f"unknown resource '{resource}'; expected one of {', '.join(SEED_RESOURCES)}")
        if amount is None:
            raise InvalidRequest(f"missing amount after '{resource}', e.g. `{resource} 2`")
        if amounts[key] is not None:
            raise InvalidRequest(f"{key} given twice (as `{key} {amount}` and as --{key})")
        amounts[key] = amount
    boost = request_boost(
        target,
        cpu=amounts["cpu"] or 0,
        gpu=amounts["gpu"] or 0,
        memory=amounts["memory"],
        priority=priority,
        duration=duration,
        source=source,
        address=address,
    )
    if as_json:
        out.print_json(data=boost_json(boost))
    else:
        out.print(
            f"Granted boost [bold]{boost.id}[/]: {boost.source} -> {boost.target}, {boost.resources.describe()}, "
            f"{boost.priority.value}, {format_duration(boost.seconds_left())} left. "
            f"Boosted tasks run on {boost.source}.",
            highlight=False,
        )


@boost_app.command("status")
def boost_status(
    node: Optional[str] = typer.Option(None, "--node", help="Only boosts whose source or target is NODE."),
    include_ended: bool = typer.Option(False, "--all", help="Include ended boosts."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
    watch: bool = typer.Option(False, "--watch", help="Redraw the table at each change, as the boost controller "
                               "tells it, until Ctrl-C."),
    redraw_every: float = typer.Option(5.0, "--every", metavar="SECONDS",
                                help="With --watch: also redraw this often, for the time left."),
) -> None:
    """Show boosts: source -> target, resources, priority, state, time left, and totals."""
    from grid_flows.adapters.prefect.quick_read import read_boosts

    if watch and as_json:
        raise InvalidRequest("--watch redraws a table: it does not go with --json")
    if not (0 < redraw_every <= 3600):
        raise InvalidRequest(f"--every: give a number of seconds between 0 and 3600, got {redraw_every:g}")
    # Live records only, unless --all: the history (bounded by the cluster's retention) is
    # read only when asked for, so status costs the same however many boosts have ended.
    # Over plain HTTP when the environment allows, else through Prefect's client (quick_read says why).
    every = None if watch else read_boosts(include_ended=include_ended)
    if every is None:
        from grid_flows.api import list_boosts

        every = list_boosts(include_ended=include_ended)
    shown = [b for b in every if node is None or node in (b.source, b.target)]
    if as_json:
        out.print_json(data=[boost_json(b) for b in shown])
        return
    if watch:
        _watch_status(node, include_ended, redraw_every)
        return
    out.print(_status_table(every, shown, include_ended))


def _watch_status(node: Optional[str], include_ended: bool, every: float) -> None:
    from rich.live import Live

    from grid_flows.api import list_boosts
    from grid_flows.control import client

    def render():
        every = list_boosts(include_ended=include_ended)
        return _status_table(every, [b for b in every if node is None or node in (b.source, b.target)], include_ended)

    version = client.wait_for_change(None, timeout=0)  # before the first read: no change falls in between
    try:
        if not out.is_terminal:  # a pipe or a file: one table after another, each stamped
            while True:
                out.print(f"-- {utcnow():%H:%M:%S} UTC", highlight=False)
                out.print(render())
                version = client.wait_for_change(version, timeout=every)
        with Live(render(), console=out, auto_refresh=False) as live:
            while True:
                version = client.wait_for_change(version, timeout=every)
                live.update(render(), refresh=True)
    except KeyboardInterrupt:
        pass


def _status_table(every: list[Boost], shown: list[Boost], include_ended: bool):
    from rich.console import Group

    prefixes = unique_prefixes([b.id for b in every])
    table = Table(title="grid boosts (boosted tasks run on the source node)", title_justify="left")
    for column in ("ID", "Source -> Target", "CPU", "GPU", "Memory", "Priority", "State", "Time left",
                   "Requested by"):
        table.add_column(column, justify="right" if column in ("CPU", "GPU", "Memory") else "left", no_wrap=True)
    total_cpu = total_gpu = 0.0
    total_mem = 0
    for b in shown:
        live = not b.state.ended
        if live:
            total_cpu += b.resources.cpu
            total_gpu += b.resources.gpu
            total_mem += b.resources.memory
        table.add_row(
            prefixes[b.id],
            f"{b.source} -> {b.target}",
            format_amount(b.resources.cpu) if b.resources.cpu else NO_VALUE,
            format_amount(b.resources.gpu) if b.resources.gpu else NO_VALUE,
            format_bytes(b.resources.memory) if b.resources.memory else NO_VALUE,
            b.priority.value,
            shown_state(b),
            time_left(b) if live else NO_VALUE,
            b.requested_by or NO_VALUE,
        )
    table.add_section()
    table.add_row("total", "", format_amount(total_cpu), format_amount(total_gpu), format_bytes(total_mem), "", "", "",
                  "")
    if not shown:
        return Group("No live boosts." if not include_ended else "No boosts.", table)
    return table


@boost_app.command("release")
def boost_release(
    boost_id: str = typer.Argument(..., help="Boost id or a unique prefix of it."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray address; default RAY_ADDRESS."),
    as_json: bool = typer.Option(False, "--json", help="Print the boost as JSON."),
) -> None:
    """Release a boost: its placement group is removed and the capacity is free at once."""
    from grid_flows.control.boosts import release
    from grid_flows.core.models import BoostState

    boost = release(boost_id, address=address)
    if as_json:
        out.print_json(data=boost_json(boost))
    elif boost.state is BoostState.released and "by request" in boost.reason:
        out.print(f"Released boost {boost.id} ({boost.source} -> {boost.target}, {boost.resources.describe()}).")
    else:
        out.print(f"Boost {boost.id} had already ended: {boost.state.value} ({boost.reason or 'no reason recorded'}).")


@boost_app.command("extend")
def boost_extend(
    boost_id: str = typer.Argument(..., help="Boost id or a unique prefix of it."),
    duration: str = typer.Option(..., "--duration", help="Time to add: seconds or e.g. 30m."),
    as_json: bool = typer.Option(False, "--json", help="Print the boost as JSON."),
) -> None:
    """Extend an active boost, within the cluster's maximum boost length."""
    from grid_flows.control.boosts import extend

    boost = extend(boost_id, duration)
    if as_json:
        out.print_json(data=boost_json(boost))
    else:
        out.print(f"Boost {boost.id} now expires at {boost.expires_at:%Y-%m-%d %H:%M:%S} UTC ({time_left(boost)}).")


@boost_app.command("reconcile")
def boost_reconcile(
    pending_timeout: float = typer.Option(PENDING_TIMEOUT_SECONDS, "--pending-timeout", min=0,
                                          help="Seconds before a pending boost fails (finite, >= 0)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray address; default RAY_ADDRESS."),
) -> None:
    """Make Ray and the boost records agree: orphan groups, lost and stuck boosts."""
    from grid_flows.control.boosts import reconcile

    for line in reconcile(pending_timeout_seconds=pending_timeout, address=address).lines():
        out.print(line, highlight=False)


@maintenance_app.command("serve")
def maintenance_serve(
    interval_scale: float = typer.Option(1.0, "--interval-scale", min=0.01, help="Multiply every interval (tests)."),
) -> None:
    """Serve the maintenance flows (expire, reconcile, ...) on their schedules until Ctrl-C."""
    from grid_flows.flows.maintenance import serve_maintenance

    serve_maintenance(interval_scale)


# -- helpers ----------------------------------------------------------------------------


def time_left(boost: Boost) -> str:
    seconds = boost.seconds_left()
    return f"{format_duration(seconds)} left" if seconds > 0 else "overdue"


def shown_state(boost: Boost) -> str:
    """The record's state, or "overdue" for an active boost past its end that nothing ended yet."""
    return "overdue" if boost.is_overdue(utcnow()) else boost.state.value


def boost_json(boost: Boost) -> dict[str, Any]:
    data = boost.model_dump(mode="json")
    data["seconds_left"] = round(boost.seconds_left(), 1) if not boost.state.ended else 0
    data["overdue"] = boost.is_overdue(utcnow())
    return data


def unique_prefixes(ids: list[str], minimum: int = 8) -> dict[str, str]:
    """The shortest prefix (at least ``minimum`` characters) that names each id alone."""
    result = {}
    for boost_id in ids:
        length = minimum
        while length < len(boost_id) and any(o != boost_id and o.startswith(boost_id[:length]) for o in ids):
            length += 1
        result[boost_id] = boost_id[:length]
    return result


EXIT_UNREACHABLE = 4  # the Prefect API or the Ray cluster could not be reached
# How a shell sees each error (the most specific class listed in an error's MRO wins);
# OffloadFailed exits with the code its command ended with.
EXIT_CODES: dict[type, int] = {
    GridError: 1,
    InvalidRequest: 2,
    IllegalTransition: 2,
    ClusterNotConfigured: 2,
    NoCapacity: 3,
    GpuUnavailable: 3,
    VramCapExceeded: 3,
    RayUnavailable: EXIT_UNREACHABLE,
    ControllerUnavailable: EXIT_UNREACHABLE,
}


def exit_code_for(exc: GridError) -> int:
    """The exit code of ``grid`` when ``exc`` ends the command."""
    if isinstance(exc, OffloadFailed):
        return exc.code
    return next(EXIT_CODES[cls] for cls in type(exc).__mro__ if cls in EXIT_CODES)


def _run(call: Callable[[], Any]) -> int:
    try:
        call()
    except GridError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return exit_code_for(exc)
    except Exception as exc:
        # An unreachable Prefect API surfaces as httpx errors, bare or wrapped by Prefect.
        message = _connection_problem(exc)
        if message is None:
            raise
        err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
        return EXIT_UNREACHABLE
    return 0



def _connection_problem(exc: BaseException) -> str | None:
    import httpx

    chain = [exc]
    while chain[-1].__cause__ or chain[-1].__context__:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    if any(isinstance(e, (httpx.ConnectError, httpx.TimeoutException)) for e in chain):
        from prefect.settings import PREFECT_API_URL

        return f"cannot reach the Prefect API at {PREFECT_API_URL.value() or '(PREFECT_API_URL not set)'}"
    return None


def main() -> None:
    import logging

    # Prefect's event worker flushes the grid.boost.* events at exit and says "Still
    # processing items: N items remaining..." while it does; the events are sent either way.
    logging.getLogger("EventsWorker").setLevel(logging.ERROR)

    def invoke() -> None:
        try:
            app(standalone_mode=False)
        except typer.Exit as exc:
            raise SystemExit(exc.exit_code) from None
        except typer.Abort:
            raise SystemExit(1) from None

    try:
        code = _run(invoke)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    except Exception as exc:
        # Usage errors (typer's bundled click): print the usage line, no traceback.
        if not (hasattr(exc, "show") and hasattr(exc, "exit_code")):
            raise
        exc.show()
        code = exc.exit_code
    sys.exit(code)


if __name__ == "__main__":
    main()
