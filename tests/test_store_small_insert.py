"""New allocations written by the one-statement path (small batches) and by COPY (large) are the same rows."""
from __future__ import annotations

import uuid

import psycopg
import pytest

from actors import store
from actors.store import AllocRow, utcnow
from gpuaas.lifecycle import AllocEvent, AllocState
from gpuaas.v1 import events_pb2


def _items(n: int, tenant: str):
    now = utcnow()
    out = []
    for i in range(n):
        r = AllocRow(allocation_id=str(uuid.uuid4()), tenant_id=tenant, request_id=f"r-{uuid.uuid4().hex}",
                     request_hash=bytes(range(32)), request=b"\x00\x01request", state=AllocState.PLACED, version=2,
                     reason="placed", priority=i % 3, gpu_model="H100", gpu_milli_total=250, created_at=now,
                     updated_at=now, lease_expires_at=now if i % 2 else None,
                     assignments=[{"node_id": "n1", "gpu_indices": [i % 8], "gpu_milli": 250, "gpu_model": "H100",
                                   "cpu_milli": 1000, "memory_mib": 512}])
        out.append((r, [(AllocEvent.ACCEPTED, None), (AllocEvent.PLACED, AllocState.QUEUED)]))
    return out


@pytest.mark.parametrize("n", [1, store.SMALL_INSERT_MAX, store.SMALL_INSERT_MAX + 1, 40])
def test_both_write_paths_store_rows_events_and_outbox_in_order(fresh_db, n):
    items = _items(n, "acme")
    with psycopg.connect(fresh_db.app) as conn:
        with conn.transaction():
            ids = store.insert_new_allocations(conn, items)
        for (row, _), eids in zip(items, ids):
            back = store.load_allocation(conn, row.allocation_id)
            assert back == row
            ev = conn.execute("SELECT event_id, event, from_state, to_state, version FROM control.allocation_events"
                              " WHERE allocation_id = %s ORDER BY event_id", (row.allocation_id,)).fetchall()
            assert ev == [(eids[0], "accepted", None, "QUEUED", 1), (eids[1], "placed", "QUEUED", "PLACED", 2)]
            out = conn.execute("SELECT payload FROM control.outbox WHERE key = %s ORDER BY id",
                               (row.allocation_id,)).fetchall()
            assert [events_pb2.AllocationTransitioned.FromString(p).event_id for (p,) in out] == eids


def test_outbox_payloads_equal_a_snapshot_of_the_row_at_each_event(fresh_db):
    """The batch path builds one message per row and re-serializes it per event; the bytes must be
    what the per-transition path writes for the row as it was at that event."""
    import dataclasses

    items = _items(store.SMALL_INSERT_MAX + 3, "acme")
    with psycopg.connect(fresh_db.app) as conn:
        with conn.transaction():
            ids = store.insert_new_allocations(conn, items)
        for (row, evs), eids in zip(items, ids):
            out = [p for (p,) in conn.execute("SELECT payload FROM control.outbox WHERE key = %s ORDER BY id",
                                              (row.allocation_id,))]
            expected, version = [], row.version - len(evs)
            for (event, src), eid in zip(evs, eids):
                version += 1
                dst = AllocState.QUEUED if src is None else row.state
                snap = dataclasses.replace(row, state=dst, version=version)
                expected.append(store._transition_payload(snap, src, event, eid, row.updated_at))
            assert out == expected
