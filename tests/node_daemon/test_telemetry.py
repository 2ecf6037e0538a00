"""Telemetry streams: bounded per-stream buffers, drop-oldest with a count, faults never dropped."""
from __future__ import annotations

import time

import grpc

from gpuaas.v1 import node_pb2, node_pb2_grpc
from node_daemon.backend import GpuSample, XidRecord
from node_daemon.telemetry import Frame, StreamBuffer
from tests.node_daemon.conftest import drop_fault

# A client whose HTTP/2 window is tiny, so the transport cannot hide a slow reader.
SLOW_CLIENT = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]


def _frame(seq, xids=()):
    return Frame(seq, float(seq), [GpuSample(index=0, uuid="u")], list(xids))


def test_buffer_drops_oldest_and_counts():
    """A full buffer drops its oldest frame; the next delivered frame carries how many were dropped."""
    b = StreamBuffer(3)
    for s in range(1, 11):
        b.put(_frame(s))
    assert len(b) == 3
    got = [b.get(0) for _ in range(3)]
    assert [f.seq for f in got] == [8, 9, 10]
    assert [f.dropped_frames for f in got] == [7, 0, 0]
    assert b.get(0) is None and b.dropped_total == 7


def test_buffer_carries_xids_of_dropped_frames_forward():
    """XID events in a dropped frame move to the next frame: a slow consumer loses samples, never faults."""
    b = StreamBuffer(2)
    b.put(_frame(1, [XidRecord(0, 79, 1.0)]))
    b.put(_frame(2))
    b.put(_frame(3, [XidRecord(1, 48, 3.0)]))  # drops 1 → its XID moves into 2
    b.put(_frame(4))  # drops 2 → XIDs 79 move into 3
    f3, f4 = b.get(0), b.get(0)
    assert f3.seq == 3 and [x.xid for x in f3.xids] == [79, 48] and f3.dropped_frames == 2
    assert f4.xids == []


def test_slow_consumer_drops_frames_and_memory_stays_bounded(daemon_factory):
    """A consumer that stops reading makes the daemon drop old frames (counted in dropped_frames, seq gaps match)
    while its buffer never exceeds buffer_frames_max; an XID injected meanwhile still arrives."""
    d = daemon_factory(gpus=64)
    stub = node_pb2_grpc.NodeAgentStub(grpc.insecure_channel(d.address, options=SLOW_CLIENT))
    call = stub.StreamTelemetry(node_pb2.StreamTelemetryRequest(interval_ms=50, buffer_frames_max=4), timeout=30)
    it = iter(call)
    frames = [next(it)]
    lengths = []
    drop_fault(d, {"fault": "xid", "gpu": 5, "xid": 94})
    for _ in range(25):  # 2.5 s without reading: ~50 frames produced
        time.sleep(0.1)
        lengths += [len(b) for b in d.servicer.buffers]
    assert lengths and max(lengths) <= 4
    frames += [next(it) for _ in range(12)]
    call.cancel()
    assert sum(f.dropped_frames for f in frames) >= 20
    for a, b in zip(frames, frames[1:]):
        assert b.seq - a.seq - 1 == b.dropped_frames, (a.seq, b.seq, b.dropped_frames)
    xids = [(x.gpu_index, x.xid) for f in frames for x in f.xid_events]
    assert xids == [(5, 94)]


def test_many_streams_share_one_sampler(daemon_factory):
    """Several concurrent streams at 50 ms do not multiply backend sampling (the hub caches a snapshot)."""
    d = daemon_factory(gpus=8)
    stub = node_pb2_grpc.NodeAgentStub(grpc.insecure_channel(d.address))
    calls = [stub.StreamTelemetry(node_pb2.StreamTelemetryRequest(interval_ms=50), timeout=10) for _ in range(4)]
    its = [iter(c) for c in calls]
    before = d.hub.stats["samples"]
    t0 = time.monotonic()
    for _ in range(10):
        for it in its:
            next(it)
    elapsed = time.monotonic() - t0
    for c in calls:
        c.cancel()
    samples = d.hub.stats["samples"] - before
    # 4 streams × 10 frames = 40 frames, sampled from about elapsed/25ms snapshots at most, not 40 × 4
    assert samples <= elapsed / 0.025 + 4 and samples < 40, (samples, elapsed)


def test_a_1hz_stream_gets_fresh_samples_not_the_health_samplers(daemon_factory):
    """The background health sampler stands aside while a stream samples: a 1 Hz stream opened 0.4 s after a
    background sample still carries fresh samples from its second frame on (it once reused the health
    sampler's snapshot, 0.4 s old, every second), and the backend is not sampled twice a second."""
    d = daemon_factory(gpus=8)
    n0 = d.hub.stats["samples"]
    deadline = time.monotonic() + 5
    while d.hub.stats["samples"] == n0:  # no stream yet: only the health sampler samples (once a second)
        assert time.monotonic() < deadline, "the health sampler never sampled"
        time.sleep(0.01)
    time.sleep(0.4)
    call = node_pb2_grpc.NodeAgentStub(grpc.insecure_channel(d.address)).StreamTelemetry(
        node_pb2.StreamTelemetryRequest(interval_ms=1000), timeout=20)
    it = iter(call)
    staleness, s0, t0 = [], None, None
    for i in range(4):
        f = next(it)
        staleness.append(time.time() - f.at.ToMicroseconds() / 1e6)
        if i == 0:
            s0, t0 = d.hub.stats["samples"], time.monotonic()
    call.cancel()
    samples, elapsed = d.hub.stats["samples"] - s0, time.monotonic() - t0
    assert max(staleness[1:]) < 0.2, staleness
    assert samples <= elapsed + 1, (samples, elapsed)  # about one sample per frame, not two


def test_a_consumer_may_leave_the_process_lists_out(daemon_factory):
    """StreamTelemetryRequest.omit_processes: the frames carry no per-GPU process list (the node shard does
    not read it); without it they carry one process per allocation on the GPU, as the backend lists them."""
    d = daemon_factory(gpus=2)
    stub = node_pb2_grpc.NodeAgentStub(grpc.insecure_channel(d.address))
    for i in range(3):
        stub.Prepare(node_pb2.PrepareRequest(allocation_id=f"00000000-0000-0000-0000-00000000000{i + 1}",
                                             gpu_indices=[1], gpu_milli=100, tenant_id="t"), timeout=10)
    assert len(d.backend.processes(1)) == 3
    frames = {}
    for omit in (False, True):
        call = stub.StreamTelemetry(node_pb2.StreamTelemetryRequest(interval_ms=50, omit_processes=omit), timeout=10)
        it = iter(call)
        next(it)
        frames[omit] = next(it)  # sampled after the prepares
        call.cancel()
    assert [len(s.processes) for s in frames[False].samples] == [0, 3]
    assert [len(s.processes) for s in frames[True].samples] == [0, 0]
    assert frames[True].samples[1].memory_used_mib == frames[False].samples[1].memory_used_mib > 512
