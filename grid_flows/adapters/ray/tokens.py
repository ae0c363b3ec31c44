"""Lend tokens: a lender's share as custom Ray resources, so Ray itself refuses to lend past it.

A lender declares its share at start (``grid node ray-args``); every boost bundle and
every task offloaded within a share carries the matching amount (docs/architecture.md,
"Lend tokens"). Ray wants whole numbers at node start, so CPU and GPU are counted in
thousandths and memory in MiB, always rounded up.

Example:
    >>> from grid_flows.core.models import Resources
    >>> lend_tokens(Resources(cpu=2, memory=4 * 1024**3))
    {'grid.lend.CPU_milli': 2000.0, 'grid.lend.memory_MiB': 4096.0}
    >>> bundle(Resources(cpu=0.5))
    {'CPU': 0.5, 'grid.lend.CPU_milli': 500.0}
"""

from __future__ import annotations

import math

from grid_flows.core.models import NodeSpec, Resources

LEND_CPU = "grid.lend.CPU_milli"
LEND_GPU = "grid.lend.GPU_milli"
LEND_MEMORY = "grid.lend.memory_MiB"
_MIB = 1024**2


def lend_tokens(resources: Resources) -> dict[str, float]:
    """The lend-token amounts a boost bundle (or an offloaded task) holding ``resources`` must carry."""
    tokens = {
        LEND_CPU: math.ceil(round(resources.cpu * 1000, 6)),
        LEND_GPU: math.ceil(round(resources.gpu * 1000, 6)),
        LEND_MEMORY: math.ceil(resources.memory / _MIB),
    }
    return {k: float(v) for k, v in tokens.items() if v}


def bundle(resources: Resources) -> dict[str, float]:
    """A Ray placement-group bundle: the raw resources plus the matching lend tokens."""
    raw = {"CPU": resources.cpu, "GPU": resources.gpu, "memory": float(resources.memory)}
    return {**{k: v for k, v in raw.items() if v}, **lend_tokens(resources)}


def from_lend_tokens(tokens: dict[str, float]) -> Resources:
    """The resources that ``tokens`` stand for (Ray's view of a node's share, total or free)."""
    return Resources(
        cpu=tokens.get(LEND_CPU, 0) / 1000,
        gpu=tokens.get(LEND_GPU, 0) / 1000,
        memory=int(tokens.get(LEND_MEMORY, 0)) * _MIB,
    )


def node_tokens(node: NodeSpec) -> dict[str, float]:
    """Custom resources ``node`` declares at start: its lendable share as lend tokens."""
    return lend_tokens(node.share)
