"""The loop from GPU health to scheduling and billing, with real daemons and injected faults."""
from __future__ import annotations

import json
import os
import time
import uuid

import psycopg
import pytest
import ray

from gpuaas.v1 import common_pb2 as pb

from tests.integration.conftest import rid, wait_capacity_back

RUNNING, FAILED, RELEASED = pb.ALLOCATION_STATE_RUNNING, pb.ALLOCATION_STATE_FAILED, pb.ALLOCATION_STATE_RELEASED


def inject(cp, node: str, command: dict) -> None:
    """Drop a fault command into the daemon's fault folder (atomic rename), and wait until it is applied."""
    folder = cp.daemon_dir / node / "faults"
    name = uuid.uuid4().hex[:8]
    (folder / f".{name}.tmp").write_text(json.dumps(command))
    os.rename(folder / f".{name}.tmp", folder / f"{name}.json")
    deadline = time.monotonic() + 10
    while (folder / f"{name}.json").exists():
        assert time.monotonic() < deadline, "daemon did not apply the fault"
        time.sleep(0.05)
    assert not (folder / f"{name}.json.rejected").exists()


@pytest.fixture
def pool_node(control_plane):
    """A dedicated simulated node (label pool=<name>) so faults never touch other tests' GPUs.

    Request it before `tenant`, so the tenant releases its allocations while the node still lives."""
    name = "fault-" + uuid.uuid4().hex[:6]
    proc = control_plane.start_daemon(name, 4, "H100", ["--cpu-milli", "64000", "--memory-mib", "262144",
                                                        "--labels", f"pool={name}"])
    control_plane.wait_nodes([name], 60)
    yield name, proc
    if proc.poll() is None:
        proc.terminate()
        proc.wait(10)


def _db(cp, sql, *params):
    with psycopg.connect(cp.urls.app) as conn:
        return conn.execute(sql, params).fetchall()


def _wait(pred, timeout_s=15.0, what=""):
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_fatal_xid_fails_allocation_stops_billing_and_withdraws_gpu(control_plane, pool_node, tenant):
    """XID 79 on a GPU → that GPU UNHEALTHY, its allocation FAILED with billing stopped, GPU never offered again."""
    node, _ = pool_node
    a = tenant.place(rid(), gpu_count=1, node_selector={"pool": node})
    a = tenant.wait_state(a.allocation_id, {RUNNING}, 30)
    gpu = a.assignments[0].gpu_indices[0]
    t_inject = time.time()
    inject(control_plane, node, {"fault": "xid", "gpu": gpu, "xid": 79, "message": "fell off the bus"})
    failed = tenant.wait_state(a.allocation_id, {FAILED, RELEASED}, 15)
    stop = failed.stopped_at.ToMicroseconds() / 1e6
    assert t_inject - 0.5 <= stop <= t_inject + 3.0, "billing stops at detection"
    assert _db(control_plane, "SELECT state FROM control.gpus WHERE node_id=%s AND gpu_index=%s", node, gpu) == \
        [("UNHEALTHY",)]
    # The remaining 3 GPUs are offered; the bad one is not.
    others = [tenant.place(rid(), gpu_count=1, node_selector={"pool": node}) for _ in range(3)]
    assert gpu not in {o.assignments[0].gpu_indices[0] for o in others}
    import grpc
    with pytest.raises(grpc.RpcError) as err:
        tenant.place(rid(), gpu_count=1, node_selector={"pool": node})
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Billing: the ledger bills exactly [running_since, stopped_at] and nothing after.
    ray.get(control_plane.ledger.flush.remote(timeout_s=30), timeout=40)
    billed = _db(control_plane, "SELECT coalesce(sum(gpu_milli_us), 0) FROM ledger.usage_entries"
                 " WHERE allocation_id = %s", a.allocation_id)[0][0]
    expected = 1000 * (failed.stopped_at.ToMicroseconds() - failed.running_since.ToMicroseconds())
    assert billed == expected


