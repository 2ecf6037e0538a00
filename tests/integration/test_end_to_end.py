"""What the demo does, against real Postgres, Ray, gRPC and node daemons."""
from __future__ import annotations

import time

import psycopg
import ray

from gpuaas import sdk
from gpuaas.client import Client
from gpuaas.v1 import common_pb2 as pb

from tests.integration.conftest import GPUS, q, rid

RUNNING, RELEASED = pb.ALLOCATION_STATE_RUNNING, pb.ALLOCATION_STATE_RELEASED


def test_place_batch_gang_job_release_and_bill(control_plane, tenant):
    """Singles, a batch, a 2-node gang and a Ray job run, release, and are billed exactly once in the ledger."""
    one = tenant.place(rid(), gpu_count=2, topology=pb.TOPOLOGY_SAME_NVLINK_ISLAND, cpu_milli=1000)
    frac = tenant.place(rid(), gpu_milli=300)
    batch = tenant.place_batch([Client.request(rid(), gpu_milli=200) for _ in range(5)])
    assert all(r.HasField("allocation") for r in batch.results), batch
    gang = tenant.place(rid(), gpu_count=GPUS // 2, replicas=2, topology=pb.TOPOLOGY_SPREAD)
    assert len({a.node_id for a in gang.assignments}) == 2, "spread gang must land on two nodes"
    allocs = [one, frac, gang] + [r.allocation for r in batch.results]
    for a in allocs:
        assert tenant.wait_state(a.allocation_id, {RUNNING}, 30).running_since.seconds > 0

    seen = sdk.run(one, sdk.describe_worker)
    assert seen["cuda_visible_devices"] == ",".join(map(str, one.assignments[0].gpu_indices))
    assert seen["node_id"] == one.assignments[0].node_id
    gang_seen = sdk.run_gang(gang, sdk.describe_worker)
    assert [s["node_id"] for s in gang_seen] == [a.node_id for a in gang.assignments]
    assert [s["cuda_visible_devices"] for s in gang_seen] == [
        ",".join(map(str, a.gpu_indices)) for a in gang.assignments]

    for a in allocs:
        tenant.release(a.allocation_id)
    final = [tenant.wait_state(a.allocation_id, {RELEASED}, 30) for a in allocs]
    ray.get(control_plane.ledger.flush.remote(timeout_s=30), timeout=40)

    with psycopg.connect(control_plane.urls.app) as conn:
        states = dict(conn.execute("SELECT state, count(*) FROM control.allocations WHERE tenant_id=%s GROUP BY 1",
                                   (tenant.tenant_id,)).fetchall())
        assert states == {"RELEASED": len(allocs)}
        # Billed quantity equals Σ gpu_milli × RUNNING interval, exactly, per allocation.
        expected = 0
        for a in final:
            dur_us = (a.stopped_at.ToMicroseconds() - a.running_since.ToMicroseconds())
            expected += sum(len(x.gpu_indices) * x.gpu_milli for x in a.assignments) * dur_us
        billed = conn.execute("SELECT coalesce(sum(gpu_milli_us), 0) FROM ledger.usage_entries WHERE tenant_id=%s",
                              (tenant.tenant_id,)).fetchone()[0]
        assert billed == expected
    from ledger import reports
    mine = [r for r in reports.usage_by_tenant(control_plane.urls.app) if r["tenant_id"] == tenant.tenant_id]
    assert mine and mine[0]["cost_micros"] > 0 and abs(mine[0]["gpu_seconds"] - expected / 1e9) < 1e-6


def test_idempotent_replay_and_conflicting_body(tenant):
    """Same request_id + same body → the same allocation; a different body → ALREADY_EXISTS."""
    import grpc
    import pytest

    key = rid()
    a = tenant.place(key, gpu_milli=100)
    b = tenant.place(key, gpu_milli=100)
    assert a.allocation_id == b.allocation_id
    with pytest.raises(grpc.RpcError) as err:
        tenant.place(key, gpu_milli=200)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_watch_streams_committed_transitions(control_plane, tenant):
    """WatchAllocations delivers QUEUED→PLACED→RUNNING→RELEASING→RELEASED for an allocation, in order."""
    # The backlog is asked for with an event id > 0 that precedes ours: on a fresh control plane
    # (this test alone) our first event would be id 1 itself.
    tenant.place(rid(), gpu_milli=10)
    [(before,)] = q(control_plane, "SELECT max(event_id) FROM control.allocation_events")
    a = tenant.place(rid(), gpu_milli=100)
    tenant.wait_state(a.allocation_id, {RUNNING}, 30)
    tenant.release(a.allocation_id)
    tenant.wait_state(a.allocation_id, {RELEASED}, 30)
    stream = tenant.watch([a.allocation_id], after_event_id=before, timeout_s=10)
    got = []
    for ev in stream:
        got.append(ev.to_state)
        if ev.to_state == RELEASED:
            break
    stream.cancel()
    assert got == [pb.ALLOCATION_STATE_QUEUED, pb.ALLOCATION_STATE_PLACED, RUNNING,
                   pb.ALLOCATION_STATE_RELEASING, RELEASED]


def test_list_is_paged_and_tenant_scoped(tenant, admin):
    """ListAllocations pages through exactly the caller's allocations."""
    ids = {tenant.place(rid(), gpu_milli=10).allocation_id for _ in range(5)}
    listed = [a.allocation_id for a in tenant.list(page_size=2)]
    assert set(listed) == ids and len(listed) == 5
    assert not ids & {a.allocation_id for a in admin.list()}


def test_queue_waits_then_places_when_capacity_frees(tenant, control_plane):
    """wait=true queues a request no node can take now, and places it when capacity is released."""
    from tests.integration.conftest import NODES
    # The session's simulated nodes only: a node another test started (and stopped) may still be offered.
    zone = {"zone": "sim-a"}
    big = [tenant.place(rid(), gpu_count=GPUS, node_selector=zone) for _ in range(NODES)]
    for a in big:
        tenant.wait_state(a.allocation_id, {RUNNING}, 30)
    waiting = tenant.place(rid(), gpu_count=GPUS, wait=True, queue_timeout_s=60, node_selector=zone)
    assert waiting.state == pb.ALLOCATION_STATE_QUEUED
    explained = tenant.get(waiting.allocation_id)
    assert explained.pending_explanation
    tenant.release(big[0].allocation_id)
    done = tenant.wait_state(waiting.allocation_id, {RUNNING}, 30)
    assert done.assignments[0].node_id == big[0].assignments[0].node_id


def test_usage_carries_the_gpus_utilization_and_energy(control_plane, tenant):
    """Telemetry reaches metering: the node shard attributes its GPUs' utilization and energy to the
    RUNNING allocation on them, and the ledger's usage rows carry them (not zeros)."""
    a = tenant.place(rid(), gpu_count=1)
    tenant.wait_state(a.allocation_id, {RUNNING}, 30)
    # A few usage windows (usage_window_s) inside RUNNING, across metering intervals.
    time.sleep(control_plane.cfg.usage_window_s * 2 + control_plane.cfg.meter_interval_s + 1)
    tenant.release(a.allocation_id)
    tenant.wait_state(a.allocation_id, {RELEASED}, 30)
    ray.get(control_plane.ledger.flush.remote(timeout_s=30), timeout=40)
    with psycopg.connect(control_plane.urls.app) as conn:
        rows = conn.execute("SELECT util_bp, energy_mj FROM ledger.usage_entries WHERE allocation_id=%s AND kind=0",
                            (a.allocation_id,)).fetchall()
    assert rows, "no usage rows"
    assert max(u for u, _ in rows) > 0, rows
    assert sum(e for _, e in rows) > 0, rows
    assert all(0 <= u <= 10_000 for u, _ in rows)  # an average, in basis points


def test_a_watch_stream_gets_an_event_that_commits_after_a_higher_one(control_plane, tenant):
    """Event ids are taken before commit. An event whose transaction commits after one with a higher id
    still reaches a live stream (the hub does not move past an id that may still commit)."""
    import threading

    a = tenant.place(rid(), gpu_milli=100)
    tenant.wait_state(a.allocation_id, {RUNNING}, 30)
    [(last,)] = q(control_plane, "SELECT max(event_id) FROM control.allocation_events WHERE allocation_id = %s",
                  a.allocation_id)
    got: list[int] = []
    stream = tenant.watch([a.allocation_id], after_event_id=last, timeout_s=20)
    import grpc

    def read():
        try:
            for ev in stream:
                got.append(ev.event_id)
        except grpc.RpcError as err:  # the test cancels the stream once it has seen both events
            if err.code() != grpc.StatusCode.CANCELLED:
                raise

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    insert = ("INSERT INTO control.allocation_events (allocation_id, tenant_id, from_state, to_state, event,"
              " reason, version, at) VALUES (%s, %s, 'RUNNING', 'RUNNING', 'note', %s, %s, now()) RETURNING event_id")
    with psycopg.connect(control_plane.urls.owner) as late, psycopg.connect(control_plane.urls.owner) as early:
        [(low,)] = late.execute(insert, (a.allocation_id, tenant.tenant_id, "late writer", 10**9)).fetchall()
        [(high,)] = early.execute(insert, (a.allocation_id, tenant.tenant_id, "early writer", 10**9 + 1)).fetchall()
        early.commit()
        time.sleep(0.5)  # the hub polls every 50 ms: without the gap guard it would be past `low` now
        assert low not in got
        late.commit()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not {low, high} <= set(got):
        time.sleep(0.05)
    stream.cancel()
    reader.join(5)
    assert low < high and {low, high} <= set(got), got
    assert got.index(low) < got.index(high), "delivered in id order"


def test_every_running_allocation_gets_usage_when_the_read_is_split(control_plane, tenant):
    """The node shard reads the RUNNING allocations in parts by id range (USAGE_READ_RANGES): every
    allocation, wherever its id falls, still gets its usage rows."""
    from actors.node_shard import USAGE_READ_RANGES

    ids = [r.allocation.allocation_id for r in tenant.place_batch(
        [Client.request(rid(), gpu_milli=10) for _ in range(32)]).results]
    assert len({i[0] for i in ids}) > 1  # ids spread over several parts
    assert all(sum(lo <= i <= hi for lo, hi in USAGE_READ_RANGES) == 1 for i in ids)
    for a in ids:
        tenant.wait_state(a, {RUNNING}, 30)
    time.sleep(control_plane.cfg.usage_window_s * 2 + control_plane.cfg.meter_interval_s + 1)
    tenant.release_batch(ids)
    for a in ids:
        tenant.wait_state(a, {RELEASED}, 30)
    ray.get(control_plane.ledger.flush.remote(timeout_s=30), timeout=40)
    with psycopg.connect(control_plane.urls.app) as conn:
        have = {str(r[0]) for r in conn.execute(
            "SELECT DISTINCT allocation_id FROM ledger.usage_entries WHERE allocation_id = ANY(%s::uuid[])"
            " AND kind = 0 AND energy_mj > 0", (ids,))}
    assert have == set(ids)
