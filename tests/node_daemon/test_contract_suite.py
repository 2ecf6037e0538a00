"""The NodeAgent contract suite: the same checks against every backend.

The simulated backend always runs; the NVML backend runs only where NVML
initializes (a machine with an NVIDIA GPU) and is skipped elsewhere.
"""
from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpuaas.v1 import common_pb2, node_pb2
from node_daemon.daemon import BackendChoice
from tests.node_daemon.conftest import nvml_available, stub_for


@pytest.fixture(params=["simulated", "nvml"])
def any_daemon(request, daemon_factory):
    if request.param == "nvml" and not nvml_available():
        pytest.skip("no NVIDIA GPU / NVML on this machine")
    return daemon_factory(backend=BackendChoice(request.param), labels={"zone": "a"}, cpu_milli=8000,
                          memory_mib=65536)


def test_inventory_is_complete(any_daemon):
    """GetInventory lists every GPU with a unique UUID, a model, memory and an NVLink island, and names its backend."""
    inv = stub_for(any_daemon).GetInventory(node_pb2.GetInventoryRequest(), timeout=5)
    assert inv.node_name == any_daemon.config.node_name and inv.hostname
    assert inv.backend in ("nvml", "simulated") and inv.simulated == (inv.backend == "simulated")
    assert inv.driver_version and inv.cpu_milli == 8000 and inv.memory_mib == 65536 and inv.labels["zone"] == "a"
    assert len(inv.gpus) >= 1
    assert [g.index for g in inv.gpus] == list(range(len(inv.gpus)))
    assert len({g.uuid for g in inv.gpus}) == len(inv.gpus) and all(g.uuid.startswith("GPU-") for g in inv.gpus)
    assert all(g.model and g.name and g.memory_mib > 1024 and g.pci_bus_id for g in inv.gpus)
    assert all(0 <= g.nvlink_island < len(inv.gpus) for g in inv.gpus)


def test_stream_delivers_one_sample_per_gpu_in_order(any_daemon):
    """StreamTelemetry sends frames at the interval, seq increasing, one sample per GPU, stamped with time."""
    stub = stub_for(any_daemon)
    n = len(stub.GetInventory(node_pb2.GetInventoryRequest(), timeout=5).gpus)
    frames, t0 = [], time.monotonic()
    call = stub.StreamTelemetry(node_pb2.StreamTelemetryRequest(interval_ms=100), timeout=10)
    for f in call:
        frames.append(f)
        if len(frames) == 5:
            call.cancel()
            break
    elapsed = time.monotonic() - t0
    assert [f.seq for f in frames] == [1, 2, 3, 4, 5]
    assert 0.3 <= elapsed <= 3.0, elapsed
    for f in frames:
        assert f.node_name == any_daemon.config.node_name and f.at.seconds > 0 and f.dropped_frames == 0
        assert [s.index for s in f.samples] == list(range(n))
        assert all(s.uuid for s in f.samples) and all(not s.lost for s in f.samples)
    assert frames[-1].samples[0].energy_mj >= frames[0].samples[0].energy_mj


def test_prepare_and_cleanup_roundtrip_idempotent(any_daemon):
    """Prepare answers CUDA_VISIBLE_DEVICES and is idempotent; Cleanup ends the allocation and is idempotent too."""
    stub = stub_for(any_daemon)
    n = len(stub.GetInventory(node_pb2.GetInventoryRequest(), timeout=5).gpus)
    gpus = [0, n - 1] if n > 1 else [0]
    if any_daemon.backend.name == "nvml" and any(any_daemon.backend.processes(i) for i in gpus):
        pytest.skip("GPUs busy with other processes: Cleanup would end them")
    req = node_pb2.PrepareRequest(allocation_id="alloc-contract-1", gpu_indices=gpus, gpu_milli=1000, tenant_id="t")
    first = stub.Prepare(req, timeout=5)
    assert first.cuda_visible_devices == ",".join(map(str, gpus))
    assert stub.Prepare(req, timeout=5).cuda_visible_devices == first.cuda_visible_devices
    c1 = stub.Cleanup(node_pb2.CleanupRequest(allocation_id="alloc-contract-1"), timeout=30)
    assert c1.processes_ended >= 0 and c1.message
    c2 = stub.Cleanup(node_pb2.CleanupRequest(allocation_id="alloc-contract-1"), timeout=5)
    assert c2.processes_ended == 0 and "already" in c2.message


def test_batch_prepare_and_cleanup(any_daemon):
    """PrepareBatch and CleanupBatch answer per item in order; on NVML the cleanups run side by side."""
    stub = stub_for(any_daemon)
    n = len(stub.GetInventory(node_pb2.GetInventoryRequest(), timeout=5).gpus)
    gpus = sorted({0, n - 1})
    if any_daemon.backend.name == "nvml" and any(any_daemon.backend.processes(i) for i in gpus):
        pytest.skip("GPUs busy with other processes: Cleanup would end them")
    ids = [f"alloc-contract-b{g}" for g in gpus]
    prep = stub.PrepareBatch(node_pb2.PrepareBatchRequest(requests=[
        node_pb2.PrepareRequest(allocation_id=a, gpu_indices=[g], gpu_milli=500, tenant_id="t")
        for a, g in zip(ids, gpus)]), timeout=10)
    assert [r.response.cuda_visible_devices for r in prep.results] == [str(g) for g in gpus]
    out = stub.CleanupBatch(node_pb2.CleanupBatchRequest(
        requests=[node_pb2.CleanupRequest(allocation_id=a) for a in ids + ["alloc-contract-never"]]), timeout=30)
    assert [r.allocation_id for r in out.results] == ids + ["alloc-contract-never"]
    assert all(not r.HasField("error") and r.response.message for r in out.results[:-1])
    assert out.results[-1].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert not {a.allocation_id for a in any_daemon.allocations.live()} & set(ids)


def test_health_and_standard_health_service(any_daemon):
    """Health lists every GPU READY on a fresh daemon and grpc.health.v1 answers SERVING for NodeAgent."""
    ch = grpc.insecure_channel(any_daemon.address)
    h = stub_for(any_daemon).Health(node_pb2.HealthRequest(), timeout=5)
    assert h.healthy and h.gpus and all(g.state == common_pb2.GPU_STATE_READY for g in h.gpus)
    std = health_pb2_grpc.HealthStub(ch)
    for service in ("", "gpuaas.v1.NodeAgent"):
        r = std.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
