"""What a task needs: ``requires()`` blocks, ``grid:`` task tags, or the default of 1 CPU.

Example:
    ```python
    from prefect import task
    from grid_flows import requires

    @task(tags=["grid:gpu=1", "grid:memory=2GiB"])   # stated on the task itself
    def fit(x): ...

    with requires(cpu=2):                           # stated where it is submitted
        with requires(gpu=1, vram="6GiB"):          # nested: the innermost value wins,
            fit.submit(1)                           # so this needs 2 CPU, 1 GPU, 6 GiB VRAM
    ```

``vram`` is not a Ray resource: the scheduler places on CPU/GPU/memory, and the node's
guard (runner/worker.py, core/modes.py) admits the task on the worker only when its VRAM fits under the node's
cap. It is a GPU task's need only: a task that needs no GPU may not state it. A GPU task
that states none is assumed to need its node's mode default (see guard.MODE_TABLE).
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Iterable, Iterator, Optional

from grid_flows.core.models import Priority, Resources
from grid_flows.errors import InvalidRequest
from grid_flows.core.units import format_bytes, parse_memory, parse_number

TAG_PREFIX = "grid:"
DEFAULT_NEED = Resources(cpu=1)


@dataclass(frozen=True)
class Need:
    """Partly stated needs; ``None`` means "not stated here" so outer blocks and tags fill it in."""

    cpu: Optional[float] = None
    gpu: Optional[float] = None
    memory: Optional[int] = None
    node: Optional[str] = None
    priority: Optional[Priority] = None
    vram: Optional[int] = None  # bytes of GPU memory; None: the node's mode default

    def over(self, outer: "Need") -> "Need":
        """This need with gaps filled from ``outer``."""
        return Need(
            cpu=self.cpu if self.cpu is not None else outer.cpu,
            gpu=self.gpu if self.gpu is not None else outer.gpu,
            memory=self.memory if self.memory is not None else outer.memory,
            node=self.node if self.node is not None else outer.node,
            priority=self.priority if self.priority is not None else outer.priority,
            vram=self.vram if self.vram is not None else outer.vram,
        )

    def resources(self) -> Resources:
        if self.cpu is None and self.gpu is None and self.memory is None:
            return DEFAULT_NEED
        return Resources(cpu=self.cpu or 0, gpu=self.gpu or 0, memory=self.memory or 0)


_current: ContextVar[Need] = ContextVar("grid_requires", default=Need())


def _need(cpu=None, gpu=None, memory=None, node=None, priority=None, vram=None, where: str = "requires()") -> Need:
    try:
        need = Need(
            cpu=None if cpu is None else parse_number(cpu, "cpu"),
            gpu=None if gpu is None else parse_number(gpu, "gpu"),
            memory=None if memory is None else parse_memory(memory),
            node=node,
            priority=None if priority is None else Priority(priority),
            vram=None if vram is None else parse_memory(vram, "vram"),
        )
    except ValueError as exc:
        raise InvalidRequest(f"{where}: {exc}") from None
    if need.vram and need.gpu == 0:
        raise InvalidRequest(f"{where}: vram={format_bytes(need.vram)} with gpu=0: VRAM is the need of a GPU task")
    return need


def _check_vram(need: Need) -> Need:
    """A stated VRAM need belongs to a GPU task: refuse it on a task that needs no GPU."""
    if need.vram and not need.gpu:
        raise InvalidRequest(
            f"vram={format_bytes(need.vram)} is stated for a task that needs no GPU: add gpu=N "
            "(requires(gpu=1, vram=...) or the grid:gpu=1 tag), or vram=0 inside a block that needs none"
        )
    return need


@contextlib.contextmanager
def requires(
    cpu: float | None = None,
    gpu: float | None = None,
    memory: str | int | None = None,
    *,
    vram: str | int | None = None,
    node: str | None = None,
    priority: str | None = None,
) -> Iterator[Need]:
    """State the needs of tasks submitted inside the block (nested blocks: innermost wins).

    ``memory`` and ``vram`` are bytes (an int) or a size with a unit (``"8GiB"``).
    ``vram`` is the GPU memory a GPU task needs, checked against the node's VRAM cap
    when the task starts on the worker; without it a GPU task is assumed to need its
    node's mode default. ``node`` asks for a named node (used by the ``node_specific``
    strategy); ``priority`` orders tasks in the runner's queue when capacity is short.
    """
    need = _need(cpu, gpu, memory, node, priority, vram).over(_current.get())
    token = _current.set(need)
    try:
        yield need
    finally:
        _current.reset(token)


def from_tags(tags: Iterable[str]) -> Need:
    """Needs stated as task tags: ``grid:cpu=2``, ``grid:gpu=1``, ``grid:memory=4GiB``,
    ``grid:vram=8GiB``, ``grid:node=gpu1``, ``grid:priority=high``."""
    values: dict[str, str] = {}
    for tag in tags:
        if not tag.startswith(TAG_PREFIX):
            continue
        key, sep, value = tag[len(TAG_PREFIX):].partition("=")
        if not sep or key not in ("cpu", "gpu", "memory", "vram", "node", "priority"):
            raise InvalidRequest(
                f"task tag '{tag}': expected grid:cpu=N, grid:gpu=N, grid:memory=SIZE, grid:vram=SIZE, "
                "grid:node=NAME or grid:priority=P"
            )
        values[key] = value
    return _need(**values, where=f"task tags {sorted(values)}")


def current_need(tags: Iterable[str] = (), remote_options: dict | None = None) -> Need:
    """The need of a task being submitted: requires() blocks, then tags, then prefect-ray's
    ``remote_options(num_cpus=..., num_gpus=..., memory=...)``, then 1 CPU.

    Raises :class:`InvalidRequest` for a value that is not a need, and for a VRAM need on
    a task that needs no GPU."""
    need = _current.get().over(from_tags(tags))
    if remote_options:
        need = need.over(
            _need(
                cpu=remote_options.get("num_cpus"),
                gpu=remote_options.get("num_gpus"),
                memory=remote_options.get("memory"),
                where="remote_options()",
            )
        )
    return _check_vram(need)


def with_default(need: Need) -> Need:
    return replace(need, priority=need.priority or Priority.normal)
