"""Fixtures for the node daemon tests: real daemons on real gRPC over loopback.

`daemon_factory` starts in-process daemons (simulated backend unless asked
otherwise) and stops them after the test; `registry_factory` starts a tiny
real NodeRegistry server (a test peer implementing the contract).
"""
from __future__ import annotations

import pathlib
import threading
import time
from concurrent import futures

import grpc
import pytest

from gpuaas.v1 import common_pb2, node_pb2, node_pb2_grpc
from node_daemon.daemon import BackendChoice, DaemonConfig, NodeDaemon


def nvml_available() -> bool:
    try:
        from node_daemon.nvml_backend import NvmlBackend, NvmlUnavailable
    except ImportError:
        return False
    try:
        NvmlBackend.open().close()
        return True
    except NvmlUnavailable:
        return False


def wait_for(pred, timeout_s: float = 5.0, interval_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s}s")


@pytest.fixture
def daemon_factory(tmp_path):
    started: list[NodeDaemon] = []

    def make(**kw) -> NodeDaemon:
        kw.setdefault("node_name", f"node-{len(started)}")
        kw.setdefault("control_plane", None)
        kw.setdefault("backend", BackendChoice.SIMULATED)
        kw.setdefault("gpus", 4)
        kw.setdefault("fault_dir", tmp_path / f"faults-{len(started)}")
        kw.setdefault("shutdown_grace_s", 0.5)
        d = NodeDaemon(DaemonConfig(**kw)).start()
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop(grace_s=0.2)


@pytest.fixture
def sim_daemon(daemon_factory):
    return daemon_factory()


def stub_for(daemon_or_addr) -> node_pb2_grpc.NodeAgentStub:
    addr = daemon_or_addr if isinstance(daemon_or_addr, str) else daemon_or_addr.address
    return node_pb2_grpc.NodeAgentStub(grpc.insecure_channel(addr))


def drop_fault(daemon: NodeDaemon, cmd, name: str = "f") -> pathlib.Path:
    """Write a fault command the way an outside process does (tmp name, then rename) and wait until applied."""
    import json

    d = pathlib.Path(daemon.config.fault_dir)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{name}.tmp"
    tmp.write_text(json.dumps(cmd))
    path = d / f"{name}.json"
    tmp.rename(path)
    wait_for(lambda: not path.exists(), 5)
    return path


class RegistryPeer(node_pb2_grpc.NodeRegistryServicer):
    """A real NodeRegistry server for the daemon to talk to."""

    def __init__(self, *, fail_first: int = 0, fail_code=grpc.StatusCode.UNAVAILABLE, orphans=()):
        self.fail_first, self.fail_code = fail_first, fail_code
        self.orphans = list(orphans)
        self.registers: list[tuple[float, node_pb2.RegisterNodeRequest, dict]] = []
        self.deregisters: list[node_pb2.DeregisterNodeRequest] = []
        self.calls = 0
        self.lock = threading.Lock()

    def Register(self, request, context):
        with self.lock:
            self.calls += 1
            n = self.calls
        if n <= self.fail_first:
            context.abort(self.fail_code, f"test peer: failing call {n}")
        with self.lock:
            self.registers.append((time.monotonic(), request, dict(context.invocation_metadata())))
        orphans, self.orphans = self.orphans, []
        return node_pb2.RegisterNodeResponse(node_id=request.inventory.node_name, state=common_pb2.NODE_STATE_READY,
                                             telemetry_interval_ms=1000, orphaned_allocation_ids=orphans)

    def Deregister(self, request, context):
        self.deregisters.append(request)
        return node_pb2.DeregisterNodeResponse(state=common_pb2.NODE_STATE_SUSPECT)


@pytest.fixture
def registry_factory():
    servers = []

    def make(peer: RegistryPeer | None = None, port: int = 0) -> tuple[RegistryPeer, str, grpc.Server]:
        peer = peer or RegistryPeer()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        node_pb2_grpc.add_NodeRegistryServicer_to_server(peer, server)
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        servers.append(server)
        return peer, f"127.0.0.1:{bound}", server

    yield make
    for s in servers:
        s.stop(0)
