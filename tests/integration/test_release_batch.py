"""ReleaseBatch: many releases in one call, each item with Release's meaning and its own outcome."""
from __future__ import annotations

import uuid

import grpc
import psycopg
import pytest
import ray
from google.rpc import error_details_pb2

from gpuaas.client import Client
from gpuaas.v1 import common_pb2 as pb

from tests.integration.conftest import GPUS, NODES, q, rid, tenant_fixture, wait_capacity_back

RUNNING, RELEASING, RELEASED, CANCELLED, QUEUED = (
    pb.ALLOCATION_STATE_RUNNING, pb.ALLOCATION_STATE_RELEASING, pb.ALLOCATION_STATE_RELEASED,
    pb.ALLOCATION_STATE_CANCELLED, pb.ALLOCATION_STATE_QUEUED)

ZONE = {"zone": "sim-a"}   # the session's simulated nodes only (fault scenarios add other pools)
other = tenant_fixture()


def _violations(status) -> list[str]:
    fields = []
    for d in status.details:
        br = error_details_pb2.BadRequest()
        if d.Unpack(br):
            fields += [v.field for v in br.field_violations]
    return fields


def test_a_batch_releases_cancels_and_refuses_item_by_item(control_plane, tenant, other):
    """Running items go to RELEASING with one billing stop, a queued one is cancelled, a released one is
    answered as is, and a malformed, an unknown and another tenant's id are refused on their own; each
    running item is then billed exactly once, up to that one stop."""
    running = [tenant.place(rid(), gpu_milli=100 + 50 * i, node_selector=ZONE) for i in range(3)]
    for a in running:
        tenant.wait_state(a.allocation_id, {RUNNING}, 30)
    done = tenant.place(rid(), gpu_milli=100, node_selector=ZONE)
    tenant.wait_state(done.allocation_id, {RUNNING}, 30)
    tenant.release(done.allocation_id)
    tenant.wait_state(done.allocation_id, {RELEASED}, 30)
    # A gang of every GPU of every node cannot start while the three above run: it waits.
    queued = tenant.place(rid(), gpu_count=GPUS, replicas=NODES, wait=True, queue_timeout_s=120,
                          node_selector=ZONE)
    assert queued.state == QUEUED
    theirs = other.place(rid(), gpu_milli=100)

    ids = [a.allocation_id for a in running] + [done.allocation_id, queued.allocation_id, "not-an-id",
                                                str(uuid.uuid4()), theirs.allocation_id, running[0].allocation_id]
    resp = tenant.release_batch(ids)
    assert len(resp.results) == len(ids)
    got = [r.allocation if r.HasField("allocation") else r.error for r in resp.results]
    for a, r in zip(running, got[:3]):
        assert r.allocation_id == a.allocation_id and r.state in (RELEASING, RELEASED), r
    assert got[3].state == RELEASED and got[3].allocation_id == done.allocation_id
    assert got[4].state == CANCELLED
    assert got[5].code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and _violations(got[5]) == ["allocation_ids[5]"]
    assert got[6].code == grpc.StatusCode.NOT_FOUND.value[0]
    assert got[7].code == grpc.StatusCode.NOT_FOUND.value[0]
    assert got[8].allocation_id == running[0].allocation_id and got[8].state in (RELEASING, RELEASED)
    # Another tenant's allocation was not touched.
    assert other.get(theirs.allocation_id).state in (pb.ALLOCATION_STATE_PLACED, RUNNING)

    final = [tenant.wait_state(a.allocation_id, {RELEASED}, 30) for a in running]
    stops = {a.stopped_at.ToMicroseconds() for a in final}
    assert len(stops) == 1, "one call, one billing stop"
    ray.get(control_plane.ledger.flush.remote(timeout_s=30), timeout=40)
    with psycopg.connect(control_plane.urls.app) as conn:
        for a in final:
            billed = conn.execute("SELECT coalesce(sum(gpu_milli_us), 0) FROM ledger.usage_entries "
                                  "WHERE allocation_id = %s", (a.allocation_id,)).fetchone()[0]
            milli = sum(len(x.gpu_indices) * x.gpu_milli for x in a.assignments)
            assert billed == milli * (a.stopped_at.ToMicroseconds() - a.running_since.ToMicroseconds())
    # Released twice in the call (items 0 and 8), moved once: one RELEASING event.
    [(n,)] = q(control_plane, "SELECT count(*) FROM control.allocation_events WHERE allocation_id = %s "
                              "AND to_state = 'RELEASING'", running[0].allocation_id)
    assert n == 1


