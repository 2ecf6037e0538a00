import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AllocationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALLOCATION_STATE_UNSPECIFIED: _ClassVar[AllocationState]
    ALLOCATION_STATE_QUEUED: _ClassVar[AllocationState]
    ALLOCATION_STATE_PLACED: _ClassVar[AllocationState]
    ALLOCATION_STATE_RUNNING: _ClassVar[AllocationState]
    ALLOCATION_STATE_RELEASING: _ClassVar[AllocationState]
    ALLOCATION_STATE_RELEASED: _ClassVar[AllocationState]
    ALLOCATION_STATE_FAILED: _ClassVar[AllocationState]
    ALLOCATION_STATE_RELEASE_FAILED: _ClassVar[AllocationState]
    ALLOCATION_STATE_CANCELLED: _ClassVar[AllocationState]

class NodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATE_UNSPECIFIED: _ClassVar[NodeState]
    NODE_STATE_READY: _ClassVar[NodeState]
    NODE_STATE_CORDONED: _ClassVar[NodeState]
    NODE_STATE_DRAINING: _ClassVar[NodeState]
    NODE_STATE_DRAINED: _ClassVar[NodeState]
    NODE_STATE_SUSPECT: _ClassVar[NodeState]
    NODE_STATE_OFFLINE: _ClassVar[NodeState]
    NODE_STATE_UNHEALTHY: _ClassVar[NodeState]
    NODE_STATE_DECOMMISSIONED: _ClassVar[NodeState]

class GpuState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GPU_STATE_UNSPECIFIED: _ClassVar[GpuState]
    GPU_STATE_READY: _ClassVar[GpuState]
    GPU_STATE_UNHEALTHY: _ClassVar[GpuState]
    GPU_STATE_QUARANTINED: _ClassVar[GpuState]

class Topology(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOPOLOGY_UNSPECIFIED: _ClassVar[Topology]
    TOPOLOGY_SAME_NVLINK_ISLAND: _ClassVar[Topology]
    TOPOLOGY_SAME_NODE: _ClassVar[Topology]
    TOPOLOGY_SAME_RACK: _ClassVar[Topology]
    TOPOLOGY_SPREAD: _ClassVar[Topology]
ALLOCATION_STATE_UNSPECIFIED: AllocationState
ALLOCATION_STATE_QUEUED: AllocationState
ALLOCATION_STATE_PLACED: AllocationState
ALLOCATION_STATE_RUNNING: AllocationState
ALLOCATION_STATE_RELEASING: AllocationState
ALLOCATION_STATE_RELEASED: AllocationState
ALLOCATION_STATE_FAILED: AllocationState
ALLOCATION_STATE_RELEASE_FAILED: AllocationState
ALLOCATION_STATE_CANCELLED: AllocationState
NODE_STATE_UNSPECIFIED: NodeState
NODE_STATE_READY: NodeState
NODE_STATE_CORDONED: NodeState
NODE_STATE_DRAINING: NodeState
NODE_STATE_DRAINED: NodeState
NODE_STATE_SUSPECT: NodeState
NODE_STATE_OFFLINE: NodeState
NODE_STATE_UNHEALTHY: NodeState
NODE_STATE_DECOMMISSIONED: NodeState
GPU_STATE_UNSPECIFIED: GpuState
GPU_STATE_READY: GpuState
GPU_STATE_UNHEALTHY: GpuState
GPU_STATE_QUARANTINED: GpuState
TOPOLOGY_UNSPECIFIED: Topology
TOPOLOGY_SAME_NVLINK_ISLAND: Topology
TOPOLOGY_SAME_NODE: Topology
TOPOLOGY_SAME_RACK: Topology
TOPOLOGY_SPREAD: Topology

class PlacementRequest(_message.Message):
    __slots__ = ("request_id", "gpu_count", "gpu_milli", "gpu_models", "cpu_milli", "memory_mib", "replicas", "topology", "priority", "node_selector", "lease_s", "wait", "queue_timeout_s", "labels")
    class NodeSelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    GPU_MILLI_FIELD_NUMBER: _ClassVar[int]
    GPU_MODELS_FIELD_NUMBER: _ClassVar[int]
    CPU_MILLI_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    NODE_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    gpu_count: int
    gpu_milli: int
    gpu_models: _containers.RepeatedScalarFieldContainer[str]
    cpu_milli: int
    memory_mib: int
    replicas: int
    topology: Topology
    priority: int
    node_selector: _containers.ScalarMap[str, str]
    lease_s: int
    wait: bool
    queue_timeout_s: int
    labels: _containers.ScalarMap[str, str]
    def __init__(self, request_id: _Optional[str] = ..., gpu_count: _Optional[int] = ..., gpu_milli: _Optional[int] = ..., gpu_models: _Optional[_Iterable[str]] = ..., cpu_milli: _Optional[int] = ..., memory_mib: _Optional[int] = ..., replicas: _Optional[int] = ..., topology: _Optional[_Union[Topology, str]] = ..., priority: _Optional[int] = ..., node_selector: _Optional[_Mapping[str, str]] = ..., lease_s: _Optional[int] = ..., wait: _Optional[bool] = ..., queue_timeout_s: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GpuAssignment(_message.Message):
    __slots__ = ("node_id", "gpu_indices", "gpu_milli", "gpu_model", "node_address", "cpu_milli", "memory_mib")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    GPU_INDICES_FIELD_NUMBER: _ClassVar[int]
    GPU_MILLI_FIELD_NUMBER: _ClassVar[int]
    GPU_MODEL_FIELD_NUMBER: _ClassVar[int]
    NODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CPU_MILLI_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    gpu_indices: _containers.RepeatedScalarFieldContainer[int]
    gpu_milli: int
    gpu_model: str
    node_address: str
    cpu_milli: int
    memory_mib: int
    def __init__(self, node_id: _Optional[str] = ..., gpu_indices: _Optional[_Iterable[int]] = ..., gpu_milli: _Optional[int] = ..., gpu_model: _Optional[str] = ..., node_address: _Optional[str] = ..., cpu_milli: _Optional[int] = ..., memory_mib: _Optional[int] = ...) -> None: ...

class Allocation(_message.Message):
    __slots__ = ("allocation_id", "tenant_id", "request_id", "state", "request", "assignments", "reason", "prepare_attempts", "created_at", "updated_at", "running_since", "stopped_at", "version", "pending_explanation", "lease_expires_at")
    ALLOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PREPARE_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    RUNNING_SINCE_FIELD_NUMBER: _ClassVar[int]
    STOPPED_AT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PENDING_EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    allocation_id: str
    tenant_id: str
    request_id: str
    state: AllocationState
    request: PlacementRequest
    assignments: _containers.RepeatedCompositeFieldContainer[GpuAssignment]
    reason: str
    prepare_attempts: int
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    running_since: _timestamp_pb2.Timestamp
    stopped_at: _timestamp_pb2.Timestamp
    version: int
    pending_explanation: str
    lease_expires_at: _timestamp_pb2.Timestamp
    def __init__(self, allocation_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., request_id: _Optional[str] = ..., state: _Optional[_Union[AllocationState, str]] = ..., request: _Optional[_Union[PlacementRequest, _Mapping]] = ..., assignments: _Optional[_Iterable[_Union[GpuAssignment, _Mapping]]] = ..., reason: _Optional[str] = ..., prepare_attempts: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., running_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stopped_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., version: _Optional[int] = ..., pending_explanation: _Optional[str] = ..., lease_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
