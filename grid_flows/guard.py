"""Worker-side limits applied where a task runs: VRAM cap, GPU start throttle, nice/ionice.

A worker lends part of a machine that is often someone's desktop. Its resource mode
(``NodeSpec.mode``, with per-node ``mode_overrides``) says how hard borrowed work may
lean on it:

=============  ========  ===============  ======================  ==================================
mode           VRAM cap  default VRAM     GPU task min interval   process priority
                         need (unstated)
=============  ========  ===============  ======================  ==================================
conservative   50 %      25 % of device   100 ms                  nice 10, ionice idle
default        70 %      20 % of device   50 ms                   nice 5, ionice best-effort 7
aggressive     95 %      10 % of device   0 (no throttle)         unchanged
=============  ========  ===============  ======================  ==================================

A GPU task is admitted when ``used + need <= cap * total`` on its device. Its need is
what it states (``requires(gpu=1, vram="8GiB")`` or the ``grid:vram=8GiB`` tag, passed
by the runner); a GPU task that states none is assumed to need the mode's default share
of the device (never more than the cap), so an unstated task starts on a conservative
node only while its GPU is at most 25 % used, 50 % on default, 85 % on aggressive. The
more a lender protects its owner, the larger the guess, so a wrong guess errs on the
owner's side. ``vram=0`` means "needs none": not checked.

:func:`guard_task` is the one call a task makes when it starts on a node. The pure
parts (the table, VRAM decisions, the throttle's reservation arithmetic) import neither
Ray nor NVML; Ray is imported only inside the throttle functions. The GPU probe is NVML,
unless ``GRID_GPU_PROBE=module:name`` in the worker's environment names another
:class:`GpuProbe` (an instance, a class or a factory), e.g. a fake one in tests.

Example:
    >>> limits = limits_for_mode("default")
    >>> (limits.vram_cap, limits.gpu_interval_ms, limits.nice, limits.ionice_class, limits.ionice_level)
    (0.7, 50.0, 5, 'best-effort', 7)
    >>> vram_env(limits, 8 * 1024**3)["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"]
    '0=5734M'
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional, Protocol, Sequence, Union, runtime_checkable

from grid_flows.models import NODE_LABEL, GridError, ModeOverrides, NodeSpec, ResourceMode
from grid_flows.settings import RAY_NAMESPACE
from grid_flows.units import format_bytes

_MIB = 1024**2
THROTTLE_ACTOR_PREFIX = "grid-gpu-throttle-"
IONICE_IDLE = "idle"
IONICE_BEST_EFFORT = "best-effort"


# --------------------------------------------------------------------------- errors


class GpuProbeError(GridError):
    """The GPU probe failed for a reason other than "there is no NVIDIA GPU here"."""


class GpuUnavailable(GridError):
    """A task needs GPU memory on a node (or device) that has no GPU to give."""

    exit_code = 3


class VramCapExceeded(GridError):
    """GPU memory stayed above the node's VRAM cap for the whole admission wait."""

    exit_code = 3


class ThrottleError(GridError):
    """The node's GPU throttle actor could not be reached."""


# --------------------------------------------------------------------------- mode table


@dataclass(frozen=True)
class ModeLimits:
    """The numbers of one node's resource mode, after its overrides.

    ``nice``/``ionice_class`` None mean "leave the process as it is". ``ionice_level``
    is only meaningful for ``best-effort`` (0 highest .. 7 lowest).
    """

    mode: ResourceMode
    vram_cap: float
    gpu_interval_ms: float
    nice: Optional[int]
    ionice_class: Optional[str]
    ionice_level: Optional[int]
    node: Optional[str] = None
    default_vram_share: float = 0.0  # assumed need of a GPU task that states none, as a share of its device

    @property
    def gpu_interval_seconds(self) -> float:
        return self.gpu_interval_ms / 1000.0

    def describe(self) -> str:
        prio = "normal priority"
        if self.nice is not None or self.ionice_class is not None:
            parts = []
            if self.nice is not None:
                parts.append(f"nice {self.nice}")
            if self.ionice_class == IONICE_IDLE:
                parts.append("ionice idle")
            elif self.ionice_class == IONICE_BEST_EFFORT:
                parts.append(f"ionice best-effort {self.ionice_level}")
            prio = ", ".join(parts)
        throttle = f"{self.gpu_interval_ms:g} ms between GPU starts" if self.gpu_interval_ms > 0 else "no GPU throttle"
        return f"{self.mode.value}: VRAM cap {self.vram_cap:.0%}, {throttle}, {prio}"


