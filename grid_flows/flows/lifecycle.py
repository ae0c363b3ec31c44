"""Request, release and expire as thin Prefect flows over :mod:`grid_flows.control.boosts`.

They run the same code as the Python API and the CLI; bad parameters fail the run with
the same one-line message.

Example:
    ```python
    from grid_flows.flows.lifecycle import request_boost_flow
    request_boost_flow(target="gpu-master", cpu=2, priority="high", duration="30m")
    ```
"""

from __future__ import annotations

from typing import Annotated, Any, Optional, Union

from prefect import flow, get_run_logger
from pydantic import Field, StrictFloat, StrictInt, StrictStr

from grid_flows.control import boosts
from grid_flows.core.ledger import PENDING_TIMEOUT_SECONDS
from grid_flows.core.models import Priority


@flow(name="grid-request-boost", log_prints=False)
def request_boost_flow(
    target: str,
    cpu: Annotated[StrictFloat, Field(ge=0)] = 0,
    gpu: Annotated[StrictFloat, Field(ge=0)] = 0,
    memory: Optional[Union[StrictStr, StrictInt]] = None,
    priority: Priority = Priority.normal,
    duration: Optional[Union[StrictStr, StrictFloat]] = None,
    source: Optional[str] = None,
) -> dict[str, Any]:
    """Lease capacity of a lender to ``target``; returns the boost as a dict.

    Args:
        target: the node whose flows use the capacity.
        cpu: CPUs to borrow, e.g. 2 or 0.5.
        gpu: GPUs to borrow.
        memory: bytes, or a size such as "4GiB".
        priority: a higher priority may preempt lower ones when no lender has room.
        duration: seconds, or such as "30m"; empty: the cluster's default.
        source: the lender; empty: the one with the most room.
    """
    boost = boosts.request(
        target, cpu=cpu, gpu=gpu, memory=memory, priority=priority, duration=duration, source=source
    )
    get_run_logger().info(
        "Granted boost %s: %s -> %s, %s (tasks run on %s) until %s UTC",
        boost.id, boost.source, boost.target, boost.resources.describe(), boost.source,
        f"{boost.expires_at:%H:%M:%S}",
    )
    return boost.model_dump(mode="json")


@flow(name="grid-release-boost")
def release_boost_flow(boost_id: str) -> dict[str, Any]:
    """Release a boost by id or unique prefix."""
    boost = boosts.release(boost_id)
    get_run_logger().info("Boost %s is %s", boost.id, boost.state.value)
    return boost.model_dump(mode="json")


@flow(name="grid-expire-boosts")
def expire_boosts() -> list[str]:
    """End every boost whose time is up; returns the ids it ended.

    The boost controller ends boosts on time by itself; this scheduled run is the visible
    backstop. It asks the controller, and does the work itself if the controller cannot be
    reached. Its log says which happened."""
    logger = get_run_logger()
    ended, who = _by_the_controller_or_here(boosts.expire_due)
    for b in ended:
        logger.info("Expired boost %s (%s -> %s, %s)", b.id, b.source, b.target, b.resources.describe())
    logger.info("%s ended %d overdue boost(s)", who, len(ended))
    return [b.id for b in ended]


def _by_the_controller_or_here(operation, **kwargs):
    """``(result, who did it)``: the boost controller, or this run itself when the controller
    is switched off or cannot be reached (the same code, on the records directly)."""
    from grid_flows.control import client
    from grid_flows.errors import ControllerUnavailable

    if not client.enabled():
        with boosts.operations_here():
            return operation(**kwargs), "This flow run (the boost controller is switched off)"
    try:
        return operation(**kwargs), "The boost controller"
    except ControllerUnavailable as exc:
        get_run_logger().warning("The boost controller could not be reached (%s); doing the work here", exc)
        with boosts.operations_here():
            return operation(**kwargs), "This flow run (the boost controller could not be reached)"


@flow(name="grid-reconcile-boosts")
def reconcile_boosts(
    pending_timeout_seconds: Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)] = PENDING_TIMEOUT_SECONDS,
) -> dict[str, list[str]]:
    """Make Ray and the boost records agree (orphan groups, lost or stuck boosts). Idempotent."""
    logger = get_run_logger()
    report, who = _by_the_controller_or_here(boosts.reconcile, pending_timeout_seconds=pending_timeout_seconds)
    logger.info("%s reconciled the records with Ray:", who)
    for line in report.lines():
        logger.info(line)
    return {
        "removed_groups": report.removed_groups,
        "lost": report.lost,
        "failed": report.failed,
        "expired": report.expired,
        "restored": report.restored,
        "pruned": report.pruned,
    }


@flow(name="grid-extend-boost")
def extend_boost_flow(boost_id: str, duration: Union[StrictStr, StrictFloat]) -> dict[str, Any]:
    """Extend an active boost within the cluster's maximum boost length."""
    boost = boosts.extend(boost_id, duration)
    get_run_logger().info("Boost %s now expires at %s UTC", boost.id, f"{boost.expires_at:%H:%M:%S}")
    return boost.model_dump(mode="json")
