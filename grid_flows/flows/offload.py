"""The ``grid-offload`` flow: run a command on the node that has room for it.

Why ~500 lines: the flow, its strict parameter checks and the Ray tasks it runs on the
chosen node (run, cancel, report) are one unit that a reader follows top to bottom; the
rules are in ``grid_flows.core`` and the process handling in ``grid_flows.adapters.host``.

Only nodes whose ``allow_offload_commands`` is true (off by default) may run commands;
when a node's ``offload_commands`` is not empty, argv[0] must be one of them (a bare
name matches the program's base name, a path what argv[0] resolves to on the node).
A named ``node`` that refuses the command fails the run at once with a one-line error
that names the node and the key; without ``node``, only nodes that admit the command
are candidates. This is checked before anything is submitted to Ray, and again on the
node inside the Ray task, right before the start.

Where it runs is the scheduler's decision (:func:`grid_flows.core.placement.place`) over a
view built from the live Ray nodes: the target (the cluster's head) when it has room
(and admits the command), else a lender's free share (the task carries the lend tokens,
so Ray itself keeps it within the share), else (or with ``use_boost="always"``) a boost
from an admitting lender, requested for the run and released in a ``finally``. With
``node``, the placement is ``node_specific``: the head runs it on its own free capacity,
any other node only through its lendable share (a worker's private capacity is never
used, as everywhere in grid-flows), and a boost from that node when ``use_boost`` asks
for one. The decision and its reason are logged and shown in a markdown artifact
``grid-offload-<flow-run-id>``.

The command is an argument list, never a shell string; arguments and ``env`` are
checked up front (no NUL bytes, no '=' in variable names). ``secret_env`` maps variable
names to Prefect ``Secret`` block names: the values are loaded inside the run and go to
the child process only (never into parameters, logs or the artifact). The command runs
in a Ray task on the chosen node, in its own session (process group) with an explicit
working directory and a minimal environment, under the node's resource mode
(nice/ionice). Its stdout and stderr are streamed into the run's logs line by line
through a Ray queue. Exit code 0 completes the run; any other fails it with the code in
the message; a program that cannot be executed (not found, no shebang line) fails it
with a one-line reason. A timeout, a cancellation of the run, or the driver being
interrupted kills the command's whole process tree on the node, including descendants
that left its process group with ``setsid`` (SIGTERM, then SIGKILL after
``grace_seconds``).

Output lines and the decision are logged at INFO by the ``prefect.flow_runs.offload``
logger, which is set to INFO even when ``PREFECT_LOGGING_LEVEL`` is higher: the
command's output is the product of this flow, not chatter.

Example:
    ```python
    from grid_flows.flows.offload import offload
    from grid_flows.adapters.host import processes
    offload(command=["python", "train.py", "--epochs", "3"], cpu=2, cwd="/srv/project")
    ```
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Annotated, Any, Dict, List, Literal, Optional, Union, get_args

from prefect import flow, get_run_logger
from prefect.states import Cancelled
from pydantic import Field, StrictFloat, StrictInt, StrictStr

from grid_flows.core.models import Priority, Resources
from grid_flows.core.units import NO_VALUE
from grid_flows.core.placement import Strategy
from grid_flows.adapters.ray.cluster import NODE_LABEL
from grid_flows.errors import GridError, InvalidRequest, NoCapacity
from grid_flows.errors import OffloadFailed

OUTPUT_LOGGER = "prefect.flow_runs.offload"
UseBoost = Literal["auto", "always", "never"]
USE_BOOST = get_args(UseBoost)
TIMEOUT_EXIT_CODE = 124  # as coreutils' timeout(1)
_CANCEL_POLL_SECONDS = 1.0



def _output_logger():
    from prefect.logging.loggers import PrefectLogAdapter

    base = get_run_logger()
    lg = logging.getLogger(OUTPUT_LOGGER)
    if lg.getEffectiveLevel() > logging.INFO:
        lg.setLevel(logging.INFO)
    return PrefectLogAdapter(lg, extra=dict(getattr(base, "extra", {}) or {}))


def _remote_functions():
    import ray

    from grid_flows.adapters.host import processes

    @ray.remote(max_retries=0, max_calls=1)  # max_calls=1: the worker whose priority we lowered exits after
    def _offload_task(argv, cwd, env, node_spec, queue, timeout_seconds, grace_seconds):
        if cwd is None:
            cwd = os.path.expanduser("~")
        try:
            full_env = processes.child_env(env, node=node_spec.name)
        except InvalidRequest as exc:
            return processes.RunResult(exit_code=None, error=str(exc))
        # The worker is a subreaper (it exits after this task): orphans of the command stay in its tree.
        return processes.run_command(argv, cwd, full_env, node_spec, queue, timeout_seconds, grace_seconds,
                                subreaper=True)

    @ray.remote(num_cpus=0, max_retries=0)
    def _kill_task(pid, grace_seconds, create_time):
        return processes.kill_tree(pid, grace_seconds, create_time)

    return _offload_task, _kill_task


def allowed_nodes(spec, argv: List[str], node: Optional[str] = None) -> List[str]:
    """The nodes that may run ``argv`` (pure). InvalidRequest in one line when the named
    ``node`` refuses it, or when every node does."""
    from grid_flows.core.offload_rules import command_refusal, no_node_allows

    refusals = {n.name: command_refusal(n, argv) for n in spec.nodes}
    if node is not None:
        spec.node(node)  # UnknownNode with the known names
        if refusals[node]:
            raise InvalidRequest(refusals[node])
    allowed = [name for name, why in refusals.items() if not why]
    if not allowed:
        raise InvalidRequest(no_node_allows(refusals))
    return allowed


def choose(spec, nodes, resources: Resources, node: Optional[str], strategy: str,
           allowed: Optional[List[str]] = None, pressures: Optional[dict] = None):
    """The scheduler's placement for the command (pure given its inputs). With ``allowed``
    (:func:`allowed_nodes`), other nodes are no candidates; ``pressures`` (:func:`_pressures`)
    is what strategies that rank by pressure see."""
    import re
    from dataclasses import replace

    from grid_flows.core.offload_rules import cluster_view
    from grid_flows.core.placement import Requirement, Strategy, place

    target = spec.head.name
    if node is not None:
        spec.node(node)  # UnknownNode with the known names
        strategy = Strategy.node_specific.value
        # Another node is used through its lendable share only, never its private capacity.
    view = cluster_view(spec, nodes, target, only=allowed, pressures=pressures)
    placement = place(Requirement(resources, node), view, [], strategy)
    if allowed is not None and target not in allowed:  # the view offered nothing on the target: say why
        placement = replace(placement, reason=re.sub(
            rf"target {re.escape(target)} (is full|lacks [^;]*)",
            f"target {target} does not allow offload commands", placement.reason))
    left_out = [n.name for n in spec.nodes if allowed is not None and n.name not in allowed and n.name != target]
    if left_out and placement.node is None:
        placement = replace(placement, reason=f"{placement.reason}; not allowed to run it: {', '.join(left_out)}")
    return target, strategy, placement


def _pressures(spec) -> dict:
    """The nodes' pressure from the metrics history the rebalance flow keeps ({} when there is none)."""
    from grid_flows.adapters.prefect.metrics_store import load_history
    from grid_flows.core.models import utcnow
    from grid_flows.core.policy import placement_pressures

    now = utcnow()
    try:
        return placement_pressures(spec, load_history(spec.name, now=now), now)
    except Exception as exc:  # placing works without it: every node then reads as calm
        get_run_logger().warning("could not read the nodes' pressure from the metrics history: %s", exc)
        return {}


