"""The one client of the boost controller: find or start it, call it, retry while it restarts.

``control.boosts`` sends its operations here unless the controller is switched off
(``PREFECT_INTEGRATIONS_GRID_CONTROLLER=false``) or this process is the controller.
The controller answers errors as values, so a caller sees the same ``InvalidRequest``,
``NoCapacity`` or ``BoostsDisabled`` as before, never a Ray traceback.

Example:
    ```python
    from grid_flows.control import client
    boost = client.call("request", "gpu-master", cpu=1, duration="10m")
    client.call("release", boost.id)
    ```
"""

from __future__ import annotations

import logging
import time
from typing import Any

from grid_flows.adapters.prefect.settings import RAY_NAMESPACE, GridSettings
from grid_flows.control.controller import CONTROLLER_PREFIX
from grid_flows.errors import ControllerUnavailable, GridError

logger = logging.getLogger("grid_flows.control.client")

_handles: dict[tuple[str, str], Any] = {}  # (Ray connection, cluster) -> actor handle
_actor_class = None
RETRY_PAUSE_SECONDS = 0.2
# Safe to send again after the controller died mid-call: each is idempotent there (a request
# carries its request key, an end of an ended boost returns it, a reconcile re-judges).
IDEMPOTENT = frozenset({"request", "release", "end_boost", "expire_due", "reconcile", "hold", "unhold"})


def enabled() -> bool:
    return GridSettings().controller


def controller_name(cluster: str | None = None) -> str:
    return f"{CONTROLLER_PREFIX}{cluster or GridSettings().cluster_block}"


def controller(cluster: str | None = None):
    """The cluster's controller actor, started on the head node if it is not running.

    Detached, named, using no CPU, restarted by Ray if it dies. It takes this process's
    Prefect settings (API URL and key) as its constructor argument: Ray keeps that in
    memory to restart it (see the README's security model)."""
    import ray
    from prefect.context import SettingsContext

    from grid_flows.adapters.ray import cluster as rc
    from grid_flows.control.controller import BoostController

    global _actor_class
    cluster = cluster or GridSettings().cluster_block
    key = (rc.connection_key(), cluster)
    handle = _handles.get(key)
    if handle is None:
        if _actor_class is None:
            _actor_class = ray.remote(BoostController)
        settings = SettingsContext.get().serialize()
        handle = _actor_class.options(
            name=controller_name(cluster), namespace=RAY_NAMESPACE, lifetime="detached", get_if_exists=True,
            num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=64,
            # On the head: a lender that dies must not take the controller along.
            resources={"node:__internal_head__": 0.001},
        ).remote(cluster, settings)
        _handles[key] = handle
    return handle


def call(operation: str, *args: Any, **kwargs: Any) -> Any:
    """Run ``control.boosts.<operation>`` in the controller and return its result.

    While the controller restarts (Ray restarts it; it rebuilds from the records and the
    groups), an idempotent operation is sent again until ``controller_wait_seconds`` pass."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    from prefect.settings import PREFECT_API_URL

    settings = GridSettings()
    api_url = PREFECT_API_URL.value()
    deadline = time.monotonic() + settings.controller_wait_seconds
    while True:
        handle = controller()
        try:
            status, value = ray.get(handle.call.remote(operation, args, kwargs, api_url),
                                    timeout=settings.controller_wait_seconds)
        except GetTimeoutError:
            raise ControllerUnavailable(
                f"the boost controller did not answer {operation} within {settings.controller_wait_seconds:g} s "
                "(PREFECT_INTEGRATIONS_GRID_CONTROLLER_WAIT_SECONDS); it may still complete: see `grid boost status`"
            ) from None
        except RayTaskError as exc:  # a bug, not a user error: one line here, the traceback in the log
            logger.debug("boost controller failed during %s", operation, exc_info=True)
            cause = exc.cause if exc.cause is not None else exc
            raise GridError(f"the boost controller failed during {operation}: "
                            f"{type(cause).__name__}: {cause}") from None
        except RayActorError as exc:
            _forget(handle)  # killed for good: the next attempt starts a new one (Ray-restarted: same)
            if operation not in IDEMPOTENT or time.monotonic() >= deadline:
                raise ControllerUnavailable(
                    f"the boost controller stopped during {operation} and did not come back: "
                    f"{type(exc).__name__}; see `grid boost status`") from None
            logger.info("boost controller restarting (%s); sending %s again", type(exc).__name__, operation)
            time.sleep(RETRY_PAUSE_SECONDS)  # Ray is restarting the actor: pause between attempts
            continue
        if status == "error":
            raise value
        return value


def wait_for_change(version: int | None, timeout: float) -> int:
    """Block until the controller has a change after ``version`` or ``timeout`` passes; the
    version to wait from next. ``version=None``: the current version, without waiting. With
    the controller off, just wait."""
    import ray

    from grid_flows.adapters.ray import cluster as rc

    if not enabled():
        time.sleep(timeout if version is not None else 0)  # no one to tell us: redraw on this period instead
        return version or 0
    rc.connect()
    handle = controller()
    wait = GridSettings().controller_wait_seconds
    if version is None:  # the current version, at once
        return ray.get(handle.status.remote(), timeout=wait)["version"]
    return ray.get(handle.watch.remote(version, timeout), timeout=timeout + wait)["version"]


def _forget(handle) -> None:
    for key, known in list(_handles.items()):
        if known is handle:
            del _handles[key]


def tell_cluster_changed(cluster: str | None = None) -> None:
    """After the cluster block is saved: the running controller reads it before its next decision."""
    import ray

    if not (enabled() and ray.is_initialized()):
        return  # no connection: the controller re-reads the block within SPEC_TTL_SECONDS anyway
    try:
        handle = ray.get_actor(controller_name(cluster), namespace=RAY_NAMESPACE)
        ray.get(handle.cluster_changed.remote(), timeout=10)
    except ValueError:
        return  # not running: it reads the block when it starts
    except Exception as exc:
        logger.warning("could not tell the boost controller that the cluster changed: %s", exc)
