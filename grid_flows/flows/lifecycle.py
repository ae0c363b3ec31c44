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
from grid_flows.adapters.prefect.store import BoostStore


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
    """End every active boost past its ``expires_at``; returns the ids it ended."""
    logger = get_run_logger()
    with BoostStore() as store:
        live = store.list()
        overdue = [b for b in live if b.is_overdue(boosts.utcnow())]
        if overdue:
            from grid_flows.adapters.ray.cluster import connect

            connect()
        ended = boosts.expire_overdue(store, boosts=overdue)  # each end publishes the table: only on change
    if ended:
        for b in ended:
            logger.info("Expired boost %s (%s -> %s, %s)", b.id, b.source, b.target, b.resources.describe())
    else:
        logger.info("No boost was overdue (%d live)", sum(not b.state.ended for b in live))
    return [b.id for b in ended]


@flow(name="grid-reconcile-boosts")
def reconcile_boosts(
    pending_timeout_seconds: Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)] = PENDING_TIMEOUT_SECONDS,
) -> dict[str, list[str]]:
    """Make Ray and the boost records agree (orphan groups, lost or stuck boosts). Idempotent."""
    logger = get_run_logger()
    report = boosts.reconcile(pending_timeout_seconds=pending_timeout_seconds)
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