def check_request(command: Any, env: Any = None, secret_env: Any = None, *, cpu: Any = 1, gpu: Any = 0,
                  memory: Any = None, use_boost: str = "auto", timeout_seconds: Any = None,
                  cwd: Optional[str] = None, priority: str = "normal"):
    """The run's input checked without Ray or a server (pure): ``(argv, env, secret_env,
    resources)`` or InvalidRequest in one line. Messages never hold an env value."""
    from grid_flows.control.boosts import parse_priority
    from grid_flows.core.offload_rules import validate_env

    argv = validate_command(command)
    plain = validate_env(env, "env")
    secrets = validate_env(secret_env, "secret_env")
    both = sorted(set(plain) & set(secrets))
    if both:
        raise InvalidRequest(f"{both[0]} is given in both env and secret_env")
    for key, block in secrets.items():
        if not block.strip():
            raise InvalidRequest(f"secret_env: the Secret block name for {key} is empty")
    resources = _resources(cpu, gpu, memory)
    if use_boost not in USE_BOOST:
        raise InvalidRequest(f"use_boost: unknown value {use_boost!r}; expected one of {', '.join(USE_BOOST)}")
    if timeout_seconds is not None and not (timeout_seconds > 0):
        raise InvalidRequest(f"timeout_seconds must be greater than zero, got {timeout_seconds!r}")
    if cwd is not None and (not isinstance(cwd, str) or "\0" in cwd or not os.path.isabs(cwd)):
        raise InvalidRequest(f"cwd must be an absolute path (it is resolved on the node), got {cwd!r}")
    parse_priority(priority)
    return argv, plain, secrets, resources


