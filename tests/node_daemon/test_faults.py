"""Fault injection through --fault-dir reaches the telemetry stream and the daemon's health view."""
from __future__ import annotations

import time

import grpc

from gpuaas.lifecycle import GpuState
from gpuaas.v1 import common_pb2, node_pb2
from node_daemon.backend import THROTTLE_HW_THERMAL
from tests.node_daemon.conftest import drop_fault, stub_for, wait_for


def _stream(d, interval_ms=100):
    """A live stream: its first frame has arrived, so the server has subscribed it before any fault
    is injected (an XID raised before a consumer subscribes is in the health view, not in its stream)."""
    call = stub_for(d).StreamTelemetry(node_pb2.StreamTelemetryRequest(interval_ms=interval_ms), timeout=30)
    next(call)
    return call


def _until(call, pred, limit=60):
    for i, f in enumerate(call):
        if pred(f):
            return f
        if i >= limit:
            break
    raise AssertionError("expected frame did not arrive")


def test_injected_xid_appears_in_stream_and_takes_gpu_out(sim_daemon):
    """An XID file dropped in --fault-dir is applied, removed, streamed as an XidEvent and makes that GPU UNHEALTHY."""
    call = _stream(sim_daemon)
    next(iter(call))
    drop_fault(sim_daemon, {"fault": "xid", "gpu": 3, "xid": 79, "message": "test"})
    f = _until(call, lambda f: f.xid_events)
    call.cancel()
    x = f.xid_events[0]
    assert (x.gpu_index, x.xid, x.message) == (3, 79, "test") and x.at.seconds > 0
    h = stub_for(sim_daemon).Health(node_pb2.HealthRequest(), timeout=5)
    assert not h.healthy and h.gpus[3].state == common_pb2.GPU_STATE_UNHEALTHY and "79" in h.gpus[3].reason
    assert all(g.state == common_pb2.GPU_STATE_READY for g in h.gpus if g.index != 3)


def test_application_xid_keeps_gpu_in_service(sim_daemon):
    """An application XID (13) is streamed but does not make the GPU unhealthy."""
    call = _stream(sim_daemon)
    drop_fault(sim_daemon, {"fault": "xid", "gpu": 1, "xid": 13})
    f = _until(call, lambda f: f.xid_events)
    call.cancel()
    assert f.xid_events[0].xid == 13
    assert sim_daemon.health.state(1)[0] is GpuState.READY


def test_uncorrectable_ecc_counts_and_xid48(sim_daemon):
    """An uncorrectable ECC fault raises the volatile/aggregate counters, retires a page and emits XID 48."""
    call = _stream(sim_daemon)
    drop_fault(sim_daemon, {"fault": "ecc_uncorrectable", "gpu": 0, "count": 2})
    f = _until(call, lambda f: f.samples[0].ecc_volatile_uncorrected > 0 and f.xid_events)
    call.cancel()
    s = f.samples[0]
    assert (s.ecc_volatile_uncorrected, s.ecc_aggregate_uncorrected, s.retired_pages) == (2, 2, 1)
    assert [x.xid for x in f.xid_events] == [48]
    assert sim_daemon.health.state(0)[0] is GpuState.UNHEALTHY


def test_thermal_trip_then_clear(sim_daemon):
    """A thermal trip shows as HW thermal slowdown and a hot GPU (UNHEALTHY); `clear` brings it back READY."""
    call = _stream(sim_daemon)
    drop_fault(sim_daemon, {"fault": "thermal_trip", "gpu": 2})
    f = _until(call, lambda f: f.samples[2].throttle_reasons & THROTTLE_HW_THERMAL)
    assert f.samples[2].temperature_c >= 92
    wait_for(lambda: sim_daemon.health.state(2)[0] is GpuState.UNHEALTHY)
    drop_fault(sim_daemon, {"fault": "clear", "gpu": 2}, name="g")
    _until(call, lambda f: not f.samples[2].throttle_reasons & THROTTLE_HW_THERMAL)
    call.cancel()
    wait_for(lambda: sim_daemon.health.state(2)[0] is GpuState.READY)


def test_fall_off_bus_marks_lost_with_xid79(sim_daemon):
    """A GPU falling off the bus streams XID 79 and then samples with lost=true and zeroed metrics."""
    stub_for(sim_daemon).Prepare(node_pb2.PrepareRequest(allocation_id="a", gpu_indices=[1]), timeout=5)
    call = _stream(sim_daemon)
    drop_fault(sim_daemon, {"fault": "fall_off_bus", "gpu": 1})
    f = _until(call, lambda f: f.samples[1].lost)
    call.cancel()
    assert f.samples[1].gpu_util_pct == 0 and f.samples[1].power_mw == 0
    assert not f.samples[0].lost
    assert sim_daemon.health.state(1)[0] is GpuState.UNHEALTHY


def test_freeze_silences_stream_but_process_answers(sim_daemon):
    """A freeze stops frames (the control plane sees silence) while the process lives; frames resume afterwards."""
    call = _stream(sim_daemon, interval_ms=50)
    it = iter(call)
    next(it)
    drop_fault(sim_daemon, {"fault": "freeze", "seconds": 1.0})
    t0 = time.monotonic()
    # at most a frame or two already in flight, then silence until the freeze ends
    gaps = []
    last = time.monotonic()
    for _ in range(6):
        next(it)
        now = time.monotonic()
        gaps.append(now - last)
        last = now
    call.cancel()
    assert max(gaps) >= 0.7, gaps
    assert time.monotonic() - t0 >= 0.9
    assert stub_for(sim_daemon).Health(node_pb2.HealthRequest(), timeout=5).healthy


def test_bad_fault_file_is_rejected_and_daemon_continues(sim_daemon):
    """A malformed fault file is renamed .rejected with a reason; later good files still apply."""
    import pathlib

    d = pathlib.Path(sim_daemon.config.fault_dir)
    # Written under a hidden name and renamed, as the fault directory's protocol asks: a file written
    # in place can be read half-written by the next poll, and then rejected for the wrong reason.
    for name, text in (("bad.json", '{"fault": "xid", "gpu": 99, "xid": 79}'), ("worse.json", "not json")):
        (d / f".{name}.tmp").write_text(text)
        (d / f".{name}.tmp").rename(d / name)
    wait_for(lambda: all((d / f).exists() for f in ("bad.json.rejected", "worse.json.rejected",
                                                    "bad.json.rejected.reason", "worse.json.rejected.reason")))
    assert "gpu" in (d / "bad.json.rejected.reason").read_text()
    drop_fault(sim_daemon, {"fault": "xid", "gpu": 0, "xid": 31}, name="ok")
    assert sim_daemon.faults.applied == 1 and sim_daemon.faults.rejected == 2
