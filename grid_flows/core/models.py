"""Plain data of grid-flows: resources, the cluster definition and boosts.

Why one module of ~520 lines: these are the shapes every layer speaks (resources, the
cluster definition and its validation, boosts); their validators cross-reference each
other, so splitting them would only add imports between small files.

No Ray and no Prefect here: every other module speaks these types.

Example:
    >>> r = Resources.parse(cpu=2, memory="4GiB")
    >>> r.describe()
    '2 CPU, 4 GiB'
    >>> ClusterSpec.model_validate({"nodes": [{"name": "gpu-master", "role": "head"}]}).head.name
    'gpu-master'
"""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime, timezone
from enum import Enum
from typing import Annotated, Any, Optional

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from grid_flows.core.units import check_amount, format_amount, format_bytes, parse_memory
from grid_flows.errors import UnknownNode

MAX_BOOST_SECONDS = 7 * 24 * 3600
# The cluster (GridCluster block) a process serves unless told otherwise; records written
# before clusters had names belong to it.
DEFAULT_CLUSTER = "default"
_MIB = 1024**2
_GIB = 1024**3
_FIELD_PREFIX = re.compile(r"^[a-z_][a-z0-9_.\[\]]*: ")
# A node's name is the value of its Ray label grid.node, so it follows Ray's rule for label
# values (ray/_private/label_utils.py LABEL_REGEX, Kubernetes label syntax), matched whole.
_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
NAME_RULE = (
    "must be a Ray label value: 1 to 63 letters, digits, '-', '_' or '.', "
    "starting and ending with a letter or digit"
)
# Upper bounds of the cluster definition: beyond them a value is a typo, and `ray start` or
# the int()/timedelta conversions downstream would fail or overflow.
MAX_NODES = 1000
MAX_CPU_COUNT = 4096
MAX_GPU_COUNT = 64
MAX_MEMORY_GB = 65536  # 64 TiB
MAX_GPU_INTERVAL_MS = 3_600_000  # one hour between GPU task starts
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")  # RFC 1123
_DIGITS = re.compile(r"[0-9]+")


def cluster_scoped(name: str, cluster: str) -> str:
    """``name`` for the default cluster, ``name-<cluster>`` for another: the one rule for the
    names clusters sharing a Prefect server must not share (artifact keys, deployments).

    >>> cluster_scoped("grid-boosts", "default"), cluster_scoped("grid-boosts", "lab")
    ('grid-boosts', 'grid-boosts-lab')
    """
    return name if cluster == DEFAULT_CLUSTER else f"{name}-{cluster}"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Strict(BaseModel):
    """Base for user-edited models: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Resources(BaseModel):
    """An amount of CPU, GPU and memory (bytes). Amounts are finite and never negative."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cpu: float = 0.0
    gpu: float = 0.0
    memory: int = 0

    @field_validator("cpu", "gpu", mode="before")
    @classmethod
    def _finite(cls, value: Any, info) -> float:
        return check_amount(value, info.field_name)

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> int:
        return parse_memory(value)

    @classmethod
    def parse(cls, cpu: float = 0, gpu: float = 0, memory: str | int | None = None) -> "Resources":
        """Validate user input; raises ValueError with a one-line message."""
        try:
            return cls(cpu=cpu, gpu=gpu, memory=parse_memory(memory))
        except ValidationError as exc:
            raise ValueError(format_validation_error(exc)) from None

    def is_zero(self) -> bool:
        return self.cpu == 0 and self.gpu == 0 and self.memory == 0

    def fits_in(self, other: "Resources") -> bool:
        eps = 1e-9
        return (
            self.cpu <= other.cpu + eps
            and self.gpu <= other.gpu + eps
            and self.memory <= other.memory
        )

    def __add__(self, other: "Resources") -> "Resources":
        return Resources(cpu=self.cpu + other.cpu, gpu=self.gpu + other.gpu, memory=self.memory + other.memory)

    def minus(self, other: "Resources") -> "Resources":
        """Subtract, flooring each amount at zero."""
        return Resources(
            cpu=max(0.0, self.cpu - other.cpu),
            gpu=max(0.0, self.gpu - other.gpu),
            memory=max(0, self.memory - other.memory),
        )

    def shortfall(self, available: "Resources") -> list[str]:
        """Human list of what ``available`` lacks to hold ``self``."""
        missing = []
        if self.cpu > available.cpu + 1e-9:
            missing.append(f"{format_amount(self.cpu)} CPU (has {format_amount(available.cpu)})")
        if self.gpu > available.gpu + 1e-9:
            missing.append(f"{format_amount(self.gpu)} GPU (has {format_amount(available.gpu)})")
        if self.memory > available.memory:
            missing.append(f"{format_bytes(self.memory)} memory (has {format_bytes(available.memory)})")
        return missing

    def describe(self) -> str:
        parts = []
        if self.cpu:
            parts.append(f"{format_amount(self.cpu)} CPU")
        if self.gpu:
            parts.append(f"{format_amount(self.gpu)} GPU")
        if self.memory:
            parts.append(format_bytes(self.memory))
        return ", ".join(parts) or "nothing"