MODE_TABLE: dict[ResourceMode, ModeLimits] = {
    ResourceMode.conservative: ModeLimits(ResourceMode.conservative, 0.50, 100.0, 10, IONICE_IDLE, None,
                                          default_vram_share=0.25),
    ResourceMode.default: ModeLimits(ResourceMode.default, 0.70, 50.0, 5, IONICE_BEST_EFFORT, 7,
                                     default_vram_share=0.20),
    ResourceMode.aggressive: ModeLimits(ResourceMode.aggressive, 0.95, 0.0, None, None, None,
                                        default_vram_share=0.10),
}


def limits_for_mode(
    mode: ResourceMode | str,
    overrides: ModeOverrides | None = None,
    *,
    node: str | None = None,
) -> ModeLimits:
    """The mode's row of the table with any override applied.

    Overrides: ``ionice_class: normal`` means "do not touch I/O priority"; an
    ``ionice_level`` on a mode without an I/O class means best-effort at that level;
    ``idle`` has no level.
    """
    mode = ResourceMode(mode)
    base = MODE_TABLE[mode]
    o = overrides or ModeOverrides()
    vram_cap = base.vram_cap if o.vram_cap is None else float(o.vram_cap)
    interval = base.gpu_interval_ms if o.gpu_interval_ms is None else float(o.gpu_interval_ms)
    nice = base.nice if o.nice is None else int(o.nice)

    io_class, io_level = base.ionice_class, base.ionice_level
    if o.ionice_class is not None:
        io_class = None if o.ionice_class == "normal" else o.ionice_class
        io_level = None
    if o.ionice_level is not None:
        if io_class is None and o.ionice_class != "normal":
            io_class = IONICE_BEST_EFFORT
        io_level = int(o.ionice_level)
    if io_class == IONICE_BEST_EFFORT and io_level is None:
        io_level = 7  # the lowest best-effort level: the lender's own I/O goes first
    if io_class != IONICE_BEST_EFFORT:
        io_level = None
    # A cap lowered below the default share must not make every unstated task unfittable.
    share = min(base.default_vram_share, vram_cap)
    return ModeLimits(mode, vram_cap, interval, nice, io_class, io_level, node, default_vram_share=share)


def limits_for(node: NodeSpec) -> ModeLimits:
    """The limits a task running on ``node`` must respect."""
    return limits_for_mode(node.mode, node.mode_overrides, node=node.name)


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


# --------------------------------------------------------------------------- GPU probe


@dataclass(frozen=True)
class GpuDevice:
    index: int
    total_bytes: int
    used_bytes: int
    utilization_percent: Optional[float] = None

    @property
    def free_bytes(self) -> int:
        return max(0, self.total_bytes - self.used_bytes)


@runtime_checkable
class GpuProbe(Protocol):
    """What the guard needs to know about a node's GPUs (NVML-shaped).

    ``devices()`` returns an empty list when the node has no usable GPU and raises
    :class:`GpuProbeError` when it cannot tell. A probe may have a ``status`` string.
    """

    def devices(self) -> list[GpuDevice]: ...


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


def _probe_status(probe: GpuProbe) -> str:
    return str(getattr(probe, "status", "") or "no GPU reported")


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


# --------------------------------------------------------------------------- VRAM admission


@dataclass(frozen=True)
class VramDecision:
    ok: bool
    reason: str
    device_index: Optional[int] = None
    used_bytes: int = 0
    need_bytes: int = 0
    cap_bytes: int = 0
    total_bytes: int = 0
    retryable: bool = True
    waited_seconds: float = 0.0


def _where(limits: ModeLimits, index: int) -> str:
    return f"node '{limits.node}' GPU {index}" if limits.node else f"GPU {index}"


