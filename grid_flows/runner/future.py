"""GridFuture: a Prefect future for a task that may still wait in the runner's queue.

A task the runner could not place yet has no Ray object; its future waits for the
dispatch, then behaves as prefect-ray's. When the task's node or placement group goes
away, ``wait``/``result`` wait for the runner to run it again elsewhere instead of
reporting a crash.

Example:
    ```python
    future = square.submit(3)       # a GridFuture under BoostRayTaskRunner
    future.result(timeout=60)
    ```
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional
from uuid import UUID

from prefect.states import State, exception_to_crashed_state
from prefect.utilities.asyncutils import run_coro_as_sync
from prefect.utilities.collections import visit_collection
from prefect_ray.task_runners import PrefectRayFuture

from grid_flows.core.placement import Placement


class GridFuture(PrefectRayFuture):
    """A future for a task that may still wait in the runner's queue (no Ray object yet)."""

    def __init__(self, task_run_id: UUID):
        super().__init__(task_run_id=task_run_id, wrapped_future=None)
        self._dispatched = threading.Event()
        self._early_callbacks: list[Callable] = []
        self._callback_lock = threading.Lock()
        self._finished = threading.Event()
        self.placement: Optional[Placement] = None
        self.dispatched_at: Optional[float] = None  # wall-clock time of the latest dispatch

    def _set_ref(self, ref: Any, placement: Placement) -> None:
        self.placement = placement
        self.dispatched_at = time.time()
        with self._callback_lock:
            self._wrapped_future = ref
            self._dispatched.set()
            callbacks, self._early_callbacks = self._early_callbacks, []
        for fn in callbacks:
            super().add_done_callback(fn)

    @property
    def dispatched(self) -> bool:
        return self._dispatched.is_set()

    @property
    def finished(self) -> bool:
        """True once the runner saw the task's last attempt end (it will not be re-run)."""
        return self._finished.is_set()

    def _retried(self, ref: Any, deadline: float | None) -> bool:
        """After ``ref`` failed: wait for the runner to re-run the task elsewhere (True) or give up."""
        while not self._finished.is_set() and self._wrapped_future is ref:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            self._finished.wait(0.05)
        return self._wrapped_future is not ref

    def wait(self, timeout: float | None = None) -> None:
        import ray

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if not self._dispatched.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
                return
            ref = self._wrapped_future
            try:
                result = ray.get(ref, timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                return
            except Exception as exc:
                if (is_lost_with_node(exc) or is_cancelled(exc)) and self._retried(ref, deadline):
                    continue
                result = run_coro_as_sync(exception_to_crashed_state(exc))
            if isinstance(result, State):
                self._final_state = result
            return

    def result(self, timeout: float | None = None, raise_on_failure: bool = True) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if not self._dispatched.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"Task run {self.task_run_id} is still queued after {timeout} seconds")
            ref = self._wrapped_future
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return super().result(timeout=remaining, raise_on_failure=raise_on_failure)
            except Exception as exc:
                if (is_lost_with_node(exc) or is_cancelled(exc)) and self._retried(ref, deadline):
                    self._final_state = None
                    continue
                raise

    def add_done_callback(self, fn: Callable) -> None:
        with self._callback_lock:
            if not self._dispatched.is_set():
                self._early_callbacks.append(fn)
                return
        super().add_done_callback(fn)

    def __reduce__(self):
        # Only dispatched futures cross into Ray workers (a task waits for its upstream's
        # dispatch), and there a plain PrefectRayFuture is all that is needed.
        return (PrefectRayFuture, (self.task_run_id, self.wrapped_future))


def is_lost_with_node(error: Any) -> bool:
    """Errors that mean the task's node or placement group went away, not that the task failed."""
    import ray.exceptions as rex

    if isinstance(
        error,
        (rex.NodeDiedError, rex.LocalRayletDiedError, rex.WorkerCrashedError, rex.TaskPlacementGroupRemoved,
         rex.ObjectLostError),
    ):
        return True
    # A worker killed while its group is removed may die with SystemExit inside the task,
    # which then surfaces wrapped (e.g. in a pydantic serialization error). The cost of
    # also catching a task's own sys.exit() is one re-run.
    return isinstance(error, rex.RayTaskError) and "SystemExit" in str(error)


def is_cancelled(error: Any) -> bool:
    import ray.exceptions as rex

    return isinstance(error, rex.TaskCancelledError)


def _futures_in(parameters: dict[str, Any]) -> list[GridFuture]:
    found: list[GridFuture] = []

    def collect(expr: Any) -> Any:
        if isinstance(expr, GridFuture):
            found.append(expr)
        return expr

    visit_collection(parameters, visit_fn=collect, return_data=False)
    return found
