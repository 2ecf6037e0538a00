import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from gpuaas.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AllocationTransitioned(_message.Message):
    __slots__ = ("event_id", "allocation_id", "tenant_id", "from_state", "to_state", "event", "reason", "at", "assignments", "version")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_STATE_FIELD_NUMBER: _ClassVar[int]
    TO_STATE_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    event_id: int
    allocation_id: str
    tenant_id: str
    from_state: _common_pb2.AllocationState
    to_state: _common_pb2.AllocationState
    event: str
    reason: str
    at: _timestamp_pb2.Timestamp
    assignments: _containers.RepeatedCompositeFieldContainer[_common_pb2.GpuAssignment]
    version: int
    def __init__(self, event_id: _Optional[int] = ..., allocation_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., from_state: _Optional[_Union[_common_pb2.AllocationState, str]] = ..., to_state: _Optional[_Union[_common_pb2.AllocationState, str]] = ..., event: _Optional[str] = ..., reason: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., assignments: _Optional[_Iterable[_Union[_common_pb2.GpuAssignment, _Mapping]]] = ..., version: _Optional[int] = ...) -> None: ...

class NodeTransitioned(_message.Message):
    __slots__ = ("event_id", "node_id", "from_state", "to_state", "event", "reason", "at", "gpu_index", "automatic")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_STATE_FIELD_NUMBER: _ClassVar[int]
    TO_STATE_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    AUTOMATIC_FIELD_NUMBER: _ClassVar[int]
    event_id: int
    node_id: str
    from_state: _common_pb2.NodeState
    to_state: _common_pb2.NodeState
    event: str
    reason: str
    at: _timestamp_pb2.Timestamp
    gpu_index: int
    automatic: bool
    def __init__(self, event_id: _Optional[int] = ..., node_id: _Optional[str] = ..., from_state: _Optional[_Union[_common_pb2.NodeState, str]] = ..., to_state: _Optional[_Union[_common_pb2.NodeState, str]] = ..., event: _Optional[str] = ..., reason: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., gpu_index: _Optional[int] = ..., automatic: _Optional[bool] = ...) -> None: ...

class UsageRecorded(_message.Message):
    __slots__ = ("idempotency_key", "allocation_id", "tenant_id", "gpu_model", "gpu_milli", "start", "end", "gpu_milli_seconds", "amount_micros", "currency")
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    GPU_MODEL_FIELD_NUMBER: _ClassVar[int]
    GPU_MILLI_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    GPU_MILLI_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MICROS_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    idempotency_key: str
    allocation_id: str
    tenant_id: str
    gpu_model: str
    gpu_milli: int
    start: _timestamp_pb2.Timestamp
    end: _timestamp_pb2.Timestamp
    gpu_milli_seconds: int
    amount_micros: int
    currency: str
    def __init__(self, idempotency_key: _Optional[str] = ..., allocation_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., gpu_model: _Optional[str] = ..., gpu_milli: _Optional[int] = ..., start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., gpu_milli_seconds: _Optional[int] = ..., amount_micros: _Optional[int] = ..., currency: _Optional[str] = ...) -> None: ...
