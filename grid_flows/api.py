"""The Python API: request, inspect and release boosts.

Example:
    ```python
    from grid_flows import request_boost, list_boosts, release_boost

    boost = request_boost("gpu-master", cpu=2, memory="4GiB", priority="high", duration="30m")
    print(boost.source, "->", boost.target, boost.placement_group)
    print([b.id for b in list_boosts(target="gpu-master")])
    release_boost(boost.id)
    ```

A boost does not add CPUs to the target: it reserves the capacity on the source node
as a Ray placement group, and boosted tasks run there.
"""

from __future__ import annotations

import contextlib

from grid_flows.control import boosts as _boosts
from grid_flows.core.models import Boost, Priority


def request_boost(
    target: str,
    *,
    cpu: float = 0,
    gpu: float = 0,
    memory: str | int | None = None,
    priority: str | Priority = "normal",
    duration: str | float | None = None,
    source: str | None = None,
    address: str | None = None,
) -> Boost:
    """Lease ``cpu``/``gpu``/``memory`` of a lender's share to ``target``.

    ``memory`` is bytes or a size such as ``"4GiB"``; ``duration`` is seconds or a string
    such as ``"30m"`` (``None``: the cluster's default). Without ``source`` the lender with
    the most free lendable capacity that can hold the whole request is chosen (never the
    target). Raises ``InvalidRequest`` for bad input and ``NoCapacity`` when no node can
    lend it; either way nothing is left behind.
    """
    return _boosts.request(
        target, cpu=cpu, gpu=gpu, memory=memory, priority=priority, duration=duration, source=source, address=address
    )


def release_boost(boost_id: str, *, address: str | None = None) -> Boost:
    """Release a boost by id or unique id prefix; its capacity is free for others at once."""
    return _boosts.release(boost_id, address=address)


def list_boosts(target: str | None = None, include_ended: bool = False) -> list[Boost]:
    """Boosts from the durable record, newest first; only live ones unless ``include_ended``."""
    return _boosts.list_boosts(target=target, include_ended=include_ended)


_ON_UNAVAILABLE = ("wait", "run", "fail")


def _check_on_unavailable(on_unavailable: str, wait: float) -> None:
    from grid_flows.errors import InvalidRequest
    from grid_flows.core.units import check_amount

    if on_unavailable not in _ON_UNAVAILABLE:
        raise InvalidRequest(f"on_unavailable: unknown value {on_unavailable!r}; expected one of {', '.join(_ON_UNAVAILABLE)}")
    try:
        check_amount(wait, "wait")
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def _current_runner():
    from prefect.context import FlowRunContext

    from grid_flows.runner.task_runner import BoostRayTaskRunner

    ctx = FlowRunContext.get()
    runner = ctx.task_runner if ctx else None
    return runner if isinstance(runner, BoostRayTaskRunner) else None


def _request_with_policy(target, on_unavailable: str, wait: float, logger, **request_args) -> Boost | None:
    import time

    from grid_flows.errors import BoostsDisabled, NoCapacity

    deadline = time.monotonic() + (wait if on_unavailable == "wait" else 0)
    while True:
        try:
            return _boosts.request(target, **request_args)
        except BoostsDisabled as exc:  # waiting cannot help; "run" still runs (tasks may offload)
            if on_unavailable != "run":
                raise
            logger.warning("No boost: %s; running unboosted on %s", exc, target)
            return None
        except NoCapacity as exc:
            if on_unavailable == "fail":
                raise
            if on_unavailable == "run":
                logger.warning("No boost (%s); running unboosted on %s", exc, target)
                return None
            if time.monotonic() >= deadline:
                raise NoCapacity(f"{exc} (waited {wait:g} s)") from None
            logger.info("Waiting for capacity to boost %s: %s", target, exc)
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))  # capacity is polled, not pushed