def resolve_secrets(secret_env: Dict[str, str]) -> Dict[str, str]:
    """``{NAME: value}`` from ``{NAME: Secret block name}``, loaded now (inside the run).

    InvalidRequest in one line for a block that does not exist or holds no string; the
    values are never logged and never part of a message.
    """
    from grid_flows.core.offload_rules import validate_env

    if not secret_env:
        return {}
    from prefect.blocks.system import Secret

    values: Dict[str, str] = {}
    for key, block in secret_env.items():
        try:
            secret = Secret.load(block)
        except Exception:  # ValueError / ObjectNotFound for an unknown name
            raise InvalidRequest(f"secret_env: no Secret block named {block!r} (for {key})") from None
        try:
            value = secret.get()
        except Exception:
            raise InvalidRequest(f"secret_env: Secret block {block!r} (for {key}) could not be read") from None
        if not isinstance(value, str):
            raise InvalidRequest(f"secret_env: Secret block {block!r} (for {key}) does not hold a string")
        values[key] = value
    return validate_env(values, "secret_env")


def _artifact(flow_run_id: str, rows: List[tuple], argv: List[str]) -> None:
    import shlex

    from prefect.artifacts import create_markdown_artifact

    table = "\n".join("| %s | %s |" % (k, str(v).replace("|", "\\|")) for k, v in rows)
    markdown = (
        f"## grid offload\n\n`{shlex.join(argv)}`\n\n| | |\n|---|---|\n{table}\n"
    )
    create_markdown_artifact(key=f"grid-offload-{flow_run_id}", markdown=markdown,
                             description="Where the offloaded command ran and why")


def _failed_state_on_grid_error(fn):
    """An expected failure (GridError) ends the run Failed with a one-line message, not a traceback."""

    @functools.wraps(fn)  # Prefect reads the parameters through __wrapped__
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GridError as exc:
            from prefect.states import Failed

            _output_logger().error("%s", exc)
            return Failed(message=str(exc), data=exc)

    return run


