"""The node shard's stream consumer fed by real daemons over real gRPC, the fleet
runner the telemetry benchmark uses, and how fast a stopping daemon ends its streams."""
from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import grpc

from actors.node_shard import NodeShardCore, NodeWatch
from gpuaas.config import ControlPlaneConfig
from gpuaas.lifecycle import GpuState, NodeState
from gpuaas.v1 import node_pb2

from tests.node_daemon.conftest import drop_fault, stub_for, wait_for

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_shard_consumes_real_streams_and_queues_a_fatal_xid(daemon_factory):
    daemons = [daemon_factory(node_name=f"shard-n{i}", gpus=4, seed=i) for i in range(3)]
    core = NodeShardCore(index=0, count=1, app_url="postgresql://unused",
                         config=ControlPlaneConfig(telemetry_interval_ms=100))

    async def run():
        now = time.monotonic()
        for d in daemons:
            w = NodeWatch(d.config.node_name, d.address, NodeState.READY, now)
            w.gpu_states = {g: GpuState.READY for g in range(4)}
            core.nodes[w.node_id] = w
            w.task = asyncio.get_running_loop().create_task(core._watch(w))
        await asyncio.sleep(1.5)
        # A fatal XID on node 1, GPU 2 reaches that node's pending faults (the tick acts on them).
        await asyncio.to_thread(drop_fault, daemons[1], {"fault": "xid", "gpu": 2, "xid": 79})
        deadline = time.monotonic() + 5
        while not core.nodes["shard-n1"].faults and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for w in core.nodes.values():
            w.task.cancel()
        await asyncio.gather(*(w.task for w in core.nodes.values()), return_exceptions=True)
        for d in daemons:
            await core.agents.drop(d.address)

    asyncio.run(run())
    frames = {n: w.frames for n, w in core.nodes.items()}
    assert all(f >= 5 for f in frames.values()), frames  # ~15 at 10 Hz; generous for a loaded machine
    assert core.stats["frames"] == sum(frames.values())
    assert core.stats["gpu_samples"] == 4 * core.stats["frames"]
    assert len(core.lags) == core.stats["frames"] and 0 <= min(core.lags) and max(core.lags) < 5
    assert {w.node_id: sorted(w.last_sample) for w in core.nodes.values()} == {n: [0, 1, 2, 3] for n in frames}
    faults = core.nodes["shard-n1"].faults
    assert [(g, c.split(":")[0]) for g, c, _ in faults] == [(2, "XID 79")]
    assert not core.nodes["shard-n0"].faults and not core.nodes["shard-n2"].faults


def test_stopping_daemon_ends_its_streams_at_once(daemon_factory):
    d = daemon_factory(gpus=2)
    call = stub_for(d).StreamTelemetry(node_pb2.StreamTelemetryRequest(interval_ms=1000))
    got, ended = [], threading.Event()

    def read():
        try:
            for f in call:
                got.append(f)
        except grpc.RpcError:
            pass
        ended.set()

    threading.Thread(target=read, daemon=True).start()
    wait_for(lambda: got, 5)
    t0 = time.monotonic()
    d.stop(grace_s=3)
    assert ended.wait(5)
    # The handler waits on its buffer (5 s safety poll); stop closes the buffers, so the
    # stream ends without waiting for a poll or the grace period.
    assert time.monotonic() - t0 < 2.5


def test_hub_stop_wakes_the_simulated_xid_poller(daemon_factory):
    d = daemon_factory(gpus=1)
    assert d.backend.xid_poll_interruptible
    time.sleep(0.3)  # the poller is now inside a long (5 s) wait
    t0 = time.monotonic()
    d.hub.stop()
    assert time.monotonic() - t0 < 1.0
    assert not any(t.is_alive() for t in d.hub._threads)


def test_fleet_runner_hosts_real_daemons_and_exits_on_sigterm(tmp_path):
    out = tmp_path / "fleet.json"
    p = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "telemetry_fleet.py"), "--count", "3",
                          "--first", "7", "--gpus", "2", "--out", str(out)], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: out.exists() or p.poll() is not None, 60, 0.1)
        assert p.poll() is None, p.stderr.read().decode()[-2000:]
        addresses = json.loads(out.read_text())["addresses"]
        assert sorted(addresses) == ["fleet-00007", "fleet-00008", "fleet-00009"]
        assert len(set(addresses.values())) == 3  # one gRPC server (port) per daemon
        uuids = set()
        for name, addr in addresses.items():
            inv = stub_for(addr).GetInventory(node_pb2.GetInventoryRequest(), timeout=10)
            assert inv.node_name == name and inv.simulated and len(inv.gpus) == 2
            uuids |= {g.uuid for g in inv.gpus}
            frame = next(iter(stub_for(addr).StreamTelemetry(node_pb2.StreamTelemetryRequest(interval_ms=100),
                                                             timeout=10)))
            assert frame.node_name == name and [s.index for s in frame.samples] == [0, 1]
        assert len(uuids) == 6  # seeded per node: no two daemons share GPU UUIDs
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()


def test_an_xid_goes_out_at_once_not_at_the_next_interval(daemon_factory):
    d = daemon_factory(gpus=2)
    call = stub_for(d).StreamTelemetry(node_pb2.StreamTelemetryRequest(interval_ms=5000))
    frames: list[tuple[float, node_pb2.TelemetryFrame]] = []

    def read():
        try:
            for f in call:
                frames.append((time.monotonic(), f))
        except grpc.RpcError:
            pass

    threading.Thread(target=read, daemon=True).start()
    wait_for(lambda: frames, 5)  # the first frame comes at once; the next one is due in 5 s
    time.sleep(0.3)
    t0 = time.monotonic()
    drop_fault(d, {"fault": "xid", "gpu": 1, "xid": 79})
    wait_for(lambda: len(frames) >= 2, 3)
    at, f = frames[1]
    assert [(x.gpu_index, x.xid) for x in f.xid_events] == [(1, 79)]
    assert at - t0 < 2.0  # not the 5 s interval
    assert f.seq == 2 and f.dropped_frames == 0
    # The early frame does not move the schedule: the next regular one is still due
    # 5 s after the first, and carries no XID.
    wait_for(lambda: len(frames) >= 3, 8)
    assert not frames[2][1].xid_events and frames[2][1].seq == 3
    assert 3.5 < frames[2][0] - frames[0][0] < 7.0
    call.cancel()
