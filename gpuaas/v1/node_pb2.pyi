import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from gpuaas.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GpuInfo(_message.Message):
    __slots__ = ("index", "uuid", "name", "model", "memory_mib", "pci_bus_id", "mig_enabled", "nvlink_island")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    PCI_BUS_ID_FIELD_NUMBER: _ClassVar[int]
    MIG_ENABLED_FIELD_NUMBER: _ClassVar[int]
    NVLINK_ISLAND_FIELD_NUMBER: _ClassVar[int]
    index: int
    uuid: str
    name: str
    model: str
    memory_mib: int
    pci_bus_id: str
    mig_enabled: bool
    nvlink_island: int
    def __init__(self, index: _Optional[int] = ..., uuid: _Optional[str] = ..., name: _Optional[str] = ..., model: _Optional[str] = ..., memory_mib: _Optional[int] = ..., pci_bus_id: _Optional[str] = ..., mig_enabled: _Optional[bool] = ..., nvlink_island: _Optional[int] = ...) -> None: ...

class NodeInventory(_message.Message):
    __slots__ = ("node_name", "hostname", "backend", "simulated", "driver_version", "nvml_version", "cpu_milli", "memory_mib", "labels", "gpus")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_FIELD_NUMBER: _ClassVar[int]
    DRIVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    NVML_VERSION_FIELD_NUMBER: _ClassVar[int]
    CPU_MILLI_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    hostname: str
    backend: str
    simulated: bool
    driver_version: str
    nvml_version: str
    cpu_milli: int
    memory_mib: int
    labels: _containers.ScalarMap[str, str]
    gpus: _containers.RepeatedCompositeFieldContainer[GpuInfo]
    def __init__(self, node_name: _Optional[str] = ..., hostname: _Optional[str] = ..., backend: _Optional[str] = ..., simulated: _Optional[bool] = ..., driver_version: _Optional[str] = ..., nvml_version: _Optional[str] = ..., cpu_milli: _Optional[int] = ..., memory_mib: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., gpus: _Optional[_Iterable[_Union[GpuInfo, _Mapping]]] = ...) -> None: ...

class RegisterNodeRequest(_message.Message):
    __slots__ = ("inventory", "agent_address")
    INVENTORY_FIELD_NUMBER: _ClassVar[int]
    AGENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    inventory: NodeInventory
    agent_address: str
    def __init__(self, inventory: _Optional[_Union[NodeInventory, _Mapping]] = ..., agent_address: _Optional[str] = ...) -> None: ...

class RegisterNodeResponse(_message.Message):
    __slots__ = ("node_id", "state", "telemetry_interval_ms", "orphaned_allocation_ids")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    ORPHANED_ALLOCATION_IDS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    state: _common_pb2.NodeState
    telemetry_interval_ms: int
    orphaned_allocation_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.NodeState, str]] = ..., telemetry_interval_ms: _Optional[int] = ..., orphaned_allocation_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeregisterNodeRequest(_message.Message):
    __slots__ = ("node_id", "reason")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    reason: str
    def __init__(self, node_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DeregisterNodeResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.NodeState
    def __init__(self, state: _Optional[_Union[_common_pb2.NodeState, str]] = ...) -> None: ...

class GetInventoryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StreamTelemetryRequest(_message.Message):
    __slots__ = ("interval_ms", "buffer_frames_max", "omit_processes")
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    BUFFER_FRAMES_MAX_FIELD_NUMBER: _ClassVar[int]
    OMIT_PROCESSES_FIELD_NUMBER: _ClassVar[int]
    interval_ms: int
    buffer_frames_max: int
    omit_processes: bool
    def __init__(self, interval_ms: _Optional[int] = ..., buffer_frames_max: _Optional[int] = ..., omit_processes: _Optional[bool] = ...) -> None: ...

class ProcessInfo(_message.Message):
    __slots__ = ("pid", "used_memory_mib", "name")
    PID_FIELD_NUMBER: _ClassVar[int]
    USED_MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    pid: int
    used_memory_mib: int
    name: str
    def __init__(self, pid: _Optional[int] = ..., used_memory_mib: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class GpuSample(_message.Message):
    __slots__ = ("index", "uuid", "gpu_util_pct", "memory_util_pct", "memory_used_mib", "temperature_c", "power_mw", "sm_clock_mhz", "throttle_reasons", "ecc_volatile_corrected", "ecc_volatile_uncorrected", "ecc_aggregate_uncorrected", "retired_pages", "energy_mj", "processes", "lost")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    GPU_UTIL_PCT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_UTIL_PCT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_MIB_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    POWER_MW_FIELD_NUMBER: _ClassVar[int]
    SM_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    THROTTLE_REASONS_FIELD_NUMBER: _ClassVar[int]
    ECC_VOLATILE_CORRECTED_FIELD_NUMBER: _ClassVar[int]
    ECC_VOLATILE_UNCORRECTED_FIELD_NUMBER: _ClassVar[int]
    ECC_AGGREGATE_UNCORRECTED_FIELD_NUMBER: _ClassVar[int]
    RETIRED_PAGES_FIELD_NUMBER: _ClassVar[int]
    ENERGY_MJ_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    index: int
    uuid: str
    gpu_util_pct: int
    memory_util_pct: int
    memory_used_mib: int
    temperature_c: int
    power_mw: int
    sm_clock_mhz: int
    throttle_reasons: int
    ecc_volatile_corrected: int
    ecc_volatile_uncorrected: int
    ecc_aggregate_uncorrected: int
    retired_pages: int
    energy_mj: int
    processes: _containers.RepeatedCompositeFieldContainer[ProcessInfo]
    lost: bool
    def __init__(self, index: _Optional[int] = ..., uuid: _Optional[str] = ..., gpu_util_pct: _Optional[int] = ..., memory_util_pct: _Optional[int] = ..., memory_used_mib: _Optional[int] = ..., temperature_c: _Optional[int] = ..., power_mw: _Optional[int] = ..., sm_clock_mhz: _Optional[int] = ..., throttle_reasons: _Optional[int] = ..., ecc_volatile_corrected: _Optional[int] = ..., ecc_volatile_uncorrected: _Optional[int] = ..., ecc_aggregate_uncorrected: _Optional[int] = ..., retired_pages: _Optional[int] = ..., energy_mj: _Optional[int] = ..., processes: _Optional[_Iterable[_Union[ProcessInfo, _Mapping]]] = ..., lost: _Optional[bool] = ...) -> None: ...

class XidEvent(_message.Message):
    __slots__ = ("gpu_index", "xid", "at", "message")
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    XID_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    gpu_index: int
    xid: int
    at: _timestamp_pb2.Timestamp
    message: str
    def __init__(self, gpu_index: _Optional[int] = ..., xid: _Optional[int] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., message: _Optional[str] = ...) -> None: ...

class TelemetryFrame(_message.Message):
    __slots__ = ("seq", "at", "node_name", "samples", "xid_events", "dropped_frames")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    XID_EVENTS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    seq: int
    at: _timestamp_pb2.Timestamp
    node_name: str
    samples: _containers.RepeatedCompositeFieldContainer[GpuSample]
    xid_events: _containers.RepeatedCompositeFieldContainer[XidEvent]
    dropped_frames: int
    def __init__(self, seq: _Optional[int] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., node_name: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[GpuSample, _Mapping]]] = ..., xid_events: _Optional[_Iterable[_Union[XidEvent, _Mapping]]] = ..., dropped_frames: _Optional[int] = ...) -> None: ...

