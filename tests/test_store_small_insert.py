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


@pytest.mark.parametrize("n", [1, 3, store.SMALL_INSERT_MAX + 3])
def test_outbox_payloads_equal_a_snapshot_of_the_row_at_each_event(fresh_db, n):
    """The batch paths build one message per row and re-serialize it per event; each payload must be
    the message the per-transition path writes for the row as it was at that event. COPY writes the
    very same bytes; the one-statement path appends the event_id field last (migration 0008), which
    parses to the same message."""
    import dataclasses

    items = _items(n, "acme")
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
            if n > store.SMALL_INSERT_MAX:
                assert out == expected
            else:
                parse = events_pb2.AllocationTransitioned.FromString
                assert [parse(p) for p in out] == [parse(p) for p in expected]
                assert all(parse(p).event_id == e > 0 for p, e in zip(out, eids))


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16_383, 16_384, 2**31 - 1, 2**31, 2**35 + 7, 2**63 - 1])
def test_event_id_field_is_protobufs_own_encoding(fresh_db, value):
    with psycopg.connect(fresh_db.app) as conn:
        got = conn.execute("SELECT control.pb_event_id_field(%s)", (value,)).fetchone()[0]
    assert bytes(got) == events_pb2.AllocationTransitioned(event_id=value).SerializeToString() or value == 0
    assert events_pb2.AllocationTransitioned.FromString(bytes(got)).event_id == value


@pytest.mark.parametrize("n", [3, store.SMALL_INSERT_MAX + 1])
def test_a_write_on_an_autocommit_connection_is_all_or_nothing(fresh_db, n):
    """The writer's connection is autocommit: the one statement, or BEGIN … COPY … COMMIT past
    SMALL_INSERT_MAX, is the whole transaction. A batch one of whose rows cannot be written (here a
    request_id taken by a committed allocation) leaves no row, event or outbox message of any of its
    allocations."""
    first = _items(1, "acme")
    with psycopg.connect(fresh_db.app, autocommit=True) as conn:
        [eids] = store.insert_new_allocations(conn, first)
        assert len(eids) == 2
        batch = _items(n, "acme")
        taken = batch[1][0]
        batch[1] = (AllocRow(**{**taken.__dict__, "request_id": first[0][0].request_id}), batch[1][1])
        with pytest.raises(psycopg.errors.UniqueViolation):
            store.insert_new_allocations(conn, batch)
        ids = [r.allocation_id for r, _ in batch]
        for table, col in (("allocations", "allocation_id"), ("allocation_events", "allocation_id")):
            assert conn.execute(f"SELECT count(*) FROM control.{table} WHERE {col} = ANY(%s::uuid[])",
                                (ids,)).fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM control.outbox WHERE key = ANY(%s)", (ids,)).fetchone()[0] == 0
        # The connection is usable at once, and the next batch commits by itself.
        store.insert_new_allocations(conn, _items(2, "acme"))
    with psycopg.connect(fresh_db.app) as other:
        assert other.execute("SELECT count(*) FROM control.allocations").fetchone()[0] == 3
        assert other.execute("SELECT count(*) FROM control.outbox").fetchone()[0] == 6


def test_new_allocation_ids_are_distinct_version_4_uuids_in_canonical_text():
    ids = store.new_allocation_ids(5000)
    assert len(set(ids)) == len(ids) == 5000
    for s in ids:
        u = uuid.UUID(s)
        assert u.version == 4 and u.variant == uuid.RFC_4122 and str(u) == s
    # Every hex digit of the random positions turns up: the text is not a fixed pattern.
    assert {s[0] for s in ids} == set("0123456789abcdef") and {s[19] for s in ids} == set("89ab")
    assert store.new_allocation_ids(0) == []


def test_the_binary_copy_path_keeps_every_value_exactly(fresh_db):
    """COPY (binary) of a large group: bytes, text with tabs, newlines, backslashes and non-ASCII, JSON
    with the same, NULL and set timestamps all come back as written."""
    import datetime as dt

    items = _items(store.SMALL_INSERT_MAX + 2, "acme")
    odd = "tab\there, new\nline, back\\slash, \u00e9t\u00e9 \u2014 \U0001f680"
    for i, (row, _) in enumerate(items[:4]):
        row.reason = odd
        row.request = bytes(range(256))
        row.assignments = [{"node_id": f"n-\u00e9{i}", "gpu_indices": [0, 1], "gpu_milli": 1000, "gpu_model": odd,
                            "cpu_milli": 0, "memory_mib": 0}]
        row.queue_deadline = row.created_at + dt.timedelta(microseconds=123_457)
    with psycopg.connect(fresh_db.app) as conn:
        with conn.transaction():
            store.insert_new_allocations(conn, items)
        for row, _ in items[:6]:
            assert store.load_allocation(conn, row.allocation_id) == row


@pytest.mark.parametrize("events", [1, 2])
def test_one_new_allocation_alone_is_written_whole_by_its_statement(fresh_db, events):
    """A commit of one allocation: two events (placed at once) take the scalar statement, one (queued)
    the array statement. Either way the row, its events in chain order and one outbox row per event,
    whose payload carries that event's id, are all written."""
    [(row, chain)] = _items(1, "acme")
    if events == 1:
        row.state, row.version, row.assignments, row.gpu_milli_total = AllocState.QUEUED, 1, [], 0
        chain = chain[:1]
    with psycopg.connect(fresh_db.app, autocommit=True) as conn:
        [eids] = store.insert_new_allocations(conn, [(row, chain)])
        assert store.load_allocation(conn, row.allocation_id) == row
        assert len(eids) == events and eids == sorted(eids)
        ev = conn.execute("SELECT event_id, version, at FROM control.allocation_events WHERE allocation_id = %s"
                          " ORDER BY event_id", (row.allocation_id,)).fetchall()
        assert ev == [(e, v, row.updated_at) for e, v in zip(eids, range(1, events + 1))]
        out = [events_pb2.AllocationTransitioned.FromString(p) for (p,) in conn.execute(
            "SELECT payload FROM control.outbox WHERE key = %s ORDER BY id", (row.allocation_id,))]
        assert [(m.event_id, m.version, m.allocation_id) for m in out] == [
            (e, v, row.allocation_id) for e, v in zip(eids, range(1, events + 1))]
