"""The gRPC NodeAgent server (plus the standard grpc.health.v1 service).

Every handler converts the request to domain values, calls the daemon, and
converts back. Domain errors (gpuaas.errors) become their status with
google.rpc details; anything else is a bug: logged with a reference and
answered INTERNAL with a short message — never UNKNOWN, never a stack trace.
"""
from __future__ import annotations

import functools
import logging
import threading
import uuid
from concurrent import futures
from typing import TYPE_CHECKING

import grpc
from google.rpc import code_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from gpuaas.errors import GpuaasError, InvalidArgument, ResourceExhausted, Unavailable
from gpuaas.lifecycle import GpuState
from gpuaas.v1 import node_pb2, node_pb2_grpc
from node_daemon import convert
from node_daemon.telemetry import StreamBuffer

if TYPE_CHECKING:
    from node_daemon.daemon import NodeDaemon

log = logging.getLogger("gpuaas.node_daemon.server")

INTERVAL_MS_MIN = 50
INTERVAL_MS_DEFAULT = 1000
INTERVAL_MS_MAX = 3_600_000
BUFFER_FRAMES_DEFAULT = 64
BUFFER_FRAMES_MAX = 1024
STREAMS_MAX = 16
RPCS_CONCURRENT_MAX = 256
MESSAGE_BYTES_MAX = 1024 * 1024
PREPARE_BATCH_MAX = 4096
CLEANUP_BATCH_MAX = 4096
# Items of one CleanupBatch cleaned up side by side when the backend may wait for processes to end.
CLEANUP_PARALLEL_MAX = 16
# A stream's handler sleeps until a frame or its buffer closes (client gone, daemon stopping:
# both close the buffer); this timeout is only a safety net, so it is long — with many
# streams a short poll is thousands of needless thread wake-ups a second.
STREAM_POLL_S = 5.0
SERVICE_NAME = "gpuaas.v1.NodeAgent"


def _internal(exc: BaseException) -> status_pb2.Status:
    ref = uuid.uuid4().hex[:8]
    log.exception("internal error (ref %s): %s", ref, exc)
    return status_pb2.Status(code=code_pb2.INTERNAL, message=f"internal error (ref {ref}); see the node daemon's log")


def _check_batch(rpc: str, items, limit: int) -> None:
    """A batch RPC's own checks: 1..limit items, allocation ids unique (else INVALID_ARGUMENT, and no
    item is acted on). Each item's own checks are its single RPC's, answered per item."""
    v: list[tuple[str, str]] = []
    if not 1 <= len(items) <= limit:
        v.append(("requests", f"1..{limit} items; got {len(items)}"))
    seen: set[str] = set()
    for k, r in enumerate(items):
        if r.allocation_id in seen:
            v.append((f"requests[{k}].allocation_id", f"{r.allocation_id!r} appears twice in the batch"))
            break
        seen.add(r.allocation_id)
    if v:
        raise InvalidArgument(f"invalid {rpc}: {v[0][0]}: {v[0][1]}", violations=v)


def unary(fn):
    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except GpuaasError as err:
            log.info("%s → %s: %s", fn.__name__, err.code.name, err.message)
            context.abort_with_status(rpc_status.to_status(err.to_status()))
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            context.abort_with_status(rpc_status.to_status(_internal(exc)))
    return wrapper


def stream(fn):
    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            yield from fn(self, request, context)
        except GpuaasError as err:
            log.info("%s → %s: %s", fn.__name__, err.code.name, err.message)
            context.abort_with_status(rpc_status.to_status(err.to_status()))
        except Exception as exc:  # noqa: BLE001
            context.abort_with_status(rpc_status.to_status(_internal(exc)))
    return wrapper