def test_operator_clears_an_unhealthy_gpu_back_into_service(control_plane, pool_node, admin, tenant):
    """AdminService.ClearGpu: UNHEALTHY → READY (recorded as an operator event) and offered again at once;
    bad input gets its documented status and changes nothing."""
    import grpc

    node, _ = pool_node
    inject(control_plane, node, {"fault": "xid", "gpu": 2, "xid": 79, "message": "fell off the bus"})
    gpu_state = lambda: _db(control_plane, "SELECT state FROM control.gpus WHERE node_id=%s AND gpu_index=2",  # noqa: E731
                            node)[0][0]
    _wait(lambda: gpu_state() == "UNHEALTHY", 15, "GPU UNHEALTHY")
    held = [tenant.place(rid(), gpu_count=1, node_selector={"pool": node}) for _ in range(3)]
    assert 2 not in {h.assignments[0].gpu_indices[0] for h in held}
    for kwargs, code in [({"node_id": node, "gpu_index": -1}, grpc.StatusCode.INVALID_ARGUMENT),
                         ({"node_id": node, "gpu_index": 99}, grpc.StatusCode.NOT_FOUND),
                         ({"node_id": "no-such-node", "gpu_index": 0}, grpc.StatusCode.NOT_FOUND),
                         ({"node_id": node, "gpu_index": 0}, grpc.StatusCode.FAILED_PRECONDITION)]:  # READY already
        with pytest.raises(grpc.RpcError) as err:
            admin.clear_gpu(**kwargs)
        assert err.value.code() == code, kwargs
    with pytest.raises(grpc.RpcError) as err:
        tenant.clear_gpu(node, 2)  # a tenant token has no admin scope
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert gpu_state() == "UNHEALTHY"

    inject(control_plane, node, {"fault": "clear", "gpu": 2})  # the GPU was reset on the node
    st = admin.clear_gpu(node, 2, reason="GPU reset by the operator")
    assert [g.state for g in st.gpus if g.index == 2] == [pb.GPU_STATE_READY]
    assert gpu_state() == "READY"
    ev = _db(control_plane, "SELECT to_state, automatic, reason FROM control.node_events WHERE node_id=%s"
                            " AND gpu_index=2 ORDER BY event_id DESC LIMIT 1", node)
    assert ev == [("READY", False, "GPU reset by the operator")]
    a = tenant.place(rid(), gpu_count=1, node_selector={"pool": node})
    assert a.assignments[0].gpu_indices == [2]
    tenant.wait_state(a.allocation_id, {RUNNING}, 30)  # the node prepares it: its own health view agrees


def test_application_xid_keeps_the_gpu_in_service(control_plane, pool_node, tenant):
    """XID 13 (an application error) leaves the GPU READY and the allocation RUNNING."""
    node, _ = pool_node
    a = tenant.place(rid(), gpu_count=1, node_selector={"pool": node})
    a = tenant.wait_state(a.allocation_id, {RUNNING}, 30)
    inject(control_plane, node, {"fault": "xid", "gpu": a.assignments[0].gpu_indices[0], "xid": 13,
                                 "message": "graphics engine exception"})
    time.sleep(3 * control_plane.cfg.health_tick_s + control_plane.cfg.telemetry_interval_ms / 1000)
    assert tenant.get(a.allocation_id).state == RUNNING
    assert {s for (s,) in _db(control_plane, "SELECT state FROM control.gpus WHERE node_id=%s", node)} == {"READY"}


def test_killed_daemon_goes_suspect_offline_then_back_after_orphan_cleanup(control_plane, pool_node, tenant):
    """SIGKILL a daemon: node SUSPECT → OFFLINE, allocation FAILED (billing stopped); restart: READY, RELEASED."""
    node, proc = pool_node
    a = tenant.place(rid(), gpu_count=2, node_selector={"pool": node})
    tenant.wait_state(a.allocation_id, {RUNNING}, 30)
    proc.kill()
    t_kill = time.time()
    state = lambda: _db(control_plane, "SELECT state FROM control.nodes WHERE node_id=%s", node)[0][0]  # noqa: E731
    _wait(lambda: state() == "SUSPECT", 10, "SUSPECT")
    _wait(lambda: state() == "OFFLINE", 15, "OFFLINE")
    failed = tenant.wait_state(a.allocation_id, {FAILED}, 10)
    assert failed.stopped_at.ToMicroseconds() / 1e6 <= t_kill + control_plane.cfg.heartbeat_offline_s + 2
    # Nothing new lands on an OFFLINE node.
    import grpc
    with pytest.raises(grpc.RpcError):
        tenant.place(rid(), gpu_milli=100, node_selector={"pool": node})
    # The daemon comes back: the node is READY again and the orphan is cleaned up → RELEASED.
    control_plane.start_daemon(node, 4, "H100", ["--cpu-milli", "64000", "--memory-mib", "262144",
                                                 "--labels", f"pool={node}"])
    control_plane.wait_nodes([node], 30)
    tenant.wait_state(a.allocation_id, {RELEASED}, 20)
    events = [e for (e,) in _db(control_plane, "SELECT event FROM control.node_events WHERE node_id=%s"
                                " AND gpu_index IS NULL ORDER BY event_id", node)]
    assert events == ["registered", "heartbeat_missed", "heartbeat_timeout", "registered"]


