"""What runs in the Ray worker when a task starts there: the node's guard, then the task.

Example:
    ```python
    from grid_flows.runner.worker import guard_task

    report = guard_task(node_spec, need_gpu=1, need_memory_bytes_gpu=8 * 1024**3)
    print(report.describe())
    ```
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from prefect_ray import RayTaskRunner

from grid_flows.adapters.host.guard import (
    NEED_ENV, admit_gpu_task, apply_process_priority, apply_vram_cap, default_probe, visible_device_indices,
)
from grid_flows.adapters.ray.throttle import ThrottleSlot, throttle_gpu_start
from grid_flows.core.modes import GpuProbe, ModeLimits, VramDecision, limits_for
from grid_flows.core.models import NodeSpec
from grid_flows.adapters.prefect.settings import GridSettings
from grid_flows.adapters.prefect.task_context import worker_context


@dataclass
class GuardReport:
    node: str
    limits: ModeLimits
    priority: dict[str, Any] = field(default_factory=dict)
    vram: Optional[VramDecision] = None
    vram_cap: dict[str, Any] = field(default_factory=dict)
    throttle_wait_seconds: float = 0.0

    @property
    def nice(self) -> Optional[int]:
        return self.priority.get("nice")

    @property
    def ionice(self) -> Optional[str]:
        return self.priority.get("ionice")

    def describe(self) -> str:
        parts = [self.limits.describe()]
        if self.nice is not None or self.ionice is not None:
            parts.append(f"applied nice={self.nice} ionice={self.ionice}")
        if self.vram is not None:
            parts.append(self.vram.reason)
        if self.throttle_wait_seconds:
            parts.append(f"waited {self.throttle_wait_seconds * 1000:.0f} ms for a GPU slot")
        return "; ".join(parts)


def guard_task(
    node: NodeSpec,
    need_gpu: float,
    need_memory_bytes_gpu: int | None = None,
    probe: GpuProbe | None = None,
    *,
    wait_seconds: float = 30.0,
    throttle: Callable[[str, float], ThrottleSlot] | None = None,
) -> GuardReport:
    """Apply ``node``'s mode to the task starting in this process.

    Always lowers this process's priority as the mode says. A GPU task (``need_gpu >
    0``) then waits for its throttle slot, is admitted only when its VRAM fits under the
    cap (else :class:`VramCapExceeded` / :class:`GpuUnavailable`), and gets the cap
    exported. The slot comes first so that each admission sees the memory the task
    before it has taken, rather than many tasks passing the check together.

    ``need_memory_bytes_gpu`` is the task's stated VRAM need (the runner passes
    ``requires(vram=...)`` / ``grid:vram=``); None means none was stated and the mode's
    default share of the device is assumed. The need admitted for is exported as
    ``GRID_VRAM_NEED_BYTES``. ``probe`` defaults to :func:`default_probe`.
    """
    limits = limits_for(node)
    report = GuardReport(node=node.name, limits=limits)
    report.priority = apply_process_priority(limits)
    if need_gpu <= 0:
        return report
    probe = probe if probe is not None else default_probe()
    report.throttle_wait_seconds = (throttle or throttle_gpu_start)(node.name, limits.gpu_interval_ms).waited_seconds
    visible = visible_device_indices()
    device_index = visible[0] if visible else 0
    report.vram = admit_gpu_task(limits, need_memory_bytes_gpu, probe, wait_seconds=wait_seconds, device_index=device_index)
    os.environ[NEED_ENV] = str(report.vram.need_bytes)
    report.vram_cap = apply_vram_cap(limits, probe)
    return report


def _run_guarded_task(*upstream_refs: Any, grid_guard: Any = None, grid_warm_up: Any = None, **kwargs: Any) -> Any:
    """Runs in the Ray worker: apply the node's resource mode, then prefect-ray's task body
    under the worker's cached settings and open API client (task_context.py).

    ``grid_guard`` is (NodeSpec, GPUs needed, VRAM bytes needed or None): priority is lowered
    as the mode says, and a GPU task waits for the node's throttle and its VRAM cap before it
    starts (:func:`guard_task`). ``grid_warm_up`` (the flow's serialized settings) makes the
    call a warm-up instead (``runner.warmup``): it prepares the worker, runs no task, and
    returns the worker's pid. Through this function, so the worker also has it loaded.
    """
    if grid_warm_up is not None:
        from grid_flows.runner.warmup import prepare_worker

        return prepare_worker(grid_warm_up)
    if grid_guard is not None:
        node, need_gpu, need_vram = grid_guard
        wait = GridSettings().vram_wait_seconds if need_gpu > 0 else 0.0
        guard_task(node, need_gpu, need_vram, wait_seconds=wait)
    context = kwargs.get("context") or {}
    if not context.get("settings_context"):
        return RayTaskRunner._run_prefect_task(*upstream_refs, **kwargs)
    # Prefect would rebuild the settings model and two clients for every task; enter the
    # worker's cached ones, and hydrated_context, finding no settings in the context, keeps them.
    with worker_context(context["settings_context"]):
        return RayTaskRunner._run_prefect_task(*upstream_refs, **{**kwargs, "context": {**context,
                                                                                         "settings_context": {}}})
