"""Resource modes as numbers, and whether a GPU task's VRAM fits under its node's cap (pure).

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

This module decides; :mod:`grid_flows.adapters.host.guard` applies the decision to the
process (priority, the NVML probe, the cap), :mod:`grid_flows.adapters.ray.throttle`
spaces GPU starts, and :func:`grid_flows.runner.worker.guard_task` is the one call a task
makes when it starts on a node.

Example:
    >>> limits = limits_for_mode("default")
    >>> (limits.vram_cap, limits.gpu_interval_ms, limits.nice, limits.ionice_class, limits.ionice_level)
    (0.7, 50.0, 5, 'best-effort', 7)
    >>> vram_env(limits, 8 * 1024**3)["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"]
    '0=5734M'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence, Union, runtime_checkable

from grid_flows.core.models import ModeOverrides, NodeSpec, ResourceMode
from grid_flows.core.units import format_bytes

_MIB = 1024**2
IONICE_IDLE = "idle"
IONICE_BEST_EFFORT = "best-effort"


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


# --------------------------------------------------------------------------- GPU probe


@dataclass(frozen=True)
class GpuDevice:
    index: int
    total_bytes: int
    used_bytes: int
    utilization_percent: Optional[float] = None


@runtime_checkable
class GpuProbe(Protocol):
    """What the guard needs to know about a node's GPUs (NVML-shaped).

    ``devices()`` returns an empty list when the node has no usable GPU and raises
    :class:`GpuProbeError` when it cannot tell. A probe may have a ``status`` string.
    """

    def devices(self) -> list[GpuDevice]: ...


def _probe_status(probe: GpuProbe) -> str:
    return str(getattr(probe, "status", "") or "no GPU reported")



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