def test_cordoned_node_losing_its_daemon_stops_billing_and_stays_cordoned(control_plane, pool_node, admin, tenant):
    """A cordoned node keeps the cordon through a lost daemon, yet its RUNNING allocations fail with billing
    stopped (as on an OFFLINE node); when the daemon comes back the orphan is cleaned up and the node is still
    CORDONED until the operator uncordons it."""
    node, proc = pool_node
    a = tenant.place(rid(), gpu_count=1, node_selector={"pool": node})
    tenant.wait_state(a.allocation_id, {RUNNING}, 30)
    admin.node_action("cordon", node, "maintenance")
    proc.kill()
    t_kill = time.time()
    failed = tenant.wait_state(a.allocation_id, {FAILED}, control_plane.cfg.heartbeat_offline_s + 15)
    stop = failed.stopped_at.ToMicroseconds() / 1e6
    assert t_kill + control_plane.cfg.heartbeat_offline_s - 1 <= stop <= t_kill + control_plane.cfg.heartbeat_offline_s + 3
    state = lambda: _db(control_plane, "SELECT state FROM control.nodes WHERE node_id=%s", node)[0][0]  # noqa: E731
    assert state() == "CORDONED"
    ray.get(control_plane.ledger.flush.remote(timeout_s=30), timeout=40)
    billed = _db(control_plane, "SELECT coalesce(sum(gpu_milli_us), 0) FROM ledger.usage_entries"
                 " WHERE allocation_id = %s", a.allocation_id)[0][0]
    assert billed == 1000 * (failed.stopped_at.ToMicroseconds() - failed.running_since.ToMicroseconds())
    # The daemon comes back (e.g. after the maintenance reboot): accepted, still CORDONED, orphan cleaned up.
    control_plane.start_daemon(node, 4, "H100", ["--cpu-milli", "64000", "--memory-mib", "262144",
                                                 "--labels", f"pool={node}"])
    tenant.wait_state(a.allocation_id, {RELEASED}, 30)
    assert state() == "CORDONED"
    events = [e for (e,) in _db(control_plane, "SELECT event FROM control.node_events WHERE node_id=%s"
                                " AND gpu_index IS NULL ORDER BY event_id", node)]
    assert events == ["registered", "cordon", "heartbeat_timeout", "registered"]
    import grpc
    with pytest.raises(grpc.RpcError):
        tenant.place(rid(), gpu_count=1, node_selector={"pool": node})
    admin.node_action("uncordon", node, "maintenance done")
    _wait(lambda: state() == "READY", 5, "READY")
    b = tenant.place(rid(), gpu_count=1, node_selector={"pool": node})
    tenant.wait_state(b.allocation_id, {RUNNING}, 30)


def _events(cp, aid: str) -> list[str]:
    return [e for (e,) in _db(cp, "SELECT event FROM control.allocation_events WHERE allocation_id = %s"
                                  " ORDER BY event_id", aid)]


def test_a_failed_prepare_goes_back_to_the_queue_and_runs_on_the_next_try(control_plane, pool_node, tenant):
    """PLACED → QUEUED when the node refuses the Prepare (attempt counted, capacity freed), placed again
    by the queue pass, and RUNNING once the node takes it; never billed for the failed try."""
    name, _ = pool_node
    inject(control_plane, name, {"fault": "prepare_fail", "times": 1})
    a = tenant.place(rid(), gpu_count=1, node_selector={"pool": name})
    got = tenant.wait_state(a.allocation_id, {RUNNING}, 30)
    assert got.assignments[0].node_id == name
    assert _events(control_plane, a.allocation_id) == ["accepted", "placed", "prepare_failed_retry", "placed",
                                                        "prepare_ok"]
    [(attempts,)] = _db(control_plane, "SELECT prepare_attempts FROM control.allocations WHERE allocation_id = %s",
                        a.allocation_id)
    assert attempts == 1


def test_a_prepare_refused_every_time_fails_the_allocation_and_frees_its_gpu(control_plane, pool_node, tenant):
    """After prepare_attempts_max refusals: FAILED (then cleaned up on the node and RELEASED), the
    capacity back in the placement view, nothing billed."""
    name, _ = pool_node
    tries = control_plane.cfg.prepare_attempts_max
    inject(control_plane, name, {"fault": "prepare_fail", "times": tries})
    a = tenant.place(rid(), gpu_count=4, node_selector={"pool": name})  # the whole node
    tenant.wait_state(a.allocation_id, {RELEASED}, 60)
    events = _events(control_plane, a.allocation_id)
    assert events == ["accepted"] + ["placed", "prepare_failed_retry"] * (tries - 1) + [
        "placed", "prepare_failed_final", "cleanup_ok"], events
    [(reason,)] = _db(control_plane, "SELECT reason FROM control.allocation_events WHERE allocation_id = %s"
                                     " AND event = 'prepare_failed_final'", a.allocation_id)
    assert "prepare failed" in reason
    # Its GPUs are free again: the whole node can be placed at once.
    assert wait_capacity_back(control_plane, [a.allocation_id], 15) == []
    b = tenant.place(rid(), gpu_count=4, node_selector={"pool": name})
    # A new request id is a new allocation (one clean-checkout run saw b answered with a's id).
    assert b.allocation_id != a.allocation_id, (b.request_id, a.request_id)
    assert tenant.wait_state(b.allocation_id, {RUNNING}, 30).state == RUNNING
    assert _db(control_plane, "SELECT count(*) FROM ledger.usage_entries WHERE allocation_id = %s",
               a.allocation_id) == [(0,)]
