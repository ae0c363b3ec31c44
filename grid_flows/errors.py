"""Every error grid-flows raises on purpose, in one place; the CLI maps them to exit codes.

Example:
    ```python
    from grid_flows.errors import NoCapacity

    try:
        request_boost("gpu-master", gpu=1)
    except NoCapacity as exc:
        print(f"try later: {exc}")
    ```

The exit codes live in :mod:`grid_flows.cli.app` (``EXIT_CODES``), not here: the core
and the adapters say what went wrong, the command line decides how a shell sees it.
"""

from __future__ import annotations


class GridError(Exception):
    """Base of the errors grid-flows raises on purpose; the CLI prints them in one line."""


class InvalidRequest(GridError, ValueError):
    """The user's input is wrong; nothing was changed."""


class UnknownNode(InvalidRequest):
    """A node name the cluster definition does not have."""


class UnknownBoost(InvalidRequest):
    """A boost id (or prefix) that matches no record."""


class ForeignBoost(UnknownBoost):
    """A boost whose record belongs to another cluster (another GridCluster block name)."""


class BoostsDisabled(InvalidRequest):
    """The cluster's sharing settings grant no boosts (sharing disabled, or mode offload_only)."""


class InvalidClusterFile(InvalidRequest):
    """The cluster file cannot be read or does not describe a valid cluster."""


class IllegalTransition(GridError):
    """An event the boost's state does not allow, e.g. granting a released boost."""


class InvariantViolation(GridError, AssertionError):
    """The ledger reached a state that must never happen (a bug, not bad input)."""


class NoCapacity(GridError):
    """No node can lend what was asked for right now."""


class ClusterNotConfigured(GridError):
    """No GridCluster block has been saved yet (``grid cluster apply`` makes one)."""


class RayUnavailable(GridError):
    """The Ray cluster could not be reached."""


class LedgerBusy(GridError):
    """The ledger lock stayed taken for longer than the caller would wait."""


class ControllerUnavailable(GridError):
    """The cluster's boost controller did not answer in time, or did not come back after a restart."""


class GpuProbeError(GridError):
    """The GPU probe failed for a reason other than "there is no NVIDIA GPU here"."""


class GpuUnavailable(GridError):
    """A task needs GPU memory on a node (or device) that has no GPU to give."""


class VramCapExceeded(GridError):
    """GPU memory stayed above the node's VRAM cap for the whole admission wait."""


class ThrottleError(GridError):
    """The node's GPU throttle actor could not be reached."""


class OffloadFailed(GridError):
    """The offloaded command ended badly; ``code`` is how it ended, as a shell reports it
    (its exit status, 128+N when killed by signal N, 124 on timeout, 126/127 when it never started)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code

    def __reduce__(self):  # picklable with its code
        return (OffloadFailed, (str(self), self.code))