@flow(name="grid-offload", log_prints=False)
@_failed_state_on_grid_error
def offload(
    command: List[str],
    node: Optional[str] = None,
    cpu: Annotated[StrictFloat, Field(ge=0)] = 1,
    gpu: Annotated[StrictFloat, Field(ge=0)] = 0,
    memory: Annotated[Optional[Union[StrictStr, StrictInt]], Field(description="bytes, or a size such as '4GiB'")] = None,
    priority: Priority = Priority.normal,
    timeout_seconds: Annotated[Optional[StrictFloat], Field(gt=0)] = None,
    cwd: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    strategy: Strategy = Strategy.local_first,
    use_boost: UseBoost = "auto",
    grace_seconds: Annotated[StrictFloat, Field(ge=0)] = 5.0,
    boost_duration: Optional[Union[StrictStr, StrictFloat]] = None,
    secret_env: Optional[Dict[str, str]] = None,
) -> Dict[str, Any]:
    """Run ``command`` (an argument list) on the best node for ``cpu``/``gpu``/``memory``.

    ``env`` values are stored in the run's parameters; for secrets use ``secret_env``
    (variable name -> Prefect ``Secret`` block name), loaded inside the run.
    ``use_boost``: ``auto`` leases a boost only when neither the target nor any lender's
    free share can take the command now (a boost of ``priority`` may preempt lower ones);
    ``always`` runs every command that does not fit on the target in a boost; ``never``
    fails instead. Returns ``{"node", "kind", "exit_code", "reason", ...}``.

    An expected failure (a node that does not allow the command, non-zero exit, timeout,
    bad input, no capacity) ends the run Failed with a one-line message and the error
    (with its ``exit_code``) as the state's data, rather than a traceback in the logs.
    """
    from grid_flows.control import boosts
    from grid_flows.adapters.ray import cluster as rc
    from grid_flows.core.offload_rules import command_refusal
    from grid_flows.core.placement import PlacementKind
    from grid_flows.adapters.prefect.store import BoostStore

    log = _output_logger()
    priority, strategy = Priority(priority).value, Strategy(strategy).value  # plain names from here on
    argv, env, secret_env, resources = check_request(
        command, env, secret_env, cpu=cpu, gpu=gpu, memory=memory, use_boost=use_boost,
        timeout_seconds=timeout_seconds, cwd=cwd, priority=priority)
    with BoostStore() as store:
        spec = store.load_cluster()
    allowed = allowed_nodes(spec, argv, node)
    env = {**env, **resolve_secrets(secret_env)}  # secret values: for the child only
    rc.connect()
    target, strategy, placement = choose(spec, rc.grid_nodes(), resources, node, strategy, allowed, _pressures(spec))
    log.info("placement: %s on %s (confidence %.2f): %s", placement.kind.value, placement.node,
             placement.confidence, placement.reason)

    boost = None
    kind, where, reason = placement.kind, placement.node, placement.reason
    why_no_boosts = boosts.why_no_boosts(spec)
    wants_boost = (kind is PlacementKind.queue and use_boost == "auto" and not why_no_boosts) or (
        use_boost == "always" and kind is not PlacementKind.target  # refused with the reason when boosts are off
    )
    if not wants_boost and kind is PlacementKind.queue:
        and_no_boost = f"; and no boost, because {why_no_boosts}" if why_no_boosts else ""
        raise NoCapacity(f"cannot run {resources.describe()} anywhere now: {placement.reason}{and_no_boost}")
    try:
        if wants_boost:
            boost = _request_boost(spec, target, resources, priority, boost_duration, placement, node, allowed)
            kind, where = PlacementKind.boost, boost.source
            reason = f"boost {boost.short_id} from {boost.source} ({boost.priority.value}); {placement.reason}"
            log.info("using boost %s: %s -> %s, %s", boost.id, boost.source, boost.target,
                     boost.resources.describe())
        node_spec = spec.node(where)
        refused = command_refusal(node_spec, argv)  # the last word before Ray sees the command
        if refused:
            raise InvalidRequest(refused)
        return _run(argv, cwd, env, node_spec, kind, where, reason, target, strategy, placement, resources,
                    boost, timeout_seconds, grace_seconds, log)
    finally:
        if boost is not None:
            try:
                boosts.release(boost.id, reason="offloaded command ended")
            except Exception as exc:  # the boost's expiry is the safety net
                log.warning("could not release boost %s: %s", boost.id, exc)