def check_vram(limits: ModeLimits, need_bytes: int | None, probe: GpuProbe, device_index: int = 0) -> VramDecision:
    """May a task that needs ``need_bytes`` of GPU memory start now? (one probe, no wait)

    OK when ``used + need <= cap * total`` on the device. ``need_bytes=None`` (the task
    stated no VRAM) is the mode's ``default_vram_share`` of the device; when the probe
    sees no GPU there is then nothing to check it against, and the task is let through.
    A task that needs nothing (0) is always OK (the probe is not asked). No GPU for a
    stated need, and a need above the cap even on an idle device, are decisions that
    waiting cannot change (``retryable=False``). A failing probe raises
    :class:`GpuProbeError`.
    """
    stated = need_bytes is not None
    if stated:
        need_bytes = int(need_bytes)
        if need_bytes < 0:
            raise ValueError(f"need_bytes must be >= 0, got {need_bytes}")
        if need_bytes == 0:
            return VramDecision(True, "no GPU memory needed", device_index=device_index)
    devices = probe.devices()
    if not devices and not stated:
        where = f"node '{limits.node}'" if limits.node else "this node"
        return VramDecision(
            True,
            f"no VRAM stated and {where} shows no GPU to check ({_probe_status(probe)}): not checked",
            device_index=device_index,
        )
    if not devices:
        where = f"node '{limits.node}'" if limits.node else "this node"
        return VramDecision(
            False,
            f"{where} has no GPU to give {format_bytes(need_bytes)} of VRAM ({_probe_status(probe)})",
            device_index=device_index,
            need_bytes=need_bytes,
            retryable=False,
        )
    device = next((d for d in devices if d.index == device_index), None)
    if device is None:
        known = ", ".join(str(d.index) for d in devices)
        return VramDecision(
            False,
            f"{_where(limits, device_index)} does not exist (GPUs: {known})",
            device_index=device_index,
            need_bytes=need_bytes or 0,
            retryable=False,
        )
    cap_bytes = int(math.floor(limits.vram_cap * device.total_bytes))
    cap = (f"the {limits.mode.value} cap of {limits.vram_cap:.0%} of {format_bytes(device.total_bytes)} "
           f"({format_bytes(cap_bytes)})")
    if stated:
        needed = f"{format_bytes(need_bytes)} needed"
    else:
        need_bytes = int(math.floor(limits.default_vram_share * device.total_bytes))
        needed = (f"{format_bytes(need_bytes)} assumed needed (no VRAM stated: the {limits.mode.value} default "
                  f"of {limits.default_vram_share:.0%} of the device)")
    if need_bytes > cap_bytes:
        return VramDecision(
            False,
            f"{_where(limits, device_index)}: {needed} is more than {cap} even with the GPU idle",
            device_index=device_index,
            used_bytes=device.used_bytes,
            need_bytes=need_bytes,
            cap_bytes=cap_bytes,
            total_bytes=device.total_bytes,
            retryable=False,
        )
    ok = device.used_bytes + need_bytes <= cap_bytes
    verb = "fits in" if ok else "is over"
    reason = f"{_where(limits, device_index)}: {format_bytes(device.used_bytes)} used + {needed} {verb} {cap}"
    return VramDecision(
        ok,
        reason,
        device_index=device_index,
        used_bytes=device.used_bytes,
        need_bytes=need_bytes,
        cap_bytes=cap_bytes,
        total_bytes=device.total_bytes,
    )


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


# --------------------------------------------------------------------------- VRAM cap export


def vram_env(limits: ModeLimits, total_bytes: Union[int, Sequence[int]]) -> dict[str, str]:
    """Environment that tells the task its VRAM cap.

    ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` in the MPS format ``<device>=<MiB>M`` (device
    indices as the task's CUDA sees them, comma-separated for several), enforced by the
    CUDA driver when the node runs an MPS server; ``GRID_VRAM_CAP`` (the fraction) and
    ``GRID_VRAM_LIMIT_BYTES`` (of the first device) for task code that wants to size
    itself.
    """
    totals = [int(total_bytes)] if isinstance(total_bytes, (int, float)) else [int(t) for t in total_bytes]
    limits_mib = [int(limits.vram_cap * total) // _MIB for total in totals]
    env = {
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": ",".join(f"{i}={mib}M" for i, mib in enumerate(limits_mib)),
        "GRID_VRAM_CAP": f"{limits.vram_cap:g}",
    }
    if totals:
        env["GRID_VRAM_LIMIT_BYTES"] = str(int(math.floor(limits.vram_cap * totals[0])))
    return env


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


# --------------------------------------------------------------------------- GPU start throttle


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
        from grid_flows.ray_cluster import connect

        connect()
    return ray


def throttle_actor(node: str, *, key: str | None = None):
    """The node's throttle actor, created on first use: named, detached, in the grid
    namespace, using no CPU, pinned to the node by its ``grid.node`` label so its wall
    clock is the one the node's tasks read. Handles are cached per Ray job."""
    global _actor_class
    ray = _ensure_ray()
    name = throttle_actor_name(node, key)
    from grid_flows.ray_cluster import connection_key

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


# --------------------------------------------------------------------------- entry point


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
