"""Registration with a real NodeRegistry peer: auth metadata, backoff, orphans, re-registration, deregistration."""
from __future__ import annotations

import random

import grpc

from gpuaas.v1 import node_pb2
from node_daemon.registration import backoff_s
from tests.node_daemon.conftest import RegistryPeer, stub_for, wait_for


def test_backoff_is_full_jitter_and_capped():
    """Backoff draws from U(0, min(cap, base·2^(n-1))): never above the cap, and spread out (full jitter)."""
    rng = random.Random(1)
    for attempt in range(1, 40):
        bound = min(5.0, 0.2 * 2 ** (attempt - 1))
        xs = [backoff_s(attempt, 0.2, 5.0, rng) for _ in range(200)]
        assert all(0 <= x <= bound for x in xs)
        assert max(xs) > bound * 0.8 and min(xs) < bound * 0.2


def test_registers_with_token_and_inventory(daemon_factory, registry_factory):
    """At start the daemon registers its inventory and its agent address with `authorization: Bearer <token>`."""
    peer, addr, _ = registry_factory()
    d = daemon_factory(control_plane=addr, token="node-secret", labels={"rack": "r1"})
    wait_for(lambda: peer.registers)
    _, req, md = peer.registers[0]
    assert md["authorization"] == "Bearer node-secret"
    assert req.agent_address == d.address and req.inventory.node_name == d.config.node_name
    assert req.inventory.backend == "simulated" and req.inventory.simulated and len(req.inventory.gpus) == 4
    assert req.inventory.labels["rack"] == "r1"


def test_retries_unavailable_with_backoff_then_registers(daemon_factory, registry_factory):
    """UNAVAILABLE answers are retried with backoff until the registry accepts; the daemon serves meanwhile."""
    peer, addr, _ = registry_factory(RegistryPeer(fail_first=4))
    d = daemon_factory(control_plane=addr, backoff_base_s=0.05, backoff_max_s=0.2)
    assert stub_for(d).GetInventory(node_pb2.GetInventoryRequest(), timeout=5).gpus
    wait_for(lambda: peer.registers, 10)
    assert peer.calls == 5 and d.registrar.attempts == 5 and d.registrar.registered.is_set()


def test_control_plane_down_at_start_then_up(daemon_factory, registry_factory):
    """With no control plane listening the daemon keeps retrying; once one starts on that address it registers."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    d = daemon_factory(control_plane=f"127.0.0.1:{port}", backoff_base_s=0.05, backoff_max_s=0.3)
    wait_for(lambda: d.registrar.attempts >= 2, 5)
    assert not d.registrar.registered.is_set()
    peer, _, _ = registry_factory(port=port)
    wait_for(lambda: peer.registers, 10)


def test_malformed_registration_refused_daemon_keeps_serving(daemon_factory, registry_factory):
    """A registry answering INVALID_ARGUMENT (malformed registration) is logged and retried at the cap;
    the daemon keeps serving its NodeAgent."""
    peer, addr, _ = registry_factory(RegistryPeer(fail_first=10**6, fail_code=grpc.StatusCode.INVALID_ARGUMENT))
    d = daemon_factory(control_plane=addr, backoff_base_s=0.05, backoff_max_s=0.3)
    wait_for(lambda: d.registrar.attempts >= 2, 5)
    assert "INVALID_ARGUMENT" in d.registrar.last_error
    assert stub_for(d).Health(node_pb2.HealthRequest(), timeout=5).healthy


def test_orphans_from_register_are_cleaned(daemon_factory, registry_factory):
    """Allocations the registry lists as orphaned are cleaned up on this node (their processes ended)."""
    peer = RegistryPeer(orphans=["orphan-1", "unknown-here"])
    d = daemon_factory(control_plane=None)
    d.allocations.prepare("orphan-1", [0, 1], 0, "t")
    assert sum(len(d.backend.processes(i)) for i in (0, 1)) == 2
    _, addr, _ = registry_factory(peer)
    from node_daemon.registration import Registrar, RegistrationConfig
    r = Registrar(d, RegistrationConfig(control_plane=addr, token="x"), d.address)
    r.start()
    try:
        wait_for(lambda: not d.allocations.live())
        assert sum(len(d.backend.processes(i)) for i in (0, 1)) == 0
    finally:
        r.stop(deregister=False)


def test_reregisters_when_no_consumer_and_not_while_one_streams(daemon_factory, registry_factory):
    """No telemetry consumer for reregister_after_s → Register again; an open stream (the control plane
    watching) suppresses re-registration."""
    peer, addr, _ = registry_factory()
    d = daemon_factory(control_plane=addr, reregister_after_s=0.5)
    wait_for(lambda: len(peer.registers) >= 2, 5)
    call = stub_for(d).StreamTelemetry(node_pb2.StreamTelemetryRequest(interval_ms=100), timeout=30)
    it = iter(call)
    next(it)
    n = len(peer.registers)
    for _ in range(12):  # 1.2 s of streaming
        next(it)
    assert len(peer.registers) == n
    call.cancel()
    wait_for(lambda: len(peer.registers) > n, 5)


def test_reregisters_after_control_plane_restart(daemon_factory, registry_factory):
    """The control plane restarting on the same address (a new registry, nobody streaming) gets a fresh Register."""
    peer1, addr, server1 = registry_factory()
    port = int(addr.rsplit(":", 1)[1])
    d = daemon_factory(control_plane=addr, reregister_after_s=0.5, backoff_base_s=0.05, backoff_max_s=0.3)
    wait_for(lambda: peer1.registers)
    server1.stop(0).wait()
    peer2, _, _ = registry_factory(port=port)
    wait_for(lambda: peer2.registers, 10)
    assert peer2.registers[0][1].inventory.node_name == d.config.node_name


def test_stop_deregisters(daemon_factory, registry_factory):
    """A graceful stop calls Deregister with the node id and a reason."""
    peer, addr, _ = registry_factory()
    d = daemon_factory(control_plane=addr)
    wait_for(lambda: peer.registers)
    d.stop(grace_s=0.2, reason="test stop")
    assert [(r.node_id, r.reason) for r in peer.deregisters] == [(d.config.node_name, "test stop")]