class PrepareRequest(_message.Message):
    __slots__ = ("allocation_id", "gpu_indices", "gpu_milli", "tenant_id")
    ALLOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    GPU_INDICES_FIELD_NUMBER: _ClassVar[int]
    GPU_MILLI_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    allocation_id: str
    gpu_indices: _containers.RepeatedScalarFieldContainer[int]
    gpu_milli: int
    tenant_id: str
    def __init__(self, allocation_id: _Optional[str] = ..., gpu_indices: _Optional[_Iterable[int]] = ..., gpu_milli: _Optional[int] = ..., tenant_id: _Optional[str] = ...) -> None: ...

class PrepareResponse(_message.Message):
    __slots__ = ("cuda_visible_devices", "message")
    CUDA_VISIBLE_DEVICES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    cuda_visible_devices: str
    message: str
    def __init__(self, cuda_visible_devices: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class PrepareBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[PrepareRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[PrepareRequest, _Mapping]]] = ...) -> None: ...

class PrepareResult(_message.Message):
    __slots__ = ("allocation_id", "response", "error")
    ALLOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    allocation_id: str
    response: PrepareResponse
    error: _status_pb2.Status
    def __init__(self, allocation_id: _Optional[str] = ..., response: _Optional[_Union[PrepareResponse, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class PrepareBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PrepareResult]
    def __init__(self, results: _Optional[_Iterable[_Union[PrepareResult, _Mapping]]] = ...) -> None: ...

class CleanupRequest(_message.Message):
    __slots__ = ("allocation_id",)
    ALLOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    allocation_id: str
    def __init__(self, allocation_id: _Optional[str] = ...) -> None: ...

class CleanupResponse(_message.Message):
    __slots__ = ("processes_ended", "message")
    PROCESSES_ENDED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    processes_ended: int
    message: str
    def __init__(self, processes_ended: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class CleanupBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[CleanupRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[CleanupRequest, _Mapping]]] = ...) -> None: ...

class CleanupResult(_message.Message):
    __slots__ = ("allocation_id", "response", "error")
    ALLOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    allocation_id: str
    response: CleanupResponse
    error: _status_pb2.Status
    def __init__(self, allocation_id: _Optional[str] = ..., response: _Optional[_Union[CleanupResponse, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class CleanupBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[CleanupResult]
    def __init__(self, results: _Optional[_Iterable[_Union[CleanupResult, _Mapping]]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GpuHealth(_message.Message):
    __slots__ = ("index", "state", "reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    state: _common_pb2.GpuState
    reason: str
    def __init__(self, index: _Optional[int] = ..., state: _Optional[_Union[_common_pb2.GpuState, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("healthy", "gpus")
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    healthy: bool
    gpus: _containers.RepeatedCompositeFieldContainer[GpuHealth]
    def __init__(self, healthy: _Optional[bool] = ..., gpus: _Optional[_Iterable[_Union[GpuHealth, _Mapping]]] = ...) -> None: ...
