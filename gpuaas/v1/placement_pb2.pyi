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

class PlaceRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: _common_pb2.PlacementRequest
    def __init__(self, request: _Optional[_Union[_common_pb2.PlacementRequest, _Mapping]] = ...) -> None: ...

class PlaceResponse(_message.Message):
    __slots__ = ("allocation", "existing")
    ALLOCATION_FIELD_NUMBER: _ClassVar[int]
    EXISTING_FIELD_NUMBER: _ClassVar[int]
    allocation: _common_pb2.Allocation
    existing: bool
    def __init__(self, allocation: _Optional[_Union[_common_pb2.Allocation, _Mapping]] = ..., existing: _Optional[bool] = ...) -> None: ...

class PlaceBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[_common_pb2.PlacementRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[_common_pb2.PlacementRequest, _Mapping]]] = ...) -> None: ...

class PlaceResult(_message.Message):
    __slots__ = ("allocation", "error", "existing")
    ALLOCATION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    EXISTING_FIELD_NUMBER: _ClassVar[int]
    allocation: _common_pb2.Allocation
    error: _status_pb2.Status
    existing: bool
    def __init__(self, allocation: _Optional[_Union[_common_pb2.Allocation, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., existing: _Optional[bool] = ...) -> None: ...

class PlaceBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PlaceResult]
    def __init__(self, results: _Optional[_Iterable[_Union[PlaceResult, _Mapping]]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("allocation_id",)
    ALLOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    allocation_id: str
    def __init__(self, allocation_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("allocation",)
    ALLOCATION_FIELD_NUMBER: _ClassVar[int]
    allocation: _common_pb2.Allocation
    def __init__(self, allocation: _Optional[_Union[_common_pb2.Allocation, _Mapping]] = ...) -> None: ...

class ReleaseBatchRequest(_message.Message):
    __slots__ = ("allocation_ids",)
    ALLOCATION_IDS_FIELD_NUMBER: _ClassVar[int]
    allocation_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, allocation_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ReleaseResult(_message.Message):
    __slots__ = ("allocation", "error")
    ALLOCATION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    allocation: _common_pb2.Allocation
    error: _status_pb2.Status
    def __init__(self, allocation: _Optional[_Union[_common_pb2.Allocation, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class ReleaseBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ReleaseResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ReleaseResult, _Mapping]]] = ...) -> None: ...

class GetAllocationRequest(_message.Message):
    __slots__ = ("allocation_id",)
    ALLOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    allocation_id: str
    def __init__(self, allocation_id: _Optional[str] = ...) -> None: ...

class ListAllocationsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "states")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    states: _containers.RepeatedScalarFieldContainer[_common_pb2.AllocationState]
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., states: _Optional[_Iterable[_Union[_common_pb2.AllocationState, str]]] = ...) -> None: ...

class ListAllocationsResponse(_message.Message):
    __slots__ = ("allocations", "next_page_token")
    ALLOCATIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    allocations: _containers.RepeatedCompositeFieldContainer[_common_pb2.Allocation]
    next_page_token: str
    def __init__(self, allocations: _Optional[_Iterable[_Union[_common_pb2.Allocation, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchAllocationsRequest(_message.Message):
    __slots__ = ("allocation_ids", "after_event_id")
    ALLOCATION_IDS_FIELD_NUMBER: _ClassVar[int]
    AFTER_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    allocation_ids: _containers.RepeatedScalarFieldContainer[str]
    after_event_id: int
    def __init__(self, allocation_ids: _Optional[_Iterable[str]] = ..., after_event_id: _Optional[int] = ...) -> None: ...

class AllocationEvent(_message.Message):
    __slots__ = ("event_id", "allocation_id", "from_state", "to_state", "reason", "at", "allocation")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_STATE_FIELD_NUMBER: _ClassVar[int]
    TO_STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_FIELD_NUMBER: _ClassVar[int]
    event_id: int
    allocation_id: str
    from_state: _common_pb2.AllocationState
    to_state: _common_pb2.AllocationState
    reason: str
    at: _timestamp_pb2.Timestamp
    allocation: _common_pb2.Allocation
    def __init__(self, event_id: _Optional[int] = ..., allocation_id: _Optional[str] = ..., from_state: _Optional[_Union[_common_pb2.AllocationState, str]] = ..., to_state: _Optional[_Union[_common_pb2.AllocationState, str]] = ..., reason: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., allocation: _Optional[_Union[_common_pb2.Allocation, _Mapping]] = ...) -> None: ...
