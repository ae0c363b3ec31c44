"""The guard's host side: lower a task's priority, probe its GPUs, wait for VRAM, export the cap.

The decisions (the mode table, whether VRAM fits) are :mod:`grid_flows.core.modes`. The GPU
probe is NVML, unless ``GRID_GPU_PROBE=module:name`` in the worker's environment names
another :class:`~grid_flows.core.modes.GpuProbe` (an instance, a class or a factory), e.g. a
fake one in tests.

Example:
    ```python
    from grid_flows.core.modes import limits_for_mode
    from grid_flows.adapters.host.guard import apply_process_priority

    apply_process_priority(limits_for_mode("conservative"))  # nice 10, ionice idle
    ```
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from typing import Any, Callable

from grid_flows.core.modes import (
    IONICE_BEST_EFFORT, IONICE_IDLE, GpuDevice, GpuProbe, ModeLimits, VramDecision, _probe_status, check_vram, vram_env,
)
from grid_flows.errors import GpuProbeError, GpuUnavailable, VramCapExceeded


# --------------------------------------------------------------------------- process priority

# Linux I/O classes from the most to the least favoured: RT, BE (levels 0..7), IDLE.
_IO_CLASS_ORDER = {1: 0, 2: 1, 3: 2}  # IOPRIO_CLASS_RT, _BE, _IDLE


def _io_rank(io_class: int, level: int, nice: int) -> tuple[int, int]:
    """How unfavoured an I/O priority is (bigger = lower priority). Class NONE is
    best-effort with the level the kernel derives from the CPU nice value."""
    if io_class == 0:  # IOPRIO_CLASS_NONE
        return (1, max(0, min(7, (nice + 20) // 5)))
    order = _IO_CLASS_ORDER.get(io_class, 1)
    return (order, level if order == 1 else 0)


def _io_name(io_class: int, level: int) -> str:
    return {0: f"none ({level})", 1: f"realtime {level}", 2: f"best-effort {level}", 3: "idle"}.get(
        int(io_class), f"class {int(io_class)}"
    )


def apply_process_priority(limits: ModeLimits, pid: int | None = None) -> dict[str, Any]:
    """Lower the CPU and I/O priority of the process doing the work (default: this one).

    Priority is only ever lowered: a niceness already above the mode's stays, an I/O
    class already below the mode's stays. Nothing here raises for a platform or a
    permission that does not allow it: the reason is in ``notes``.

    Returns ``{"pid", "nice_before", "nice", "ionice_before", "ionice", "notes"}`` where
    ``nice``/``ionice`` are what this call set (None if it set nothing).
    """
    import psutil

    pid = os.getpid() if pid is None else pid
    out: dict[str, Any] = {"pid": pid, "nice_before": None, "nice": None, "ionice_before": None, "ionice": None, "notes": []}
    notes: list[str] = out["notes"]
    try:
        proc = psutil.Process(pid)
    except psutil.Error as exc:
        notes.append(f"no process {pid}: {exc}")
        return out

    current_nice: int | None = None
    try:
        current_nice = int(proc.nice())
        out["nice_before"] = current_nice
    except (psutil.Error, OSError) as exc:
        notes.append(f"cannot read nice: {exc}")
    if limits.nice is not None and current_nice is not None:
        if limits.nice > current_nice:
            try:
                proc.nice(limits.nice)
                out["nice"] = limits.nice
                current_nice = limits.nice
            except (psutil.Error, OSError, ValueError) as exc:
                notes.append(f"cannot set nice {limits.nice}: {exc}")
        else:
            notes.append(f"nice {current_nice} kept: already at or below the mode's priority (nice {limits.nice})")

    if limits.ionice_class is None:
        return out
    if not hasattr(proc, "ionice") or not hasattr(psutil, "IOPRIO_CLASS_IDLE"):
        notes.append("ionice not supported on this platform")
        return out
    try:
        io = proc.ionice()
        before_class, before_level = int(io.ioclass), int(io.value or 0)
        out["ionice_before"] = _io_name(before_class, before_level)
    except (psutil.Error, OSError, NotImplementedError) as exc:
        notes.append(f"ionice not supported here: {exc}")
        return out
    if limits.ionice_class == IONICE_IDLE:
        target_class, target_level, label = int(psutil.IOPRIO_CLASS_IDLE), 0, IONICE_IDLE
    else:
        level = 7 if limits.ionice_level is None else int(limits.ionice_level)
        target_class, target_level, label = int(psutil.IOPRIO_CLASS_BE), level, f"{IONICE_BEST_EFFORT} {level}"
    nice_for_io = current_nice if current_nice is not None else 0
    if _io_rank(target_class, target_level, nice_for_io) <= _io_rank(before_class, before_level, nice_for_io):
        notes.append(f"ionice {out['ionice_before']} kept: already at or below {label}")
        return out
    try:
        if target_class == int(psutil.IOPRIO_CLASS_IDLE):
            proc.ionice(psutil.IOPRIO_CLASS_IDLE)
        else:
            proc.ionice(psutil.IOPRIO_CLASS_BE, value=target_level)
        out["ionice"] = label
    except (psutil.Error, OSError, ValueError, NotImplementedError) as exc:
        notes.append(f"cannot set ionice {label}: {exc}")
    return out


class NvmlProbe:
    """:class:`GpuProbe` over NVML (``pynvml`` from the ``nvidia-ml-py`` package).

    No library, no driver or no device is not an error: ``devices()`` returns ``[]`` and
    ``status`` says why. Any other NVML failure raises :class:`GpuProbeError`.
    """

    def __init__(self) -> None:
        self.status = "not probed yet"

    def devices(self) -> list[GpuDevice]:
        try:
            import pynvml
        except ImportError:
            self.status = "no NVML: the nvidia-ml-py package is not installed"
            return []
        no_gpu = {
            getattr(pynvml, "NVML_ERROR_LIBRARY_NOT_FOUND", 12): "no NVIDIA driver (NVML library not found)",
            getattr(pynvml, "NVML_ERROR_DRIVER_NOT_LOADED", 9): "no NVIDIA driver loaded",
            getattr(pynvml, "NVML_ERROR_NOT_FOUND", 6): "no NVIDIA GPU found",
        }
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            value = getattr(exc, "value", None)
            if value in no_gpu:
                self.status = no_gpu[value]
                return []
            raise GpuProbeError(f"NVML could not start: {exc}") from None
        except OSError as exc:  # a broken libnvidia-ml.so
            self.status = f"no usable NVIDIA driver: {exc}"
            return []
        try:
            found: list[GpuDevice] = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
                try:
                    util: float | None = float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                except pynvml.NVMLError as exc:
                    if getattr(exc, "value", None) != pynvml.NVML_ERROR_NOT_SUPPORTED:
                        raise
                    util = None  # e.g. MIG instances
                found.append(GpuDevice(i, int(mem.total), int(mem.used), util))
            self.status = f"{len(found)} NVIDIA GPU(s)" if found else "NVIDIA driver present, no GPU"
            return found
        except pynvml.NVMLError as exc:
            raise GpuProbeError(f"NVML query failed: {exc}") from None
        finally:
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass


PROBE_ENV = "GRID_GPU_PROBE"
NEED_ENV = "GRID_VRAM_NEED_BYTES"  # the VRAM a started GPU task was admitted for (0: none checked)


def default_probe() -> GpuProbe:
    """The probe a task's guard uses: :class:`NvmlProbe`, or the one ``GRID_GPU_PROBE``
    names as ``module:name`` (an instance, a class or a zero-argument factory).

    A name that cannot be loaded, or that is not a probe, raises :class:`GpuProbeError`.
    """
    spec = os.environ.get(PROBE_ENV, "").strip()
    if not spec:
        return NvmlProbe()
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name.strip() or not attr.strip():
        raise GpuProbeError(f"{PROBE_ENV}={spec!r}: expected module:name, e.g. mypkg.gpu:probe")
    try:
        obj = getattr(importlib.import_module(module_name.strip()), attr.strip())
    except (ImportError, AttributeError) as exc:
        raise GpuProbeError(f"{PROBE_ENV}={spec!r} cannot be loaded: {exc}") from None
    if isinstance(obj, type) or (callable(obj) and not isinstance(obj, GpuProbe)):
        obj = obj()
    if not isinstance(obj, GpuProbe):
        raise GpuProbeError(f"{PROBE_ENV}={spec!r} is not a GPU probe (no devices() method): {type(obj).__name__}")
    return obj


def visible_device_indices() -> list[int] | None:
    """Physical GPU indices from ``CUDA_VISIBLE_DEVICES`` (which Ray sets for GPU tasks).

    None when the variable is unset or not a list of integers (e.g. GPU UUIDs): then
    every device the probe reports is taken as visible.
    """
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None or not raw.strip():
        return None
    try:
        return [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        return None


def admit_gpu_task(
    limits: ModeLimits,
    need_bytes: int | None,
    probe: GpuProbe,
    wait_seconds: float = 30.0,
    poll_seconds: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    device_index: int = 0,
) -> VramDecision:
    """Wait, at most ``wait_seconds``, until the task's VRAM fits under the cap.

    ``need_bytes=None``: the task stated none, the mode's default share is assumed.
    Raises :class:`VramCapExceeded` when it does not fit within the wait (at once when
    it could not fit even on an idle device), :class:`GpuUnavailable` at once when there
    is no GPU (or no such device), :class:`GpuProbeError` when NVML fails.
    """
    start = clock()
    deadline = start + max(0.0, wait_seconds)
    while True:
        decision = check_vram(limits, need_bytes, probe, device_index)
        now = clock()
        if decision.ok:
            return _with_wait(decision, now - start)
        if not decision.retryable:
            # A device that exists but is too small for the cap, or no GPU at all.
            raise (VramCapExceeded if decision.total_bytes else GpuUnavailable)(decision.reason)
        if now >= deadline:
            raise VramCapExceeded(f"{decision.reason}; still over after waiting {now - start:.1f} s")
        sleep(max(0.0, min(poll_seconds, deadline - now)))


def _with_wait(decision: VramDecision, waited: float) -> VramDecision:
    from dataclasses import replace

    return replace(decision, waited_seconds=waited)


def apply_vram_cap(limits: ModeLimits, probe: GpuProbe) -> dict[str, Any]:
    """Export the cap to this process: the :func:`vram_env` variables, and torch's
    per-process memory fraction when torch is already imported (never imported here).

    The variables only bind CUDA contexts created after this call. Returns
    ``{"env": {...}, "torch": "<what happened>"}``; ``env`` is empty when there is no GPU.
    """
    out: dict[str, Any] = {"env": {}, "torch": "torch not imported"}
    devices = probe.devices()
    if not devices:
        out["skipped"] = f"no GPU: {_probe_status(probe)}"
        return out
    by_index = {d.index: d for d in devices}
    visible = visible_device_indices()
    chosen = [by_index[i] for i in visible if i in by_index] if visible is not None else devices
    if not chosen:
        out["skipped"] = f"no visible GPU among {sorted(by_index)} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})"
        return out
    env = vram_env(limits, [d.total_bytes for d in chosen])
    os.environ.update(env)
    out["env"] = env
    if "torch" in sys.modules:
        out["torch"] = _cap_torch(limits.vram_cap)
    return out


def _cap_torch(cap: float) -> str:
    torch = sys.modules["torch"]
    try:
        cuda = torch.cuda
        if not cuda.is_available():
            return "torch has no CUDA: skipped"
        count = cuda.device_count()
        for i in range(count):
            cuda.set_per_process_memory_fraction(cap, i)
        return f"torch memory fraction {cap:g} on {count} device(s)"
    except Exception as exc:  # any torch/CUDA failure must not kill the task's start
        return f"torch cap not applied: {exc}"
