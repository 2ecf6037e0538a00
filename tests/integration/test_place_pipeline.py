"""The placement committer decides batch k+1 while batch k commits. A request_id that is in an
uncommitted batch must still name one allocation: concurrent batches with the same ids get the
same allocation (or a retryable error), never a second row."""
from __future__ import annotations

import concurrent.futures as cf

from gpuaas.client import Client
from tests.integration.conftest import q, rid

ZONE = {"zone": "sim-a"}


def test_the_same_request_ids_in_concurrent_batches_make_one_allocation_each(control_plane, admin, tenant):
    token = admin.create_token(tenant.tenant_id)
    clients = [Client(control_plane.address, token) for _ in range(4)]
    try:
        for _ in range(5):
            ids = [rid() for _ in range(60)]
            reqs = [Client.request(i, gpu_milli=1, node_selector=ZONE) for i in ids]
            with cf.ThreadPoolExecutor(4) as ex:
                answers = list(ex.map(lambda c: c.place_batch(reqs), clients))
            named: dict[str, set[str]] = {i: set() for i in ids}
            for resp in answers:
                for i, r in zip(ids, resp.results):
                    if r.HasField("allocation"):
                        named[i].add(r.allocation.allocation_id)
                    else:  # only a retryable answer is acceptable for a duplicate still committing
                        assert r.error.code == 14, r.error  # UNAVAILABLE
            rows = dict(q(control_plane, "SELECT request_id, allocation_id::text FROM control.allocations"
                                         " WHERE tenant_id = %s AND request_id = ANY(%s)", tenant.tenant_id, ids))
            assert set(rows) == set(ids)
            for i in ids:
                assert named[i] <= {rows[i]}, (i, named[i], rows[i])
                assert named[i], f"{i}: no client got an allocation"
    finally:
        for c in clients:
            c.close()


def test_a_different_body_under_an_id_in_flight_is_refused(control_plane, admin, tenant):
    c2 = Client(control_plane.address, admin.create_token(tenant.tenant_id))
    try:
        ids = [rid() for _ in range(40)]
        a = [Client.request(i, gpu_milli=1, node_selector=ZONE) for i in ids]
        b = [Client.request(i, gpu_milli=2, node_selector=ZONE) for i in ids]
        with cf.ThreadPoolExecutor(2) as ex:
            ra, rb = ex.map(lambda x: x[0].place_batch(x[1]), [(tenant, a), (c2, b)])
        for x, y in zip(ra.results, rb.results):
            # Exactly one body wins each id; the other is ALREADY_EXISTS (6).
            won = [r for r in (x, y) if r.HasField("allocation") and not r.existing]
            lost = [r for r in (x, y) if r.HasField("error")]
            assert len(won) == 1 and len(lost) == 1 and lost[0].error.code == 6, (x, y)
    finally:
        c2.close()


def test_the_server_records_each_unary_place_latency(control_plane, tenant):
    import ray

    ray.get(control_plane.placement.place_latency.remote())  # clear
    for _ in range(3):
        tenant.place(rid(), gpu_milli=1, node_selector=ZONE)
    lat = ray.get(control_plane.placement.place_latency.remote())
    assert len(lat) == 3 and all(0 < x < 30 for x in lat)
    assert ray.get(control_plane.placement.place_latency.remote()) == []  # read once, then cleared
