"""Bad input gets the documented status with google.rpc details, and the daemon keeps serving."""
from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gpuaas.v1 import node_pb2
from tests.node_daemon.conftest import drop_fault, stub_for


def _details(err: grpc.RpcError, kind):
    st = rpc_status.from_call(err)
    assert st is not None, "status details missing"
    out = []
    for d in st.details:
        if d.Is(kind.DESCRIPTOR):
            m = kind()
            d.Unpack(m)
            out.append(m)
    return out


def _still_serving(daemon):
    inv = stub_for(daemon).GetInventory(node_pb2.GetInventoryRequest(), timeout=5)
    assert len(inv.gpus) == len(daemon.inventory.gpus)


def test_cleanup_unknown_allocation_is_not_found(sim_daemon):
    """Cleanup of an allocation this node never prepared answers NOT_FOUND."""
    with pytest.raises(grpc.RpcError) as e:
        stub_for(sim_daemon).Cleanup(node_pb2.CleanupRequest(allocation_id="never-seen"), timeout=5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    _still_serving(sim_daemon)


@pytest.mark.parametrize("interval_ms,buffer,field", [(10, 0, "interval_ms"), (49, 0, "interval_ms"),
                                                      (-1, 0, "interval_ms"), (100, 1025, "buffer_frames_max"),
                                                      (100, -3, "buffer_frames_max")])
def test_stream_bad_interval_or_buffer_is_invalid_argument(sim_daemon, interval_ms, buffer, field):
    """An interval below 50 ms (or negative) or a buffer outside 0..1024 is INVALID_ARGUMENT naming the field."""
    with pytest.raises(grpc.RpcError) as e:
        next(stub_for(sim_daemon).StreamTelemetry(
            node_pb2.StreamTelemetryRequest(interval_ms=interval_ms, buffer_frames_max=buffer), timeout=5))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    br = _details(e.value, error_details_pb2.BadRequest)
    assert br and br[0].field_violations[0].field == field
    _still_serving(sim_daemon)


def test_stream_interval_zero_means_one_second(sim_daemon):
    """interval_ms=0 is the documented default of 1000 ms, not an error."""
    import time

    call = stub_for(sim_daemon).StreamTelemetry(node_pb2.StreamTelemetryRequest(interval_ms=0), timeout=10)
    it = iter(call)
    next(it)
    t0 = time.monotonic()
    next(it)
    gap = time.monotonic() - t0
    call.cancel()
    assert 0.8 <= gap <= 1.5, gap


@pytest.mark.parametrize("req,field", [
    (node_pb2.PrepareRequest(allocation_id="", gpu_indices=[0]), "allocation_id"),
    (node_pb2.PrepareRequest(allocation_id="x" * 129, gpu_indices=[0]), "allocation_id"),
    (node_pb2.PrepareRequest(allocation_id="a", gpu_indices=[]), "gpu_indices"),
    (node_pb2.PrepareRequest(allocation_id="a", gpu_indices=[0, 0]), "gpu_indices"),
    (node_pb2.PrepareRequest(allocation_id="a", gpu_indices=[7]), "gpu_indices"),
    (node_pb2.PrepareRequest(allocation_id="a", gpu_indices=[-1]), "gpu_indices"),
    (node_pb2.PrepareRequest(allocation_id="a", gpu_indices=[0], gpu_milli=1001), "gpu_milli"),
    (node_pb2.PrepareRequest(allocation_id="a", gpu_indices=[0, 1], gpu_milli=500), "gpu_milli"),
])
def test_prepare_malformed_is_invalid_argument(sim_daemon, req, field):
    """A malformed Prepare (bad id, no/duplicate/unknown GPUs, bad share) is INVALID_ARGUMENT naming the field."""
    with pytest.raises(grpc.RpcError) as e:
        stub_for(sim_daemon).Prepare(req, timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = [v.field for br in _details(e.value, error_details_pb2.BadRequest) for v in br.field_violations]
    assert field in fields
    assert not sim_daemon.allocations.live()
    _still_serving(sim_daemon)


def test_prepare_same_id_different_body_is_already_exists(sim_daemon):
    """Prepare is idempotent per allocation_id; the same id with other GPUs is ALREADY_EXISTS."""
    stub = stub_for(sim_daemon)
    stub.Prepare(node_pb2.PrepareRequest(allocation_id="a1", gpu_indices=[0]), timeout=5)
    with pytest.raises(grpc.RpcError) as e:
        stub.Prepare(node_pb2.PrepareRequest(allocation_id="a1", gpu_indices=[1]), timeout=5)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_prepare_on_unhealthy_gpu_is_failed_precondition(sim_daemon):
    """Prepare touching a GPU with a fatal XID is FAILED_PRECONDITION with a PreconditionFailure naming the GPU."""
    drop_fault(sim_daemon, {"fault": "xid", "gpu": 2, "xid": 48})
    from tests.node_daemon.conftest import wait_for
    from gpuaas.lifecycle import GpuState
    wait_for(lambda: sim_daemon.health.state(2)[0] is GpuState.UNHEALTHY)
    stub = stub_for(sim_daemon)
    with pytest.raises(grpc.RpcError) as e:
        stub.Prepare(node_pb2.PrepareRequest(allocation_id="a2", gpu_indices=[1, 2]), timeout=5)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    pf = _details(e.value, error_details_pb2.PreconditionFailure)
    assert pf and [v.subject for v in pf[0].violations] == ["gpu/2"]
    assert "XID 48" in pf[0].violations[0].description
    # the healthy GPUs still serve
    assert stub.Prepare(node_pb2.PrepareRequest(allocation_id="a3", gpu_indices=[1]), timeout=5).cuda_visible_devices == "1"


def test_prepare_overcommit_is_failed_precondition(sim_daemon):
    """Two fractional allocations may share a GPU up to 1000 milli; more is refused."""
    stub = stub_for(sim_daemon)
    stub.Prepare(node_pb2.PrepareRequest(allocation_id="f1", gpu_indices=[0], gpu_milli=600), timeout=5)
    stub.Prepare(node_pb2.PrepareRequest(allocation_id="f2", gpu_indices=[0], gpu_milli=400), timeout=5)
    with pytest.raises(grpc.RpcError) as e:
        stub.Prepare(node_pb2.PrepareRequest(allocation_id="f3", gpu_indices=[0], gpu_milli=1), timeout=5)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # Cleanup of one sharer leaves the other's processes alone
    r = stub.Cleanup(node_pb2.CleanupRequest(allocation_id="f1"), timeout=5)
    assert r.processes_ended == 0 and "shared" in r.message


def test_garbage_bytes_and_huge_payload_do_not_stop_the_daemon(sim_daemon):
    """Undecodable and oversized requests fail with a defined status (never UNKNOWN) and the daemon keeps serving."""
    ch = grpc.insecure_channel(sim_daemon.address)
    raw = ch.unary_unary("/gpuaas.v1.NodeAgent/Prepare", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as e:
        raw(b"\xff\xff\xff\xff\x0f garbage", timeout=5)
    assert e.value.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.OK)
    with pytest.raises(grpc.RpcError) as e:
        stub_for(sim_daemon).Prepare(node_pb2.PrepareRequest(allocation_id="a", gpu_indices=[0],
                                                             tenant_id="t" * (2 * 1024 * 1024)), timeout=5)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _still_serving(sim_daemon)


def test_unexpected_exception_becomes_internal_not_unknown(sim_daemon, monkeypatch):
    """A bug inside a handler answers INTERNAL with a short message (no stack trace), and the next call works."""
    def broken():
        raise RuntimeError("boom: secret internals")
    monkeypatch.setattr(sim_daemon.health, "states", broken)
    with pytest.raises(grpc.RpcError) as e:
        stub_for(sim_daemon).Health(node_pb2.HealthRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in e.value.details() and "Traceback" not in e.value.details()
    monkeypatch.undo()
    assert stub_for(sim_daemon).Health(node_pb2.HealthRequest(), timeout=5).healthy
