"""What a task needs: ``requires()`` blocks, ``grid:`` task tags, or the default of 1 CPU.

Example:
    ```python
    from prefect import task
    from grid_flows import requires

    @task(tags=["grid:gpu=1", "grid:memory=2GiB"])   # stated on the task itself
    def fit(x): ...

    with requires(cpu=2):                           # stated where it is submitted
        with requires(gpu=1):                       # nested: the innermost value wins,
            fit.submit(1)                           # so this needs 2 CPU and 1 GPU
    ```
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Iterable, Iterator, Optional

from grid_flows.models import InvalidRequest, Priority, Resources
from grid_flows.units import parse_memory, parse_number

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

    def over(self, outer: "Need") -> "Need":
        """This need with gaps filled from ``outer``."""
        return Need(
            cpu=self.cpu if self.cpu is not None else outer.cpu,
            gpu=self.gpu if self.gpu is not None else outer.gpu,
            memory=self.memory if self.memory is not None else outer.memory,
            node=self.node if self.node is not None else outer.node,
            priority=self.priority if self.priority is not None else outer.priority,
        )

    def resources(self) -> Resources:
        if self.cpu is None and self.gpu is None and self.memory is None:
            return DEFAULT_NEED
        return Resources(cpu=self.cpu or 0, gpu=self.gpu or 0, memory=self.memory or 0)


_current: ContextVar[Need] = ContextVar("grid_requires", default=Need())


def _need(cpu=None, gpu=None, memory=None, node=None, priority=None, where: str = "requires()") -> Need:
    try:
        return Need(
            cpu=None if cpu is None else parse_number(cpu, "cpu"),
            gpu=None if gpu is None else parse_number(gpu, "gpu"),
            memory=None if memory is None else parse_memory(memory),
            node=node,
            priority=None if priority is None else Priority(priority),
        )
    except ValueError as exc:
        raise InvalidRequest(f"{where}: {exc}") from None


@contextlib.contextmanager
def requires(
    cpu: float | None = None,
    gpu: float | None = None,
    memory: str | int | None = None,
    *,
    node: str | None = None,
    priority: str | None = None,
) -> Iterator[Need]:
    """State the needs of tasks submitted inside the block (nested blocks: innermost wins).

    ``node`` asks for a named node (used by the ``node_specific`` strategy); ``priority``
    orders tasks in the runner's queue when capacity is short.
    """
    need = _need(cpu, gpu, memory, node, priority).over(_current.get())
    token = _current.set(need)
    try:
        yield need
    finally:
        _current.reset(token)


def from_tags(tags: Iterable[str]) -> Need:
    """Needs stated as task tags: ``grid:cpu=2``, ``grid:gpu=1``, ``grid:memory=4GiB``, ``grid:node=gpu1``."""
    values: dict[str, str] = {}
    for tag in tags:
        if not tag.startswith(TAG_PREFIX):
            continue
        key, sep, value = tag[len(TAG_PREFIX):].partition("=")
        if not sep or key not in ("cpu", "gpu", "memory", "node", "priority"):
            raise InvalidRequest(
                f"task tag '{tag}': expected grid:cpu=N, grid:gpu=N, grid:memory=SIZE, grid:node=NAME or grid:priority=P"
            )
        values[key] = value
    return _need(**values, where=f"task tags {sorted(values)}")


def current_need(tags: Iterable[str] = (), remote_options: dict | None = None) -> Need:
    """The need of a task being submitted: requires() blocks, then tags, then prefect-ray's
    ``remote_options(num_cpus=..., num_gpus=..., memory=...)``, then 1 CPU."""
    need = _current.get().over(from_tags(tags))
    if remote_options:
        need = need.over(
            Need(cpu=remote_options.get("num_cpus"), gpu=remote_options.get("num_gpus"), memory=remote_options.get("memory"))
        )
    return need


def with_default(need: Need) -> Need:
    return replace(need, priority=need.priority or Priority.normal)