class Priority(str, Enum):
    low = "low"
    normal = "normal"
    high = "high"
    critical = "critical"

    @property
    def rank(self) -> int:
        return _PRIORITY_RANK[self]


_PRIORITY_RANK = {Priority.low: 0, Priority.normal: 1, Priority.high: 2, Priority.critical: 3}


class BoostState(str, Enum):
    pending = "pending"
    active = "active"
    released = "released"
    expired = "expired"
    preempted = "preempted"
    lost = "lost"
    failed = "failed"

    @property
    def ended(self) -> bool:
        return self not in (BoostState.pending, BoostState.active)


class NodeRole(str, Enum):
    head = "head"
    worker = "worker"


class ResourceMode(str, Enum):
    conservative = "conservative"
    default = "default"
    aggressive = "aggressive"


class SharingMode(str, Enum):
    offload_only = "offload_only"
    share_and_offload = "share_and_offload"
    dynamic_balancing = "dynamic_balancing"


class SharingPolicy(str, Enum):
    conservative = "conservative"
    balanced = "balanced"
    aggressive = "aggressive"
    predictive = "predictive"


class ModeOverrides(Strict):
    """Per-node changes to the numbers of a resource mode (see grid_flows.core.modes)."""

    vram_cap: Optional[float] = Field(
        None, gt=0, le=1, allow_inf_nan=False, description="fraction of GPU memory a task may use"
    )
    gpu_interval_ms: Optional[float] = Field(
        None, ge=0, le=MAX_GPU_INTERVAL_MS, allow_inf_nan=False, description="minimum gap between GPU task starts"
    )
    nice: Optional[int] = Field(None, ge=-20, le=19)
    ionice_class: Optional[str] = Field(None, pattern="^(idle|best-effort|normal)$")
    ionice_level: Optional[int] = Field(None, ge=0, le=7)


class NodeSharing(Strict):
    """What a node lends. Shares are capped by the node's size when the size is given."""

    can_share: bool = False
    max_share_cpu: float = Field(0, ge=0, le=MAX_CPU_COUNT, allow_inf_nan=False)
    max_share_memory_gb: float = Field(0, ge=0, le=MAX_MEMORY_GB, allow_inf_nan=False)
    max_share_gpu: float = Field(0, ge=0, le=MAX_GPU_COUNT, allow_inf_nan=False)
    priority: int = Field(10, ge=0, description="lower lends first when shares tie")
    mode: Optional[ResourceMode] = Field(None, description="same as the node's `mode`")

    @property
    def share(self) -> Resources:
        if not self.can_share:
            return Resources()
        return Resources(cpu=self.max_share_cpu, gpu=self.max_share_gpu, memory=int(self.max_share_memory_gb * _GIB))


_ADDRESS_RULE = (
    "must be HOST or HOST:PORT, HOST a host name (RFC 1123 labels), an IPv4 address or a "
    "bracketed IPv6 address like [::1], with no spaces"
)


