"""The ``grid-offload`` flow: run a command on the node that has room for it.

Where it runs is the scheduler's decision (:func:`grid_flows.scheduler.place`) over a
view built from the live Ray nodes: the target (the cluster's head) when it has room,
else a lender's free share (the task carries the lend tokens, so Ray itself
keeps it within the share), else (or with ``use_boost="always"``) a boost requested for
the run and released in a ``finally``. With ``node``, the placement is ``node_specific``:
the head runs it on its own free capacity, any other node only through its lendable
share (a worker's private capacity is never used, as everywhere in grid-flows), and a
boost from that node when ``use_boost`` asks for one. The decision and its reason are logged and shown
in a markdown artifact ``grid-offload-<flow-run-id>``.

The command is an argument list, never a shell string. It runs in a Ray task on the
chosen node, in its own session (process group) with an explicit working directory and
a minimal environment, under the node's resource mode (nice/ionice). Its stdout and
stderr are streamed into the run's logs line by line through a Ray queue. Exit code 0
completes the run; any other fails it with the code in the message. A timeout, a
cancellation of the run, or the driver being interrupted kills the whole process group
on the node (SIGTERM, then SIGKILL after ``grace_seconds``).

Output lines and the decision are logged at INFO by the ``prefect.flow_runs.offload``
logger, which is set to INFO even when ``PREFECT_LOGGING_LEVEL`` is higher: the
command's output is the product of this flow, not chatter.

Example:
    ```python
    from grid_flows.flows.offload import offload
    offload(command=["python", "train.py", "--epochs", "3"], cpu=2, cwd="/srv/project")
    ```
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any, Dict, List, Optional, Union

from prefect import flow, get_run_logger
from prefect.states import Cancelled

from grid_flows.models import GridError, InvalidRequest, NODE_LABEL, NoCapacity, Resources

OUTPUT_LOGGER = "prefect.flow_runs.offload"
USE_BOOST = ("auto", "always", "never")
TIMEOUT_EXIT_CODE = 124  # as coreutils' timeout(1)
_CANCEL_POLL_SECONDS = 1.0


class OffloadFailed(GridError):
    """The offloaded command ended badly; ``exit_code`` is what ``grid offload run`` exits with."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self):  # picklable with its exit code
        return (OffloadFailed, (str(self), self.exit_code))


def _output_logger():
    from prefect.logging.loggers import PrefectLogAdapter

    base = get_run_logger()
    lg = logging.getLogger(OUTPUT_LOGGER)
    if lg.getEffectiveLevel() > logging.INFO:
        lg.setLevel(logging.INFO)
    return PrefectLogAdapter(lg, extra=dict(getattr(base, "extra", {}) or {}))


def _remote_functions():
    import ray

    from grid_flows import offload as core

    @ray.remote(max_retries=0, max_calls=1)  # max_calls=1: the worker whose priority we lowered exits after
    def _offload_task(argv, cwd, env, node_spec, queue, timeout_seconds, grace_seconds):
        if cwd is None:
            cwd = os.path.expanduser("~")
        full_env = core.child_env(env, node=node_spec.name)
        return core.run_command(argv, cwd, full_env, node_spec, queue, timeout_seconds, grace_seconds)

    @ray.remote(num_cpus=0, max_retries=0)
    def _kill_task(pgid, grace_seconds):
        return core.kill_group(pgid, grace_seconds)

    return _offload_task, _kill_task