def _request_boost(spec, target: str, resources: Resources, priority: str, duration, placement,
                   node: Optional[str], allowed: List[str]):
    """A boost for the run from a lender that allows the command; NoCapacity if none can lend."""
    from grid_flows.control import boosts
    from grid_flows.core.placement import PlacementKind

    if placement.kind is PlacementKind.offload:
        sources: List[Optional[str]] = [placement.node]
    elif node and node != target:
        sources = [node]
    else:
        lenders = [n.name for n in sorted(spec.lenders(), key=lambda n: n.resource_sharing.priority)
                   if n.name != target]
        usable = [n for n in lenders if n in allowed]
        sources = [None] if usable and usable == lenders else list(usable)  # None: the ledger picks
    if not sources:
        raise NoCapacity(f"cannot run {resources.describe()} anywhere now: {placement.reason}; "
                         f"and no boost: no lender allows offload commands")
    problems = []
    for source in sources:
        try:
            return boosts.request(target, cpu=resources.cpu, gpu=resources.gpu, memory=resources.memory or None,
                                  priority=priority, duration=duration, source=source, origin="offload")
        except NoCapacity as exc:
            problems.append(str(exc))
    raise NoCapacity(f"cannot run {resources.describe()} anywhere now: {placement.reason}; "
                     f"and no boost: {'; '.join(problems)}")