def address_problem(value: str) -> str | None:
    """Why ``value`` is not HOST or HOST:PORT (HOST: an RFC 1123 name, IPv4 or [IPv6]), or None."""
    host, port = value, None
    if value.startswith("["):
        end = value.find("]")
        host, rest = value[1:end], value[end + 1:]
        if end < 0 or "%" in host or (rest and not rest.startswith(":")):
            return f"{_ADDRESS_RULE}; got {value!r}"
        port = rest[1:] if rest else None
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"{_ADDRESS_RULE}; got {value!r}"
    else:
        if value.count(":") > 1:
            return f"{_ADDRESS_RULE}; got {value!r}"
        if ":" in value:
            host, port = value.split(":")
        labels = host.split(".")
        if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
            return f"{_ADDRESS_RULE}; got {value!r}"
        if _DIGITS.fullmatch(labels[-1]):  # an all-digit last label: only an IPv4 address
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                return f"{_ADDRESS_RULE}; got {value!r}"
    if port is not None and not (_DIGITS.fullmatch(port) and 1 <= int(port) <= 65535):
        return f"port must be a number from 1 to 65535, got {value!r}"
    return None


def _offload_command(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    if any(c in value for c in "\0\n\r"):
        raise ValueError(f"must not hold NUL or line breaks, got {value!r}")
    return value


class NodeSpec(Strict):
    name: str
    role: NodeRole = NodeRole.worker
    cpu_count: float = Field(1, gt=0, le=MAX_CPU_COUNT, allow_inf_nan=False, description="whole CPUs")
    gpu_count: float = Field(0, ge=0, le=MAX_GPU_COUNT, allow_inf_nan=False, description="whole GPUs")
    memory_gb: float = Field(2, gt=0, le=MAX_MEMORY_GB, allow_inf_nan=False, description="GiB")
    resource_sharing: NodeSharing = Field(default_factory=NodeSharing)
    mode: ResourceMode = ResourceMode.default
    mode_overrides: ModeOverrides = Field(default_factory=ModeOverrides)
    tags: list[str] = Field(default_factory=list)
    address: Optional[str] = Field(
        None,
        description="HOST or HOST:PORT (HOST: a host name, IPv4 or [IPv6]), for documentation and "
        "`grid node ray-args`; the head's: a host name or IPv4 address only (ray-args adds :6379)",
    )
    allow_offload_commands: bool = Field(
        False, description="whether `grid offload run` / the grid-offload flow may start commands on this node"
    )
    offload_commands: list[Annotated[str, AfterValidator(_offload_command)]] = Field(
        default_factory=list,
        description="when not empty, the only executables offloaded commands may start here (names or paths)",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError(f"{NAME_RULE}, got {value!r}")
        return value

    @field_validator("cpu_count", "gpu_count")
    @classmethod
    def _whole(cls, value: float, info) -> float:
        if not float(value).is_integer():
            flag = "--num-cpus" if info.field_name == "cpu_count" else "--num-gpus"
            raise ValueError(f"must be a whole number (`ray start {flag}` takes whole units), got {value:g}")
        return value

    @field_validator("address")
    @classmethod
    def _address(cls, value: Optional[str]) -> Optional[str]:
        problem = None if value is None else address_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="before")
    @classmethod
    def _mode_alias(cls, data: Any) -> Any:
        # The seed format put `mode` under resource_sharing; accept it when it agrees.
        if isinstance(data, dict):
            sharing = data.get("resource_sharing")
            if isinstance(sharing, dict) and sharing.get("mode") is not None:
                if data.get("mode") is not None and data["mode"] != sharing["mode"]:
                    raise ValueError(
                        f"mode: '{data['mode']}' disagrees with resource_sharing.mode '{sharing['mode']}'"
                    )
                if sharing["mode"] in {m.value for m in ResourceMode}:
                    data = {**data, "mode": sharing["mode"]}
                # else: left where the user wrote it, so one error names resource_sharing.mode
        return data

    @model_validator(mode="after")
    def _share_within_size(self) -> "NodeSpec":
        s = self.resource_sharing
        for field, share, size in (
            ("max_share_cpu", s.max_share_cpu, self.cpu_count),
            ("max_share_gpu", s.max_share_gpu, self.gpu_count),
            ("max_share_memory_gb", s.max_share_memory_gb, self.memory_gb),
        ):
            if share > size:
                raise ValueError(f"resource_sharing.{field}: {share:g} is more than the node has ({size:g})")
        if self.role is NodeRole.head and self.address and ":" in self.address:
            # `grid node ray-args WORKER` prints --address=<head address>:6379 through rich, which
            # would also eat a bracketed IPv6 address as markup: a host name or IPv4 address only
            raise ValueError(
                f"address: the head's address must be a host name or IPv4 address without a port "
                f"(`grid node ray-args` adds :6379 for workers; for another port or IPv6 pass "
                f"--address HOST:PORT), got {self.address!r}"
            )
        return self

    @property
    def size(self) -> Resources:
        return Resources(cpu=self.cpu_count, gpu=self.gpu_count, memory=int(self.memory_gb * _GIB))

    @property
    def share(self) -> Resources:
        return self.resource_sharing.share

    def describe(self) -> str:
        """What the node is, in one line: ``worker, 4 CPU, 1 GPU, 16 GiB; lends 2 CPU, 1 GPU; mode default``."""
        lends = self.share.describe() if self.resource_sharing.can_share and not self.share.is_zero() else "nothing"
        return f"{self.role.value}, {describe_size(self.size)}; lends {lends}; mode {self.mode.value}"


def describe_size(r: Resources) -> str:
    """All three amounts, zeros included: ``4 CPU, 0 GPU, 16 GiB``."""
    return f"{format_amount(r.cpu)} CPU, {format_amount(r.gpu)} GPU, {format_bytes(r.memory)}"


class Threshold(Strict):
    high: float = Field(0.8, ge=0, le=1, allow_inf_nan=False)
    low: float = Field(0.3, ge=0, le=1, allow_inf_nan=False)

    @model_validator(mode="after")
    def _ordered(self) -> "Threshold":
        if self.low >= self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        return self


class Thresholds(Strict):
    cpu: Threshold = Field(default_factory=Threshold)
    memory: Threshold = Field(default_factory=Threshold)
    gpu: Threshold = Field(default_factory=Threshold)


class ClusterSharing(Strict):
    enabled: bool = True
    mode: SharingMode = SharingMode.share_and_offload
    policy: SharingPolicy = SharingPolicy.balanced
    rebalance_interval_seconds: float = Field(30, gt=0, le=MAX_BOOST_SECONDS, allow_inf_nan=False)
    monitoring_interval_seconds: float = Field(10, gt=0, le=MAX_BOOST_SECONDS, allow_inf_nan=False)
    default_boost_duration_seconds: float = Field(3600, gt=0, le=MAX_BOOST_SECONDS, allow_inf_nan=False)
    max_boost_duration_seconds: float = Field(MAX_BOOST_SECONDS, gt=0, le=MAX_BOOST_SECONDS, allow_inf_nan=False)
    min_runtime_seconds: float = Field(60, ge=0, le=MAX_BOOST_SECONDS, allow_inf_nan=False)
    grace_seconds: float = Field(30, ge=0, le=MAX_BOOST_SECONDS, allow_inf_nan=False)
    thresholds: Thresholds = Field(default_factory=Thresholds)
    excess_threshold: float = Field(0.2, ge=0, le=1, allow_inf_nan=False)
    history_keep_count: int = Field(
        1000, ge=0, le=100_000, description="ended boost records kept; the reconcile flow deletes older ones"
    )
    history_keep_days: float = Field(
        30, gt=0, le=3650, allow_inf_nan=False, description="ended boost records older than this are deleted"
    )


    @model_validator(mode="after")
    def _default_within_max(self) -> "ClusterSharing":
        if self.default_boost_duration_seconds > self.max_boost_duration_seconds:
            raise ValueError(
                f"default_boost_duration_seconds: {self.default_boost_duration_seconds:g} is more than "
                f"max_boost_duration_seconds ({self.max_boost_duration_seconds:g})"
            )
        return self


class ClusterSpec(Strict):
    """The cluster definition of ``blocks/cluster.yaml``."""

    name: str = DEFAULT_CLUSTER
    nodes: list[NodeSpec]
    resource_sharing: ClusterSharing = Field(default_factory=ClusterSharing)

    @field_validator("nodes", mode="before")
    @classmethod
    def _not_too_many(cls, value: Any) -> Any:
        # before validation, so a huge list is refused at once and yields one line, not one per node
        if isinstance(value, (list, tuple)) and len(value) > MAX_NODES:
            raise ValueError(f"{len(value)} nodes; at most {MAX_NODES} are supported")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "ClusterSpec":
        seen: set[str] = set()
        for i, node in enumerate(self.nodes):
            if node.name in seen:
                raise ValueError(f"nodes[{i}].name: '{node.name}' is used by two nodes")
            seen.add(node.name)
        heads = [n.name for n in self.nodes if n.role is NodeRole.head]
        if not heads:
            raise ValueError("nodes: no node has role 'head' (exactly one is needed)")
        if len(heads) > 1:
            raise ValueError(f"nodes: more than one head ({', '.join(heads)}); exactly one is needed")
        return self

    @property
    def head(self) -> NodeSpec:
        return next(n for n in self.nodes if n.role is NodeRole.head)

    @property
    def workers(self) -> list[NodeSpec]:
        return [n for n in self.nodes if n.role is NodeRole.worker]

    def node(self, name: str) -> NodeSpec:
        for n in self.nodes:
            if n.name == name:
                return n
        known = ", ".join(n.name for n in self.nodes)
        raise UnknownNode(f"unknown node '{name}' (known: {known})")

    def lenders(self) -> list[NodeSpec]:
        return [n for n in self.nodes if n.resource_sharing.can_share and not n.share.is_zero()]


class Boost(BaseModel):
    """A time-bounded lease of a lender's capacity, held as a Ray placement group."""

    model_config = ConfigDict(extra="ignore")

    id: str
    source: str
    target: str
    resources: Resources
    priority: Priority = Priority.normal
    state: BoostState = BoostState.pending
    created_at: datetime
    expires_at: datetime
    duration_seconds: float
    placement_group: str
    placement_group_id: Optional[str] = None
    granted_at: Optional[datetime] = None
    ended_at: Optional[datetime] = None
    reason: str = ""
    origin: str = "api"
    requested_by: str = ""  # the flow run, or user@host, that asked for it
    preempted_by: str = ""  # while active: the boost whose preemption of this one is under way
    # The GridCluster block the boost belongs to: clusters sharing one Prefect server never
    # judge each other's records (DEFAULT_CLUSTER for records written before clusters were named).
    cluster: str = DEFAULT_CLUSTER
    # The Ray cluster it was granted in, by Ray's session name (new at each start of the head):
    # a record whose group is gone tells whether its Ray cluster restarted, or is another one.
    ray_session: str = ""

    @property
    def short_id(self) -> str:
        return self.id[:8]

    def seconds_left(self, now: datetime | None = None) -> float:
        return max(0.0, (self.expires_at - (now or utcnow())).total_seconds())

    def is_overdue(self, now: datetime) -> bool:
        return self.state is BoostState.active and now >= self.expires_at








def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per problem: ``nodes[1].resource_sharing.max_share_cpu: must be >= 0``."""
    lines = []
    for err in exc.errors():
        loc = ""
        for part in err["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        msg = err["msg"]
        for noise in ("Value error, ", "Assertion failed, "):
            msg = msg.replace(noise, "")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "enum":
            allowed = err.get("ctx", {}).get("expected", "")
            msg = f"unknown value {err.get('input')!r}; expected {allowed}"
        elif err["type"] == "greater_than_equal":
            msg = f"must be >= {err['ctx']['ge']}, got {err.get('input')!r}"
        where = ".".join(p for p in (prefix, loc) if p)
        if not where:
            lines.append(msg)
        elif _FIELD_PREFIX.match(msg):  # a model-level message that names its own field
            lines.append(f"{where}.{msg}")
        else:
            lines.append(f"{where}: {msg}")
    return "\n".join(lines)