def test_a_released_batch_gives_the_capacity_back(control_plane, tenant):
    """Every GPU of the fleet placed in one PlaceBatch, freed by one ReleaseBatch, can be placed again."""
    reqs = [Client.request(rid(), gpu_count=GPUS, node_selector=ZONE) for _ in range(NODES)]
    first = tenant.place_batch(reqs)
    assert all(r.HasField("allocation") for r in first.results), first
    ids = [r.allocation.allocation_id for r in first.results]
    for a in ids:
        tenant.wait_state(a, {RUNNING}, 30)
    resp = tenant.release_batch(ids)
    assert all(r.HasField("allocation") for r in resp.results), resp
    for a in ids:
        tenant.wait_state(a, {RELEASED}, 30)
    again = tenant.place_batch([Client.request(rid(), gpu_count=GPUS, node_selector=ZONE) for _ in range(NODES)])
    assert all(r.HasField("allocation") for r in again.results), again


def test_empty_and_oversized_release_batches_are_refused(control_plane, tenant):
    """0 ids and more than the maximum answer INVALID_ARGUMENT naming the field, and change nothing."""
    a = tenant.place(rid(), gpu_milli=100)
    for ids in ([], [a.allocation_id] * (control_plane.cfg.place_batch_items_max + 1)):
        with pytest.raises(grpc.RpcError) as err:
            tenant.release_batch(ids)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert tenant.get(a.allocation_id).state in (pb.ALLOCATION_STATE_PLACED, RUNNING)


def test_batch_and_single_releases_racing_move_each_allocation_once(control_plane, tenant):
    """A ReleaseBatch and single Releases of the same allocations, at the same time, from three threads:
    every call succeeds, each allocation moves to RELEASING once and is billed exactly once."""
    import concurrent.futures as cf

    resp = tenant.place_batch([Client.request(rid(), gpu_milli=50, node_selector=ZONE) for _ in range(24)])
    ids = [r.allocation.allocation_id for r in resp.results]
    assert len(ids) == 24 and all(ids)
    for a in ids:
        tenant.wait_state(a, {RUNNING}, 30)
    with cf.ThreadPoolExecutor(3) as ex:
        batch = ex.submit(tenant.release_batch, ids)
        singles = ex.submit(lambda: [tenant.release(a) for a in ids])
        reverse = ex.submit(tenant.release_batch, ids[::-1])
        answers = [batch.result(), reverse.result()]
        single_answers = singles.result()
    for resp in answers:
        assert all(r.HasField("allocation") and r.allocation.state in (RELEASING, RELEASED) for r in resp.results)
    assert all(a.state in (RELEASING, RELEASED) for a in single_answers)
    final = [tenant.wait_state(a, {RELEASED}, 30) for a in ids]
    ray.get(control_plane.ledger.flush.remote(timeout_s=30), timeout=40)
    moves = dict(q(control_plane, "SELECT allocation_id::text, count(*) FROM control.allocation_events "
                                  "WHERE allocation_id = ANY(%s::uuid[]) AND to_state = 'RELEASING' GROUP BY 1", ids))
    assert moves == {a: 1 for a in ids}
    with psycopg.connect(control_plane.urls.app) as conn:
        for a in final:
            billed = conn.execute("SELECT coalesce(sum(gpu_milli_us), 0) FROM ledger.usage_entries "
                                  "WHERE allocation_id = %s", (a.allocation_id,)).fetchone()[0]
            assert billed == 50 * (a.stopped_at.ToMicroseconds() - a.running_since.ToMicroseconds())


def test_a_batch_released_right_after_placing_is_read_once_and_freed_once(control_plane, tenant):
    """Released before their hand-off reaches the shard, the rows are read by the shard together (one
    query) rather than one by one; each is still released exactly once, and its capacity comes back."""
    resp = tenant.place_batch([Client.request(rid(), gpu_milli=10, node_selector=ZONE) for _ in range(30)])
    ids = [r.allocation.allocation_id for r in resp.results if r.HasField("allocation")]
    assert len(ids) == 30, resp
    out = tenant.release_batch(ids + ids[:3])  # three twice: the repeat is answered as it stands
    assert [r.allocation.allocation_id for r in out.results] == ids + ids[:3]
    assert all(r.allocation.state in (RELEASING, RELEASED) for r in out.results)
    for a in ids:
        tenant.wait_state(a, {RELEASED}, 60)
    counts = dict(q(control_plane, "SELECT allocation_id::text, count(*) FROM control.allocation_events"
                                   " WHERE allocation_id = ANY(%s::uuid[]) AND event = 'release_requested'"
                                   " GROUP BY 1", ids))
    assert counts == {a: 1 for a in ids}
    assert wait_capacity_back(control_plane, ids) == []