def validate_stream_request(interval_ms: int, buffer_frames_max: int) -> tuple[int, int]:
    v: list[tuple[str, str]] = []
    if interval_ms != 0 and not INTERVAL_MS_MIN <= interval_ms <= INTERVAL_MS_MAX:
        v.append(("interval_ms", f"0 (meaning {INTERVAL_MS_DEFAULT}) or {INTERVAL_MS_MIN}..{INTERVAL_MS_MAX}; "
                                 f"got {interval_ms}"))
    if not 0 <= buffer_frames_max <= BUFFER_FRAMES_MAX:
        v.append(("buffer_frames_max", f"0 (meaning {BUFFER_FRAMES_DEFAULT}) or 1..{BUFFER_FRAMES_MAX}; "
                                       f"got {buffer_frames_max}"))
    if v:
        raise InvalidArgument(f"invalid StreamTelemetry: {v[0][0]}: {v[0][1]}", violations=v)
    return interval_ms or INTERVAL_MS_DEFAULT, buffer_frames_max or BUFFER_FRAMES_DEFAULT


class NodeAgentServicer(node_pb2_grpc.NodeAgentServicer):
    def __init__(self, daemon: "NodeDaemon"):
        self.daemon = daemon
        self._lock = threading.Lock()
        self.buffers: set[StreamBuffer] = set()
        self._pool_lock = threading.Lock()
        self._pool: futures.ThreadPoolExecutor | None = None  # CleanupBatch's, made on first need

    def close_streams(self) -> None:
        """End every telemetry stream now (the daemon is stopping)."""
        with self._lock:
            buffers = list(self.buffers)
        for buf in buffers:
            buf.close()

    @unary
    def GetInventory(self, request, context):
        return self.daemon.inventory_pb()

    @stream
    def StreamTelemetry(self, request, context):
        interval_ms, frames_max = validate_stream_request(request.interval_ms, request.buffer_frames_max)
        d = self.daemon
        if d.closing:
            raise Unavailable("the node daemon is shutting down")
        buf = StreamBuffer(frames_max)
        with self._lock:
            if len(self.buffers) >= STREAMS_MAX:
                raise ResourceExhausted(f"at most {STREAMS_MAX} telemetry streams per node")
            self.buffers.add(buf)
        sub = d.hub.subscribe()
        stop = threading.Event()
        context.add_callback(lambda: (stop.set(), sub.wake.set(), buf.close()))
        producer = threading.Thread(target=d.hub.produce, args=(sub, buf, interval_ms / 1000, stop),
                                    name="telemetry-producer", daemon=True)
        producer.start()
        peer = context.peer()
        log.info("telemetry stream opened by %s (every %d ms, buffer %d frames)", peer, interval_ms, frames_max)
        try:
            while not stop.is_set() and not d.closing and context.is_active():
                frame = buf.get(STREAM_POLL_S)
                if frame is not None:
                    yield convert.frame_pb(frame, d.config.node_name, not request.omit_processes)
        finally:
            stop.set()
            sub.wake.set()
            buf.close()
            d.hub.unsubscribe(sub)
            with self._lock:
                self.buffers.discard(buf)
            log.info("telemetry stream of %s closed (%d frames dropped for it)", peer, buf.dropped_total)

    @unary
    def Prepare(self, request, context):
        if self.daemon.call_faults.take("prepare_fail"):
            raise Unavailable("injected prepare failure")
        alloc = self.daemon.allocations.prepare(request.allocation_id, list(request.gpu_indices),
                                                request.gpu_milli, request.tenant_id)
        log.info("prepared allocation %s on GPUs %s (%d milli, tenant %s)", request.allocation_id,
                 alloc.cuda_visible_devices, alloc.gpu_milli, request.tenant_id or "-")
        return node_pb2.PrepareResponse(cuda_visible_devices=alloc.cuda_visible_devices,
                                        message=f"prepared on GPUs {alloc.cuda_visible_devices}")

    @unary
    def PrepareBatch(self, request, context):
        items = request.requests
        _check_batch("PrepareBatch", items, PREPARE_BATCH_MAX)
        results = []
        for r in items:
            # Each item is exactly its own Prepare: same checks, same answer, same injected faults.
            try:
                if self.daemon.call_faults.take("prepare_fail"):
                    raise Unavailable("injected prepare failure")
                alloc = self.daemon.allocations.prepare(r.allocation_id, list(r.gpu_indices), r.gpu_milli,
                                                        r.tenant_id)
                results.append(node_pb2.PrepareResult(allocation_id=r.allocation_id, response=node_pb2.PrepareResponse(
                    cuda_visible_devices=alloc.cuda_visible_devices,
                    message=f"prepared on GPUs {alloc.cuda_visible_devices}")))
            except GpuaasError as err:
                results.append(node_pb2.PrepareResult(allocation_id=r.allocation_id, error=err.to_status()))
        failed = sum(1 for x in results if x.HasField("error"))
        log.info("PrepareBatch: %d prepared, %d refused", len(results) - failed, failed)
        return node_pb2.PrepareBatchResponse(results=results)

    @unary
    def Cleanup(self, request, context):
        return self._cleanup(request.allocation_id)

    def _cleanup(self, allocation_id: str) -> node_pb2.CleanupResponse:
        """One Cleanup, alone or as an item of a CleanupBatch: same checks, same injected faults."""
        if self.daemon.call_faults.take("cleanup_fail"):
            raise Unavailable("injected cleanup failure")
        r = self.daemon.allocations.cleanup(allocation_id, grace_s=self.daemon.config.cleanup_grace_s)
        return node_pb2.CleanupResponse(processes_ended=r.processes_ended, message=r.message)

    @unary
    def CleanupBatch(self, request, context):
        items = request.requests
        _check_batch("CleanupBatch", items, CLEANUP_BATCH_MAX)

        def one(r):
            try:  # each item is exactly its own Cleanup
                return node_pb2.CleanupResult(allocation_id=r.allocation_id, response=self._cleanup(r.allocation_id))
            except GpuaasError as err:
                return node_pb2.CleanupResult(allocation_id=r.allocation_id, error=err.to_status())

        if len(items) > 1 and self.daemon.backend.process_end_waits:
            results = list(self._cleanup_pool().map(one, items))
        else:
            results = [one(r) for r in items]
        failed = sum(1 for x in results if x.HasField("error"))
        log.info("CleanupBatch: %d cleaned up, %d refused", len(results) - failed, failed)
        return node_pb2.CleanupBatchResponse(results=results)

    def close_pool(self) -> None:
        """After the server has stopped: end CleanupBatch's threads."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)

    def _cleanup_pool(self) -> futures.ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = futures.ThreadPoolExecutor(CLEANUP_PARALLEL_MAX, thread_name_prefix="cleanup")
            return self._pool

    @unary
    def Health(self, request, context):
        states = self.daemon.health.states()
        return node_pb2.HealthResponse(
            healthy=all(s is GpuState.READY for _, s, _ in states),
            gpus=[node_pb2.GpuHealth(index=i, state=s.value, reason=r) for i, s, r in states])


def build_server(daemon: "NodeDaemon", listen: str) -> tuple[grpc.Server, int, NodeAgentServicer,
                                                                health.HealthServicer]:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=STREAMS_MAX + 16, thread_name_prefix="rpc"),
        maximum_concurrent_rpcs=RPCS_CONCURRENT_MAX,
        options=[("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
                 ("grpc.max_send_message_length", 8 * MESSAGE_BYTES_MAX),
                 ("grpc.so_reuseport", 0)])
    servicer = NodeAgentServicer(daemon)
    node_pb2_grpc.add_NodeAgentServicer_to_server(servicer, server)
    hs = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    port = server.add_insecure_port(listen)
    if not port:
        raise OSError(f"cannot listen on {listen}")
    for name in ("", SERVICE_NAME):
        hs.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, servicer, hs
