"""Read ``blocks/cluster.yaml`` into a validated :class:`~grid_flows.core.models.ClusterSpec`.

Every problem is reported on its own line and names the field, e.g.
``nodes[1].resource_sharing.max_share_cpu: must be >= 0, got -2``. Beyond the
:class:`~grid_flows.core.models.ClusterSpec` rules a file is refused when it is over
``MAX_FILE_BYTES`` (checked before parsing), writes a key twice in one mapping, or has a
top-level ``name`` (the cluster's name is the GridCluster block's: ``grid blocks apply FILE --name NAME``).

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

from grid_flows.core.models import ClusterSpec, format_validation_error
from grid_flows.errors import InvalidClusterFile

MAX_FILE_BYTES = 1024**2  # a real cluster file is a few KiB; MAX_NODES nodes fit in well under 1 MiB
NAME_IN_FILE = (
    "name: a cluster file does not name its cluster; the name is the GridCluster block's: "
    "use `grid blocks apply FILE --name NAME` instead"
)



class DuplicateKey(yaml.constructor.ConstructorError):
    """A mapping holds the same key twice (plain YAML keeps the last one silently)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (merge keys ``<<`` may be overridden)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first_line
                except TypeError:  # unhashable: SafeLoader reports it
                    continue
                if seen:
                    mark = key_node.start_mark
                    raise DuplicateKey(
                        None, None,
                        f"duplicate key {key!r} at line {mark.line + 1}, column {mark.column + 1} "
                        f"(first at line {first_line[key] + 1})",
                        mark,
                    )
                first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def parse_cluster(data: Any, source: str = "cluster definition") -> ClusterSpec:
    if not isinstance(data, dict):
        raise InvalidClusterFile(f"{source}: expected a mapping with 'nodes' at the top, got {type(data).__name__}")
    problems = []
    if "name" in data:
        # ClusterSpec.name comes from the block document (GridCluster.to_spec(name=...)), never from the file
        problems.append(NAME_IN_FILE)
        data = {k: v for k, v in data.items() if k != "name"}
    try:
        spec = ClusterSpec.model_validate(data)
    except ValidationError as exc:
        problems += format_validation_error(exc).splitlines()
    if problems:
        raise InvalidClusterFile(f"{source}: invalid cluster definition\n" + "\n".join(problems))
    return spec


def load_cluster_file(path: str | Path) -> ClusterSpec:
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)  # never more: a FIFO or /dev/zero has no size to check first
    except OSError as exc:
        raise InvalidClusterFile(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise InvalidClusterFile(f"{path}: too large: a cluster file is at most {MAX_FILE_BYTES // 1024**2} MiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidClusterFile(f"{path}: cannot read: not UTF-8 text (byte {exc.start})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except DuplicateKey as exc:
        raise InvalidClusterFile(f"{path}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise InvalidClusterFile(f"{path}: malformed YAML{where}: {problem}") from None
    return parse_cluster(data, str(path))
