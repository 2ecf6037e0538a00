"""Domain types of the placement engine: enums, specs, requests, decisions.

Everything here is a plain value: no I/O, no framework types. The control
plane converts its protobuf messages into these at its edge.
"""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from types import MappingProxyType

MILLI = 1000  # milli-GPU in one whole GPU
_EMPTY: Mapping[str, str] = MappingProxyType({})


class Topology(enum.IntEnum):
    """Where the replicas (and GPUs) of one request may land. Values match the proto enum."""

    ANY = 0
    SAME_NVLINK_ISLAND = 1
    SAME_NODE = 2
    SAME_RACK = 3
    SPREAD = 4


class PolicyName(enum.Enum):
    """Placement policies, chosen per engine (per cluster) by configuration."""

    FAST_BEST_FIT = "fast-best-fit"   # default: bucket-indexed best fit on free whole GPUs, O(1) amortized
    FIRST_FIT = "first-fit"           # first feasible node in the engine's node order
    BEST_FIT = "best-fit"             # least CPU+GPU left after placement (FGD paper baseline)
    GPU_PACKING = "gpu-packing"       # shared GPUs first, then used nodes, then empty nodes (paper baseline)
    DOT_PRODUCT = "dot-product"       # Tetris alignment of request and free vectors (paper baseline)
    RANDOM = "random"                 # uniform among feasible nodes (paper baseline)
    FGD = "fgd"                       # fragmentation gradient descent (Weng et al., ATC'23)
    FGD_PLUS = "fgd-plus"             # FGD + tie-break options (an earlier attempt; see docs/scheduler.md)
    FGD_BALANCED = "fgd-balanced"     # ours: FGD learned online + CPU-stranding term (best quality)

    @classmethod
    def parse(cls, text: str) -> "PolicyName":
        t = text.strip().lower().replace("_", "-")
        for p in cls:
            if p.value == t or p.name.lower().replace("_", "-") == t:
                return p
        raise ValueError(f"unknown policy {text!r}; choose from {', '.join(p.value for p in cls)}")


DEFAULT_POLICY = PolicyName.FAST_BEST_FIT
BEST_QUALITY_POLICY = PolicyName.FGD_BALANCED


class Reason(enum.Enum):
    """Why a node (or the whole request) was rejected. Every rejection counts against one."""

    NODE_UNSCHEDULABLE = "node not schedulable (cordoned, draining, suspect or offline)"
    NODE_SELECTOR = "node selector"
    GPU_MODEL = "model"
    CPU = "CPU"
    MEMORY = "memory"
    QUOTA_EXCEEDED = "quota"
    GPU_COUNT = "free whole GPUs"
    GPU_SHARE = "free GPU share"
    NVLINK_ISLAND = "NVLink island"
    TOPOLOGY = "topology"
    GANG_INCOMPLETE = "gang incomplete"
    HELD = "capacity held for a preemptor"
    NO_NODES = "no nodes"
    DUPLICATE_KEY = "duplicate key"
    INVALID_REQUEST = "invalid request"
    PREEMPTION_NEEDED = "preemption needed"
    PREEMPTION_IMPOSSIBLE = "nothing to preempt"


@dataclasses.dataclass(frozen=True, slots=True)
class GpuSpec:
    model: str
    memory_mib: int = 0
    nvlink_island: int = 0


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    node_id: str
    cpu_milli: int
    memory_mib: int
    gpus: tuple[GpuSpec, ...] = ()
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def same_as(self, other: "NodeSpec") -> bool:
        return (self.node_id == other.node_id and self.cpu_milli == other.cpu_milli
                and self.memory_mib == other.memory_mib and tuple(self.gpus) == tuple(other.gpus)
                and dict(self.labels) == dict(other.labels))


@dataclasses.dataclass(frozen=True)
class Request:
    key: str
    tenant: str = ""
    num_gpu: int = 0
    gpu_milli: int = 0
    cpu_milli: int = 0
    memory_mib: int = 0
    gpu_models: tuple[str, ...] = ()
    replicas: int = 1
    topology: Topology = Topology.ANY
    priority: int = 0
    node_selector: Mapping[str, str] = dataclasses.field(default_factory=dict)

    # Normalised view used by the engine: whole-GPU requests carry gpu_milli == 1000.
    def per_gpu_milli(self) -> int:
        if self.num_gpu <= 0 and self.gpu_milli <= 0:
            return 0
        return self.gpu_milli if 0 < self.gpu_milli < MILLI else MILLI

    def gpus_per_replica(self) -> int:
        if self.num_gpu <= 0:
            return 1 if self.gpu_milli > 0 else 0
        return self.num_gpu

    def gpu_milli_per_replica(self) -> int:
        return self.gpus_per_replica() * self.per_gpu_milli()


@dataclasses.dataclass(frozen=True, slots=True)
class Assignment:
    node_id: str
    gpu_indices: tuple[int, ...]
    gpu_milli: int
    cpu_milli: int
    memory_mib: int


@dataclasses.dataclass(slots=True)
class Decision:
    key: str
    placed: bool
    assignments: tuple[Assignment, ...]
    explanation: str
    reasons: dict
    victims: tuple[str, ...] = ()


class SchedulerError(Exception):
    """A caller bug (bad spec, conflicting node, unknown node); never an expected outcome."""
