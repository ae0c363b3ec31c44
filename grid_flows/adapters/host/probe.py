"""Read the host this runs on: CPU, memory, swap, load (psutil) and GPU (NVML), as plain data.

Example:
    ```python
    from grid_flows.adapters.host.probe import probe_host

    probe_host()["cpu_percent"]
    ```
"""

from __future__ import annotations

from typing import Any

from grid_flows.core.metrics import NO_GPU


def probe_host(cpu_interval_seconds: float = 0.2) -> dict[str, Any]:
    """CPU/memory/swap %, load and GPU of the host this runs on, as plain data (runs on a Ray worker)."""
    import os

    import psutil

    from grid_flows.adapters.host.guard import GpuProbeError, default_probe

    data: dict[str, Any] = {
        "cpu_percent": float(psutil.cpu_percent(interval=cpu_interval_seconds)),
        "memory_percent": float(psutil.virtual_memory().percent),
        "swap_percent": float(psutil.swap_memory().percent),
        "load_1m": float(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0.0,
        "gpu_util_percent": None,
        "gpu_memory_percent": None,
        "gpu": NO_GPU,
    }
    try:
        gpu = default_probe()  # NVML, or the probe GRID_GPU_PROBE names (as the guard uses)
    except GpuProbeError as exc:
        data["gpu"] = f"{NO_GPU} ({exc})"
        return data
    try:
        devices = gpu.devices()
    except Exception as exc:  # a broken driver is a status, not a failed probe
        devices = []
        data["gpu"] = f"{NO_GPU} ({exc})"
    if devices:
        total = sum(d.total_bytes for d in devices)
        utils = [d.utilization_percent for d in devices if d.utilization_percent is not None]
        data["gpu_memory_percent"] = min(100.0, 100.0 * sum(d.used_bytes for d in devices) / total) if total else None
        data["gpu_util_percent"] = min(100.0, sum(utils) / len(utils)) if utils else None
        data["gpu"] = gpu.status
    elif data["gpu"] == NO_GPU and gpu.status and gpu.status != "not probed yet":
        data["gpu"] = f"{NO_GPU} ({gpu.status})"
    return data
