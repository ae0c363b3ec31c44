"""The GPU start throttle: one detached actor per node hands out start slots an interval apart.

Example:
    ```python
    from grid_flows.adapters.ray.throttle import throttle_gpu_start

    slot = throttle_gpu_start("gpu1", interval_ms=50)  # sleeps until this task's slot
    ```
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, NamedTuple

from grid_flows.adapters.prefect.settings import RAY_NAMESPACE
from grid_flows.adapters.ray.cluster import NODE_LABEL
from grid_flows.errors import ThrottleError

THROTTLE_ACTOR_PREFIX = "grid-gpu-throttle-"


class GpuThrottle:
    """The body of a node's throttle actor: hands out GPU start slots.

    ``reserve`` is one step with no lock to drop: Ray runs an actor's calls one at a
    time (``max_concurrency=1``), so two tasks can never be given slots closer than the
    interval. The caller sleeps until its slot holding nothing.

    >>> t = GpuThrottle(clock=lambda: 100.0)
    >>> [t.reserve(0.05) for _ in range(3)]
    [100.0, 100.05, 100.1]
    >>> t.starts()
    3
    """

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock or time.time
        self._next_start = 0.0
        self._starts = 0

    def reserve(self, interval_s: float) -> float:
        start = max(self._clock(), self._next_start)
        self._next_start = start + max(0.0, float(interval_s))
        self._starts += 1
        return start

    def starts(self) -> int:
        return self._starts

    def next_start(self) -> float:
        return self._next_start


def throttle_actor_name(node: str, key: str | None = None) -> str:
    return f"{THROTTLE_ACTOR_PREFIX}{node}" + (f"-{key}" if key else "")


_handles: dict[str, Any] = {}
_handles_lock = threading.Lock()
_actor_class: Any = None


def _ensure_ray():
    import ray

    if not ray.is_initialized():
        from grid_flows.adapters.ray.cluster import connect

        connect()
    return ray


def throttle_actor(node: str, *, key: str | None = None):
    """The node's throttle actor, created on first use: named, detached, in the grid
    namespace, using no CPU, pinned to the node by its ``grid.node`` label so its wall
    clock is the one the node's tasks read. Handles are cached per Ray job."""
    global _actor_class
    ray = _ensure_ray()
    name = throttle_actor_name(node, key)
    from grid_flows.adapters.ray.cluster import connection_key

    cache_key = f"{connection_key()}/{name}"
    with _handles_lock:
        handle = _handles.get(cache_key)
        if handle is not None:
            return handle
        if _actor_class is None:
            _actor_class = ray.remote(GpuThrottle)
        handle = _actor_class.options(
            name=name,
            namespace=RAY_NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_concurrency=1,
            label_selector={NODE_LABEL: node},
        ).remote()
        _handles[cache_key] = handle
        return handle


def _forget(name: str) -> None:
    with _handles_lock:
        for cache_key in [k for k in _handles if k.endswith("/" + name)]:
            del _handles[cache_key]


def _call_throttle(node: str, key: str | None, method: str, *args: Any, timeout_seconds: float = 30.0) -> Any:
    ray = _ensure_ray()
    from ray.exceptions import GetTimeoutError, RayActorError

    for attempt in (1, 2):
        handle = throttle_actor(node, key=key)
        try:
            return ray.get(getattr(handle, method).remote(*args), timeout=timeout_seconds)
        except RayActorError:
            _forget(throttle_actor_name(node, key))  # killed or lost with its node: make a new one, once
            if attempt == 2:
                raise ThrottleError(f"GPU throttle actor of node '{node}' died twice") from None
        except GetTimeoutError:
            raise ThrottleError(
                f"GPU throttle actor of node '{node}' did not answer in {timeout_seconds:g} s "
                f"(is a node labelled {NODE_LABEL}={node} alive?)"
            ) from None
    raise AssertionError("unreachable")


class ThrottleSlot(NamedTuple):
    """A GPU start slot: when the task may start (``time.time()`` on the node) and how
    long the caller slept for it."""

    start: float
    waited_seconds: float


def throttle_gpu_start(
    node: str,
    interval_ms: float,
    *,
    key: str | None = None,
    timeout_seconds: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.time,
) -> ThrottleSlot:
    """Wait for this GPU task's start slot on ``node``; return the slot.

    Slots are at least ``interval_ms`` apart across every process on the node (the
    node's throttle actor hands them out one call at a time); the caller then sleeps
    until its slot holding nothing. An interval of 0 returns at once and creates no
    actor. ``key`` names a separate throttle on the same node (tests use it for a fresh
    counter).
    """
    if interval_ms <= 0:
        return ThrottleSlot(clock(), 0.0)
    start = _call_throttle(node, key, "reserve", interval_ms / 1000.0, timeout_seconds=timeout_seconds)
    delay = start - clock()
    if delay > 0:
        sleep(delay)
        # time.sleep may wake a hair early on some platforms: never start before the slot.
        while clock() < start:
            sleep(max(0.0, start - clock()))
    return ThrottleSlot(start, max(0.0, delay))


def throttle_starts(node: str, *, key: str | None = None, timeout_seconds: float = 30.0) -> int:
    """How many GPU starts the node's throttle has handed out."""
    return int(_call_throttle(node, key, "starts", timeout_seconds=timeout_seconds))


def kill_throttle(node: str, *, key: str | None = None) -> bool:
    """Kill the node's throttle actor (it is detached); False when there was none."""
    ray = _ensure_ray()
    name = throttle_actor_name(node, key)
    _forget(name)
    try:
        handle = ray.get_actor(name, namespace=RAY_NAMESPACE)
    except ValueError:
        return False
    ray.kill(handle, no_restart=True)
    return True
