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

from grid_flows import boosts as _boosts
from grid_flows.models import Boost, Priority


def request_boost(
    target: str,
    *,
    cpu: float = 0,
    gpu: float = 0,
    memory: str | int | None = None,
    priority: str | Priority = "normal",
    duration: str | float | None = 3600,
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
