"""A GPU probe whose load a file sets: `make e2e` makes a lender busy with it.

This machine has no NVIDIA GPU, and the e2e's Ray nodes share one host, so the CPU and
memory every node's probe reads are the same: the only per-node reading the e2e can
change is a GPU's. `scripts/e2e-real.sh` starts one lender's Ray node with this folder on
PYTHONPATH and ``GRID_GPU_PROBE=e2e_fake_gpu:FileLoadedGpu`` (the guard's documented way to
replace NVML), so that node's probe actor reads one 8 GiB GPU whose utilisation and memory
use are the percent written in the file ``GRID_E2E_GPU_LOAD_FILE`` names (0 without it).
"""

from __future__ import annotations

import os

from grid_flows.adapters.host.guard import GpuDevice

TOTAL_BYTES = 8 * 1024**3


class FileLoadedGpu:
    status = "fake GPU (make e2e)"

    def devices(self) -> list[GpuDevice]:
        try:
            with open(os.environ["GRID_E2E_GPU_LOAD_FILE"]) as fh:
                percent = min(100.0, max(0.0, float(fh.read().strip() or 0)))
        except (KeyError, OSError, ValueError):
            percent = 0.0
        return [GpuDevice(0, TOTAL_BYTES, int(TOTAL_BYTES * percent / 100), percent)]
