"""Read ``blocks/cluster.yaml`` into a validated :class:`~grid_flows.models.ClusterSpec`.

Every problem is reported on its own line and names the field, e.g.
``nodes[1].resource_sharing.max_share_cpu: must be >= 0, got -2``.

Example:
    >>> spec = load_cluster_file("blocks/cluster.yaml")   # doctest: +SKIP
    >>> [n.name for n in spec.nodes]                        # doctest: +SKIP
    ['gpu-master', 'gpu1', 'gpu2']
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from grid_flows.models import ClusterSpec, InvalidRequest, format_validation_error


class InvalidClusterFile(InvalidRequest):
    """The cluster file cannot be read or does not describe a valid cluster."""


def parse_cluster(data: Any, source: str = "cluster definition") -> ClusterSpec:
    if not isinstance(data, dict):
        raise InvalidClusterFile(f"{source}: expected a mapping with 'nodes' at the top, got {type(data).__name__}")
    try:
        return ClusterSpec.model_validate(data)
    except ValidationError as exc:
        raise InvalidClusterFile(f"{source}: invalid cluster definition\n{format_validation_error(exc)}") from None


def load_cluster_file(path: str | Path) -> ClusterSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidClusterFile(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise InvalidClusterFile(f"{path}: malformed YAML{where}: {problem}") from None
    return parse_cluster(data, str(path))