@contextlib.contextmanager
def boost(
    target: str | None = None,
    *,
    cpu: float = 0,
    gpu: float = 0,
    memory: str | int | None = None,
    priority: str | Priority = "normal",
    duration: str | float | None = None,
    source: str | None = None,
    on_unavailable: str = "run",
    wait: float = 60,
):
    """Hold a boost for a block of a flow: its tasks are routed into it, and it is released after.

    Inside a flow that uses ``BoostRayTaskRunner`` the runner routes tasks into the boost
    while the block runs; at the end it stops routing, waits for the tasks running in the
    boost, and releases it (also on error). ``target`` defaults to the runner's node.
    ``on_unavailable``: "run" (default) runs unboosted with a warning, "wait" retries for
    up to ``wait`` seconds and then fails, "fail" fails at once. Yields the Boost, or None
    when running unboosted.

    Example:
        ```python
        @flow(task_runner=BoostRayTaskRunner())
        def train():
            with boost(cpu=2, duration="30m"):
                fit.map(range(8)).wait()
        ```
    """
    from prefect.logging import get_logger

    _check_on_unavailable(on_unavailable, wait)
    runner = _current_runner()
    try:
        from prefect import get_run_logger

        logger = get_run_logger()
    except Exception:
        logger = get_logger("grid_flows")
    target = target or (runner.target if runner else None)
    if not target:
        from grid_flows.errors import InvalidRequest

        raise InvalidRequest("boost(): no target given and no BoostRayTaskRunner to take it from")
    granted = _request_with_policy(
        target, on_unavailable, wait, logger,
        cpu=cpu, gpu=gpu, memory=memory, priority=priority, duration=duration, source=source, origin="flow",
    )
    if granted is None:
        yield None
        return
    if runner is None:
        logger.warning("boost %s is held, but no BoostRayTaskRunner routes tasks into it", granted.short_id)
    else:
        runner.attach_boost(granted)
    logger.info("Boost %s: %s -> %s, %s until %s UTC", granted.short_id, granted.source, granted.target,
                granted.resources.describe(), f"{granted.expires_at:%H:%M:%S}")
    try:
        yield granted
    finally:
        if runner is not None:
            # Tasks still running inside the group would be killed by its removal: let them end.
            runner.detach_boost(granted.id, timeout=granted.seconds_left())
            runner.publish_placements()  # before the flow run's final state
        _boosts.release(granted.id, reason="released when its flow block ended")
        logger.info("Released boost %s", granted.short_id)


def boosted(
    cpu: float = 0,
    gpu: float = 0,
    memory: str | int | None = None,
    *,
    priority: str | Priority = "normal",
    duration: str | float | None = None,
    target: str | None = None,
    source: str | None = None,
    on_unavailable: str = "run",
    wait: float = 60,
    strategy: str | None = None,
):
    """Decorate a ``@flow`` so that each run holds a boost and runs its tasks with it.

    The flow keeps its name, parameters, retries and other options. Each run requests
    the boost when it starts, uses ``BoostRayTaskRunner`` (the flow's own, if it already
    has one), and releases the boost in a ``finally``; the boost's expiry is the safety
    net if the process dies. The runner warms Ray workers on its node and in the boost
    (``warm_up``) unless the flow's runner sets ``warm_up=False``.

    Example:
        ```python
        @boosted(cpu=2, memory="4GiB", priority="high", duration="30m")
        @flow
        def train(epochs: int = 3): ...
        ```
    """
    import functools
    import inspect

    from prefect import Flow

    from grid_flows.runner.task_runner import BoostRayTaskRunner

    # Fail at decoration time, not in the middle of a run.
    _check_on_unavailable(on_unavailable, wait)
    _boosts.parse_request_resources(cpu, gpu, memory)
    _boosts.parse_priority(priority)

    def decorate(fl):
        if not isinstance(fl, Flow):
            raise TypeError("@boosted goes above @flow: @boosted(...) then @flow on the next line")
        runner = fl.task_runner if isinstance(fl.task_runner, BoostRayTaskRunner) else BoostRayTaskRunner(
            strategy=strategy or "local_first"
        )
        if runner.warm_up is None:  # a boosted flow warms its workers unless its runner says otherwise
            runner = runner.duplicate()
            runner.warm_up = True
        fn = fl.fn
        options = dict(target=target, cpu=cpu, gpu=gpu, memory=memory, priority=priority, duration=duration,
                       source=source, on_unavailable=on_unavailable, wait=wait)
        if inspect.iscoroutinefunction(fn):
            async def run_boosted(*args, **kwargs):
                with boost(**options):
                    return await fn(*args, **kwargs)
        else:
            def run_boosted(*args, **kwargs):
                with boost(**options):
                    return fn(*args, **kwargs)
        functools.update_wrapper(run_boosted, fn)
        new_flow = fl.with_options(task_runner=runner)
        new_flow.fn = run_boosted
        return new_flow

    return decorate