def choose(spec, nodes, resources: Resources, node: Optional[str], strategy: str):
    """The scheduler's placement for the command (pure given its inputs)."""
    from grid_flows.offload import cluster_view
    from grid_flows.scheduler import Requirement, Strategy, place

    target = spec.head.name
    if node is not None:
        spec.node(node)  # UnknownNode with the known names
        strategy = Strategy.node_specific.value
        # Another node is used through its lendable share only, never its private capacity.
    view = cluster_view(spec, nodes, target)
    return target, strategy, place(Requirement(resources, node), view, [], strategy)


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
    cpu: float = 1,
    gpu: float = 0,
    memory: Optional[Union[str, int]] = None,
    priority: str = "normal",
    timeout_seconds: Optional[float] = None,
    cwd: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    strategy: str = "local_first",
    use_boost: str = "auto",
    grace_seconds: float = 5.0,
    boost_duration: Optional[Union[str, float]] = None,
) -> Dict[str, Any]:
    """Run ``command`` (an argument list) on the best node for ``cpu``/``gpu``/``memory``.

    ``use_boost``: ``auto`` leases a boost only when neither the target nor any lender's
    free share can take the command now (a boost of ``priority`` may preempt lower ones);
    ``always`` runs every command that does not fit on the target in a boost; ``never``
    fails instead. Returns ``{"node", "kind", "exit_code", "reason", ...}``.

    An expected failure (non-zero exit, timeout, bad input, no capacity) ends the run
    Failed with a one-line message and the error (with its ``exit_code``) as the state's
    data, rather than a traceback in the logs.
    """
    import ray
    from ray.util.queue import Empty, Queue

    from grid_flows import boosts
    from grid_flows import ray_cluster as rc
    from grid_flows.guard import limits_for
    from grid_flows.scheduler import PlacementKind
    from grid_flows.store import BoostStore

    log = _output_logger()
    argv = validate_command(command)
    resources = _resources(cpu, gpu, memory)
    if use_boost not in USE_BOOST:
        raise InvalidRequest(f"use_boost: unknown value {use_boost!r}; expected one of {', '.join(USE_BOOST)}")
    if timeout_seconds is not None and not (timeout_seconds > 0):
        raise InvalidRequest(f"timeout_seconds must be greater than zero, got {timeout_seconds!r}")
    if cwd is not None and not os.path.isabs(cwd):
        raise InvalidRequest(f"cwd must be an absolute path (it is resolved on the node), got {cwd!r}")
    with BoostStore() as store:
        spec = store.load_cluster()
    rc.connect()
    target, strategy, placement = choose(spec, rc.grid_nodes(), resources, node, strategy)
    log.info("placement: %s on %s (confidence %.2f): %s", placement.kind.value, placement.node,
             placement.confidence, placement.reason)

    boost = None
    kind, where, reason = placement.kind, placement.node, placement.reason
    why_no_boosts = boosts.why_no_boosts(spec)
    wants_boost = (kind is PlacementKind.queue and use_boost == "auto" and not why_no_boosts) or (
        use_boost == "always" and kind is not PlacementKind.target  # refused with the reason when boosts are off
    )
    if wants_boost:
        source = where if kind is PlacementKind.offload else (node if node and node != target else None)
        try:
            boost = boosts.request(target, cpu=resources.cpu, gpu=resources.gpu, memory=resources.memory or None,
                                   priority=priority, duration=boost_duration, source=source, origin="offload")
        except NoCapacity as exc:
            raise NoCapacity(f"cannot run {resources.describe()} anywhere now: {placement.reason}; "
                             f"and no boost: {exc}") from None
        kind, where = PlacementKind.boost, boost.source
        reason = f"boost {boost.short_id} from {boost.source} ({boost.priority.value}); {placement.reason}"
        log.info("using boost %s: %s -> %s, %s", boost.id, boost.source, boost.target, boost.resources.describe())
    elif kind is PlacementKind.queue:
        and_no_boost = f"; and no boost, because {why_no_boosts}" if why_no_boosts else ""
        raise NoCapacity(f"cannot run {resources.describe()} anywhere now: {placement.reason}{and_no_boost}")

    node_spec = spec.node(where)
    limits = limits_for(node_spec)
    options: Dict[str, Any] = {"num_cpus": resources.cpu, "num_gpus": resources.gpu}
    if resources.memory:
        options["memory"] = resources.memory
    if kind is PlacementKind.boost:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            rc.group_handle(boost.placement_group_id), placement_group_bundle_index=0)
    else:
        options["label_selector"] = {NODE_LABEL: where}
        if kind is PlacementKind.offload:
            options["resources"] = resources.lend_tokens()  # Ray keeps it within the lender's share

    from prefect.runtime import flow_run

    run_id = str(flow_run.id or "local")
    rows = [("node", where), ("placement", kind.value), ("target", target), ("strategy", strategy),
            ("confidence", f"{placement.confidence:.2f}"), ("reason", reason),
            ("resources", resources.describe()), ("resource mode", limits.describe()),
            ("boost", boost.id if boost else "-"), ("cwd", cwd or "(home directory on the node)"),
            ("timeout", f"{timeout_seconds:g} s" if timeout_seconds else "none")]
    log.info("running %s on %s (%s): %s", argv[0], where, kind.value, reason)

    offload_task, kill_task = _remote_functions()
    queue = Queue(actor_options={"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}})
    pgid: Optional[int] = None
    ref = None
    outcome: Dict[str, Any] = {}
    finished = False
    try:
        ref = offload_task.options(**options).remote(argv, cwd, env or {}, node_spec, queue,
                                                     timeout_seconds, grace_seconds)
        # The driver's own deadline is a safety net behind the task's: start-up + timeout + grace.
        deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds + grace_seconds + 120
        next_cancel_check = time.monotonic() + _CANCEL_POLL_SECONDS
        exit_code = None
        while True:
            try:
                item = queue.get(block=True, timeout=0.2)
            except Empty:
                item = None
            if item is not None:
                pgid = _handle(item, log, where, pgid)
                continue
            ready, _ = ray.wait([ref], timeout=0)
            if ready:
                for item in queue.get_nowait_batch(queue.qsize()):
                    pgid = _handle(item, log, where, pgid)
                result = ray.get(ref, timeout=60)
                break
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise OffloadFailed(f"no answer from {where} within the timeout; process group killed",
                                    TIMEOUT_EXIT_CODE)
            if now >= next_cancel_check:
                next_cancel_check = now + _CANCEL_POLL_SECONDS
                if _cancelling(run_id):
                    log.warning("run cancelled: killing the process group on %s", where)
                    _kill(kill_task, where, pgid, grace_seconds, ref, log)
                    finished = True
                    _artifact(run_id, rows + [("result", "cancelled; process group killed")], argv)
                    return Cancelled(message=f"cancelled; the command's process group on {where} was killed")
        finished = True
        exit_code = result.exit_code
        outcome = {"node": where, "kind": kind.value, "exit_code": exit_code, "reason": reason,
                   "pid": result.pid, "timed_out": result.timed_out, "boost": boost.id if boost else None,
                   "priority": {k: result.priority.get(k) for k in ("nice", "ionice", "nice_before")},
                   "seconds": round(result.seconds, 3)}
        if result.kill:
            log.warning("%s", result.kill)
        if result.error and exit_code is None:
            rows.append(("result", result.error))
            _artifact(run_id, rows, argv)
            raise InvalidRequest(result.error)
        if result.error:
            log.error("%s", result.error)
        if result.timed_out:
            rows.append(("result", f"timed out after {timeout_seconds:g} s; process group killed"))
            _artifact(run_id, rows, argv)
            raise OffloadFailed(f"command timed out after {timeout_seconds:g} s on {where}; "
                                f"its process group was killed", TIMEOUT_EXIT_CODE)
        rows.append(("exit code", str(exit_code)))
        rows.append(("duration", f"{result.seconds:.1f} s"))
        _artifact(run_id, rows, argv)
        if exit_code != 0:
            code = exit_code if exit_code > 0 else 128 + (-exit_code)  # killed by signal N -> 128+N
            raise OffloadFailed(f"command exited with code {exit_code} on {where}", code)
        log.info("command exited with code 0 on %s after %.1f s", where, result.seconds)
        return outcome
    finally:
        if ref is not None and not finished:  # interrupted, timed out or failed in the driver
            _kill(kill_task, where, pgid, grace_seconds, ref, log)
        try:
            queue.shutdown(force=True)
        except Exception:
            pass
        if boost is not None:
            try:
                boosts.release(boost.id, reason="offloaded command ended")
            except Exception as exc:  # the boost's expiry is the safety net
                log.warning("could not release boost %s: %s", boost.id, exc)


def _handle(item: tuple, log, where: str, pgid: Optional[int]) -> Optional[int]:
    kind = item[0]
    if kind == "start":
        log.info("started pid %s (process group %s) on %s", item[1], item[2], where)
        return item[2]
    if kind == "stdout":
        log.info("%s", item[1])
    elif kind == "stderr":
        log.info("[stderr] %s", item[1])
    return pgid


def _kill(kill_task, where: str, pgid: Optional[int], grace_seconds: float, ref, log) -> None:
    import ray

    if pgid is not None:
        try:
            what = ray.get(kill_task.options(label_selector={NODE_LABEL: where}).remote(pgid, grace_seconds),
                           timeout=grace_seconds + 60)
            log.warning("%s", what)
        except Exception as exc:
            log.error("could not kill process group %s on %s: %s", pgid, where, exc)
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
    """The command as a list of strings; a single string is refused (it would need a shell)."""
    if isinstance(command, str):
        raise InvalidRequest("command must be a list of arguments, not one string (no shell is used)")
    if not isinstance(command, (list, tuple)) or not command:
        raise InvalidRequest("command: give the program and its arguments, e.g. ['python', 'train.py']")
    bad = [a for a in command if not isinstance(a, str)]
    if bad:
        raise InvalidRequest(f"command: every argument must be a string, got {bad[0]!r}")
    if not command[0]:
        raise InvalidRequest("command: the program name is empty")
    return list(command)


def _resources(cpu: Any, gpu: Any, memory: Any) -> Resources:
    from grid_flows.units import parse_number

    try:
        return Resources.parse(cpu=parse_number(cpu, "cpu"), gpu=parse_number(gpu, "gpu"), memory=memory)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