def _run(argv, cwd, env, node_spec, kind, where, reason, target, strategy, placement, resources, boost,
         timeout_seconds, grace_seconds, log) -> Any:
    """Submit the command to ``where``, stream its output, and turn the result into the outcome."""
    import ray
    from ray.util.queue import Empty, Queue

    from grid_flows.adapters.ray import cluster as rc
    from grid_flows.core.modes import limits_for
    from grid_flows.core.placement import PlacementKind

    limits = limits_for(node_spec)
    group = rc.group_handle(boost.placement_group_id) if kind is PlacementKind.boost else None
    options = rc.task_options(kind, resources, where, group=group)

    from prefect.runtime import flow_run

    run_id = str(flow_run.id or "local")
    rows = [("node", where), ("placement", kind.value), ("target", target), ("strategy", strategy),
            ("confidence", f"{placement.confidence:.2f}"), ("reason", reason),
            ("resources", resources.describe()), ("resource mode", limits.describe()),
            ("boost", boost.id if boost else NO_VALUE), ("cwd", cwd or "(home directory on the node)"),
            ("timeout", f"{timeout_seconds:g} s" if timeout_seconds else "none")]
    log.info("running %s on %s (%s): %s", argv[0], where, kind.value, reason)

    offload_task, kill_task = _remote_functions()
    queue = Queue(actor_options={"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}})
    started: Optional[tuple] = None  # (pid, create_time) of the command's leader
    ref = None
    finished = False
    try:
        ref = offload_task.options(**options).remote(argv, cwd, env, node_spec, queue,
                                                     timeout_seconds, grace_seconds)
        # The driver's own deadline is a safety net behind the task's: start-up + timeout + grace.
        deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds + grace_seconds + 120
        next_cancel_check = time.monotonic() + _CANCEL_POLL_SECONDS
        while True:
            try:
                item = queue.get(block=True, timeout=0.2)
            except Empty:
                item = None
            if item is not None:
                started = _handle(item, log, where, started)
                continue
            ready, _ = ray.wait([ref], timeout=0)
            if ready:
                for item in queue.get_nowait_batch(queue.qsize()):
                    started = _handle(item, log, where, started)
                result = ray.get(ref, timeout=60)
                break
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise OffloadFailed(f"no answer from {where} within the timeout; its processes were killed",
                                    TIMEOUT_EXIT_CODE)
            if now >= next_cancel_check:
                next_cancel_check = now + _CANCEL_POLL_SECONDS
                if _cancelling(run_id):
                    log.warning("run cancelled: killing the command's processes on %s", where)
                    _kill(kill_task, where, started, grace_seconds, ref, queue, log)
                    finished = True
                    _artifact(run_id, rows + [("result", "cancelled; its processes were killed")], argv)
                    return Cancelled(message=f"cancelled; the command's processes on {where} were killed")
        finished = True
        return _outcome(result, argv, where, kind, reason, boost, rows, run_id, timeout_seconds, log)
    finally:
        if ref is not None and not finished:  # interrupted, timed out or failed in the driver
            _kill(kill_task, where, started, grace_seconds, ref, queue, log)
        try:
            queue.shutdown(force=True)
        except Exception:
            pass


def _outcome(result, argv, where, kind, reason, boost, rows, run_id, timeout_seconds, log) -> Dict[str, Any]:
    """The run's return value for a finished task, or the one-line error it ends with."""
    exit_code = result.exit_code
    outcome = {"node": where, "kind": kind.value, "exit_code": exit_code, "reason": reason,
               "pid": result.pid, "timed_out": result.timed_out, "boost": boost.id if boost else None,
               "priority": {k: result.priority.get(k) for k in ("nice", "ionice", "nice_before")},
               "seconds": round(result.seconds, 3)}
    if result.kill:
        log.warning("%s", result.kill)
    if result.error:
        rows.append(("result", result.error))
        _artifact(run_id, rows, argv)
        if exit_code is None:  # refused on the node before anything started
            raise InvalidRequest(result.error)
        raise OffloadFailed(result.error, exit_code)  # never started: 126 or 127
    if result.timed_out:
        rows.append(("result", f"timed out after {timeout_seconds:g} s; its processes were killed"))
        _artifact(run_id, rows, argv)
        raise OffloadFailed(f"command timed out after {timeout_seconds:g} s on {where}; "
                            f"its processes were killed", TIMEOUT_EXIT_CODE)
    rows.append(("exit code", str(exit_code)))
    rows.append(("duration", f"{result.seconds:.1f} s"))
    _artifact(run_id, rows, argv)
    if exit_code != 0:
        code = exit_code if exit_code > 0 else 128 + (-exit_code)  # killed by signal N -> 128+N
        raise OffloadFailed(f"command exited with code {exit_code} on {where}", code)
    log.info("command exited with code 0 on %s after %.1f s", where, result.seconds)
    return outcome


def _handle(item: tuple, log, where: str, started: Optional[tuple]) -> Optional[tuple]:
    kind = item[0]
    if kind == "start":
        log.info("started pid %s (process group %s) on %s", item[1], item[2], where)
        return (item[1], item[3] if len(item) > 3 else None)
    if kind == "stdout":
        log.info("%s", item[1])
    elif kind == "stderr":
        log.info("[stderr] %s", item[1])
    elif kind == "kill":
        log.warning("%s", item[1])
    return started


def _kill(kill_task, where: str, started: Optional[tuple], grace_seconds: float, ref, queue, log) -> None:
    """End the command: interrupt its task (whose ``finally`` kills the whole process tree,
    including what it saw leave), wait for that, and kill from outside if it did not end."""
    import ray

    try:
        ray.cancel(ref, force=False)
    except Exception:
        pass
    try:
        ended = bool(ray.wait([ref], timeout=grace_seconds + 30)[0])
    except Exception:
        ended = False
    try:
        for item in queue.get_nowait_batch(queue.qsize()):
            _handle(item, log, where, started)
    except Exception:
        pass
    if started is not None and not ended:
        pid, create_time = started
        try:
            task = kill_task.options(label_selector={NODE_LABEL: where})
            what = ray.get(task.remote(pid, grace_seconds, create_time), timeout=grace_seconds + 60)
            log.warning("%s", what)
        except Exception as exc:
            log.error("could not kill the processes of pid %s on %s: %s", pid, where, exc)
    if not ended:
        try:
            ray.cancel(ref, force=True)
        except Exception:
            pass


def _cancelling(run_id: str) -> bool:
    if run_id == "local":
        return False
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run_id).state
        return bool(state and (state.is_cancelling() or state.is_cancelled()))
    except Exception:
        return False


def validate_command(command: Any) -> List[str]:
    """The command as a list of strings ``exec`` can take: a single string is refused (it
    would need a shell), and so are empty lists, non-strings and NUL bytes."""
    from grid_flows.core.offload_rules import validate_argv

    return validate_argv(command)


def _resources(cpu: Any, gpu: Any, memory: Any) -> Resources:
    from grid_flows.core.units import parse_number

    try:
        return Resources.parse(cpu=parse_number(cpu, "cpu"), gpu=parse_number(gpu, "gpu"), memory=memory)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
