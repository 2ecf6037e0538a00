"""One exception hierarchy for the control plane, and its mapping to gRPC.

    GpuaasError                       (retryable?)
    ├── InvalidArgument               no   INVALID_ARGUMENT + google.rpc.BadRequest
    ├── NotFound                      no   NOT_FOUND
    ├── AlreadyExists                 no   ALREADY_EXISTS (request_id reused, other body)
    ├── FailedPrecondition            no   FAILED_PRECONDITION (state machine forbids it)
    ├── ResourceExhausted             yes  RESOURCE_EXHAUSTED (quota, no capacity + fail-fast)
    ├── Unauthenticated               no   UNAUTHENTICATED
    ├── PermissionDenied              no   PERMISSION_DENIED
    └── Unavailable                   yes  UNAVAILABLE (database or actor briefly away)

Anything else raised in a handler is a bug: the servicer wrapper logs it and
answers INTERNAL with a short message, never a stack trace and never UNKNOWN.
"""
from __future__ import annotations

import functools
import logging
import uuid

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

log = logging.getLogger("gpuaas.errors")


class GpuaasError(Exception):
    code = grpc.StatusCode.INTERNAL
    retryable = False

    def __init__(self, message: str, *, violations: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.message = message
        self.violations = violations or []

    def to_status(self) -> status_pb2.Status:
        st = status_pb2.Status(code=self.code.value[0], message=self.message)
        if self.violations:
            br = error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in self.violations])
            detail = any_pb2.Any()
            detail.Pack(br)
            st.details.append(detail)
        if self.retryable:
            ri = error_details_pb2.RetryInfo()
            ri.retry_delay.FromMilliseconds(200)
            detail = any_pb2.Any()
            detail.Pack(ri)
            st.details.append(detail)
        return st


class InvalidArgument(GpuaasError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(GpuaasError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(GpuaasError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(GpuaasError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(GpuaasError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retryable = True


class Unauthenticated(GpuaasError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(GpuaasError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(GpuaasError):
    code = grpc.StatusCode.UNAVAILABLE
    retryable = True


def abort(context: grpc.ServicerContext, err: GpuaasError):
    context.abort_with_status(rpc_status.to_status(err.to_status()))


def internal_status(exc: BaseException) -> status_pb2.Status:
    ref = uuid.uuid4().hex[:8]
    log.exception("internal error (ref %s): %s", ref, exc)
    return status_pb2.Status(code=code_pb2.INTERNAL, message=f"internal error (ref {ref}); see control-plane logs")


def grpc_handler(fn):
    """Wrap a unary servicer method: domain errors → their status; bugs → INTERNAL."""

    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except GpuaasError as err:
            abort(context, err)
        except Exception as exc:  # noqa: BLE001 - the last line of defence (handlers raise GpuaasError, never abort)
            context.abort_with_status(rpc_status.to_status(internal_status(exc)))

    return wrapper


def grpc_stream_handler(fn):
    """Same as grpc_handler, for server-streaming methods (generators)."""

    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            yield from fn(self, request, context)
        except GpuaasError as err:
            abort(context, err)
        except Exception as exc:  # noqa: BLE001
            context.abort_with_status(rpc_status.to_status(internal_status(exc)))

    return wrapper


def from_rpc_error(err: grpc.RpcError) -> tuple[grpc.StatusCode, str, list[tuple[str, str]]]:
    """Client side: (code, message, field violations) of a failed call."""
    st = rpc_status.from_call(err)
    violations: list[tuple[str, str]] = []
    if st is not None:
        for d in st.details:
            if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                br = error_details_pb2.BadRequest()
                d.Unpack(br)
                violations += [(v.field, v.description) for v in br.field_violations]
    return err.code(), err.details() or "", violations
