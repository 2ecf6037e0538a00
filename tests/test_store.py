"""actors/store.py against real Postgres: state, event and outbox move together."""
import dataclasses
import datetime as dt
import uuid

import psycopg
import pytest

from actors import store
from actors.store import AllocRow
from gpuaas.errors import FailedPrecondition
from gpuaas.lifecycle import AllocEvent, AllocState, IllegalTransition
from gpuaas.v1 import common_pb2, events_pb2


def _row(state=AllocState.PLACED, version=2):
    req = common_pb2.PlacementRequest(request_id="r-" + uuid.uuid4().hex[:6], gpu_count=2)
    now = store.utcnow()
    return AllocRow(allocation_id=str(uuid.uuid4()), tenant_id="acme", request_id=req.request_id,
                    request_hash=b"h", request=req.SerializeToString(), state=state, version=version,
                    assignments=[{"node_id": "n1", "gpu_indices": [0, 1], "gpu_milli": 1000, "gpu_model": "H100"}],
                    created_at=now, updated_at=now)


def _insert_placed(conn, *rows: AllocRow) -> None:
    """Commit new allocations as the placement actor does for a request placed at once."""
    with conn.transaction():
        store.insert_new_allocations(conn, [(r, [(AllocEvent.ACCEPTED, None), (AllocEvent.PLACED, AllocState.QUEUED)])
                                            for r in rows])


def _counts(conn, aid):
    ev = conn.execute("SELECT count(*) FROM control.allocation_events WHERE allocation_id=%s", (aid,)).fetchone()[0]
    ob = conn.execute("SELECT count(*) FROM control.outbox WHERE key=%s", (aid,)).fetchone()[0]
    return ev, ob


def test_new_allocation_and_transitions_write_event_and_outbox(fresh_db):
    """Each committed transition adds exactly one event row and one outbox row; billing times are set."""
    with psycopg.connect(fresh_db.app) as conn:
        row = _row()
        with conn.transaction():
            store.insert_new_allocations(conn, [(row, [(AllocEvent.ACCEPTED, None),
                                                       (AllocEvent.PLACED, AllocState.QUEUED)])])
        assert _counts(conn, row.allocation_id) == (2, 2)
        t_run = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.timezone.utc)
        with conn.transaction():
            row = store.transition_allocation(conn, row, AllocEvent.PREPARE_OK, at=t_run)
        with conn.transaction():
            row = store.transition_allocation(conn, row, AllocEvent.RELEASE_REQUESTED,
                                              at=t_run + dt.timedelta(seconds=90))
        assert _counts(conn, row.allocation_id) == (4, 4)
        back = store.load_allocation(conn, row.allocation_id)
        assert back.state is AllocState.RELEASING and back.version == 4
        assert back.running_since == t_run and back.stopped_at == t_run + dt.timedelta(seconds=90)
        payloads = [events_pb2.AllocationTransitioned.FromString(p) for (p,) in conn.execute(
            "SELECT payload FROM control.outbox WHERE key=%s ORDER BY id", (row.allocation_id,))]
        assert [p.to_state for p in payloads] == [1, 2, 3, 4]
        assert payloads[2].at.ToDatetime(tzinfo=dt.timezone.utc) == t_run
        ev_ids = [r[0] for r in conn.execute("SELECT event_id FROM control.allocation_events WHERE allocation_id=%s"
                                            " ORDER BY event_id", (row.allocation_id,))]
        assert [p.event_id for p in payloads] == ev_ids


def test_illegal_transition_writes_nothing(fresh_db):
    """An edge missing from the table raises and leaves row, events and outbox untouched."""
    with psycopg.connect(fresh_db.app) as conn:
        row = _row()
        with conn.transaction():
            store.insert_new_allocations(conn, [(row, [(AllocEvent.ACCEPTED, None),
                                                       (AllocEvent.PLACED, AllocState.QUEUED)])])
        with pytest.raises(IllegalTransition):
            with conn.transaction():
                store.transition_allocation(conn, row, AllocEvent.CLEANUP_OK)
        assert _counts(conn, row.allocation_id) == (2, 2)
        assert store.load_allocation(conn, row.allocation_id).state is AllocState.PLACED


def test_stale_version_is_refused_and_rolls_back(fresh_db):
    """Two writers racing on one allocation: the second (stale version) fails and writes nothing."""
    with psycopg.connect(fresh_db.app) as conn:
        row = _row()
        with conn.transaction():
            store.insert_new_allocations(conn, [(row, [(AllocEvent.ACCEPTED, None),
                                                       (AllocEvent.PLACED, AllocState.QUEUED)])])
        with conn.transaction():
            store.transition_allocation(conn, row, AllocEvent.PREPARE_OK)
        with pytest.raises(FailedPrecondition):
            with conn.transaction():
                store.transition_allocation(conn, row, AllocEvent.RELEASE_REQUESTED)
        assert _counts(conn, row.allocation_id) == (3, 3)


@pytest.mark.parametrize("group", [1, 5])
def test_a_group_of_transitions_writes_exactly_the_ones_that_pass(fresh_db, group):
    """transition_allocations: one statement; items whose version moved or whose edge is illegal get their
    own exception and write nothing; the others write their row, one event and one outbox row, whose
    payload is the per-transition path's."""
    with psycopg.connect(fresh_db.app) as conn:
        rows = [_row() for _ in range(group + 2)]
        _insert_placed(conn, *rows)
        ok, stale, illegal = rows[:group], rows[group], rows[group + 1]
        t = store.utcnow()
        items = [(r, AllocEvent.PREPARE_OK, {"at": t}) for r in ok]
        items.append((dataclasses.replace(stale, version=1), AllocEvent.PREPARE_OK, {"at": t}))
        items.append((illegal, AllocEvent.CLEANUP_OK, {"at": t}))
        with conn.transaction():
            out = store.transition_allocations(conn, items)
        assert isinstance(out[group], FailedPrecondition) and isinstance(out[group + 1], IllegalTransition)
        for r, new in zip(ok, out[:group]):
            assert new.state is AllocState.RUNNING and new.version == 3 and new.running_since == t
            assert store.load_allocation(conn, r.allocation_id) == new
            assert _counts(conn, r.allocation_id) == (3, 3)
            eid, payload = conn.execute(
                "SELECT e.event_id, o.payload FROM control.allocation_events e JOIN control.outbox o"
                " ON o.key = e.allocation_id::text AND o.id = (SELECT max(id) FROM control.outbox WHERE key = %s)"
                " WHERE e.allocation_id = %s AND e.version = 3", (r.allocation_id, r.allocation_id)).fetchone()
            parse = events_pb2.AllocationTransitioned.FromString
            assert parse(payload) == parse(store._transition_payload(new, AllocState.PLACED, AllocEvent.PREPARE_OK,
                                                                     eid, t))
        for r in (stale, illegal):
            assert store.load_allocation(conn, r.allocation_id).state is AllocState.PLACED
            assert _counts(conn, r.allocation_id) == (2, 2)


def test_a_chain_of_edges_is_one_update_with_one_event_per_edge(fresh_db):
    """transition_allocations with a tuple of events: PLACED → RELEASING → RELEASED in one statement
    (a release that nothing on a node needs cleaning up after). The row moves once, to the last edge's
    version; each edge writes its own event and outbox row, in order, with the per-transition payload.
    A chain whose first version moved, or with an illegal edge anywhere, writes nothing."""
    with psycopg.connect(fresh_db.app) as conn:
        ok, stale, illegal = _row(), _row(), _row()
        _insert_placed(conn, ok, stale, illegal)
        t = store.utcnow()
        chain = (AllocEvent.RELEASE_REQUESTED, AllocEvent.CLEANUP_OK)
        out = store.transition_allocations(conn, [
            (ok, chain, {"at": t}),
            (dataclasses.replace(stale, version=1), chain, {"at": t}),
            # RELEASING has no prepare_ok edge: the first edge is legal, the second is not.
            (illegal, (AllocEvent.RELEASE_REQUESTED, AllocEvent.PREPARE_OK), {"at": t})])
        conn.commit()
        assert isinstance(out[1], FailedPrecondition) and isinstance(out[2], IllegalTransition)
        new = out[0]
        assert new.state is AllocState.RELEASED and new.version == 4 and new.reason == AllocEvent.CLEANUP_OK.value
        assert new.running_since is None  # never ran: never billed
        assert store.load_allocation(conn, ok.allocation_id) == new
        evs = conn.execute("SELECT event_id, from_state, to_state, event, version FROM control.allocation_events"
                           " WHERE allocation_id = %s AND version > 2 ORDER BY event_id", (ok.allocation_id,)).fetchall()
        assert [e[1:] for e in evs] == [("PLACED", "RELEASING", "release_requested", 3),
                                        ("RELEASING", "RELEASED", "cleanup_ok", 4)]
        payloads = [p for (p,) in conn.execute("SELECT payload FROM control.outbox WHERE key = %s ORDER BY id",
                                               (ok.allocation_id,))][2:]
        parse = events_pb2.AllocationTransitioned.FromString
        releasing = dataclasses.replace(new, state=AllocState.RELEASING, version=3,
                                        reason=AllocEvent.RELEASE_REQUESTED.value)
        assert [parse(p) for p in payloads] == [
            parse(store._transition_payload(releasing, AllocState.PLACED, AllocEvent.RELEASE_REQUESTED, evs[0][0], t)),
            parse(store._transition_payload(new, AllocState.RELEASING, AllocEvent.CLEANUP_OK, evs[1][0], t))]
        for r in (stale, illegal):
            assert store.load_allocation(conn, r.allocation_id).state is AllocState.PLACED
            assert _counts(conn, r.allocation_id) == (2, 2)


def test_group_transitions_on_one_reused_plan_apply_exactly_the_rows_given(fresh_db):
    """On a connection with store.GROUP_WRITER_OPTIONS (an allocation shard's), the group transition is
    prepared after a few calls and then runs on one generic plan; groups of different sizes, before and
    after that point, each move exactly their own rows, and a stale version is still refused."""
    import asyncio

    from actors import runtime

    async def go():
        db = runtime.DbThread(fresh_db.app, "plan-test", options=store.GROUP_WRITER_OPTIONS)
        try:
            assert await db.tx(lambda c: c.execute("SHOW plan_cache_mode").fetchone()[0]) == "force_generic_plan"
            sizes = [1, 3, 1, 7, 2, 1, 5, 1, 4]  # past psycopg's prepare threshold (5 runs)
            groups = [[_row() for _ in range(k)] for k in sizes]
            stale = _row()  # committed, then moved on: this copy's version is behind
            with psycopg.connect(fresh_db.app) as conn, conn.transaction():
                store.insert_new_allocations(conn, [(r, [(AllocEvent.ACCEPTED, None),
                                                         (AllocEvent.PLACED, AllocState.QUEUED)])
                                                    for g in groups + [[stale]] for r in g])
                store.transition_allocation(conn, stale, AllocEvent.PREPARE_OK)
            for g in groups:
                out = await db.statement(store.transition_allocations,
                                         [(r, AllocEvent.PREPARE_OK, {}) for r in g] + [(stale, AllocEvent.PREPARE_OK, {})])
                assert [getattr(o, "state", None) for o in out[:-1]] == [AllocState.RUNNING] * len(g)
                assert isinstance(out[-1], FailedPrecondition)
            with psycopg.connect(fresh_db.app) as conn:
                states = dict(conn.execute("SELECT state, count(*) FROM control.allocations GROUP BY state").fetchall())
                assert states == {"RUNNING": sum(sizes) + 1}
                assert conn.execute("SELECT count(*) FROM control.allocation_events WHERE to_state = 'RUNNING'"
                                    ).fetchone()[0] == sum(sizes) + 1
        finally:
            db.close()

    asyncio.run(go())


def test_a_rows_replace_is_dataclasses_replace():
    row = AllocRow(allocation_id="a", tenant_id="t", request_id="r", request_hash=b"h", request=b"q",
                   state=AllocState.PLACED, assignments=[{"node_id": "n1"}])
    changes = dict(state=AllocState.RUNNING, version=3, reason="running")
    new = row.replace(**changes)
    assert new == dataclasses.replace(row, **changes) and type(new) is AllocRow
    assert row.state is AllocState.PLACED and row.version == 1  # the original is untouched
    assert new.assignments is row.assignments  # shared, as dataclasses.replace shares it
    new.version = 4
    assert row.version == 1
    with pytest.raises(TypeError):
        row.replace(stat=AllocState.RUNNING)


def test_a_group_keeps_the_stored_assignments_unless_an_edge_changes_them(fresh_db):
    """Unchanged assignments travel as NULL and the statement keeps the stored ones; an edge that changes
    them (a retry back to QUEUED with none, an empty list) writes the new ones, in the same group."""
    with psycopg.connect(fresh_db.app) as conn:
        kept, cleared, moved = _row(), _row(), _row()
        _insert_placed(conn, kept, cleared, moved)
        t = store.utcnow()
        other = [{"node_id": "n2", "gpu_indices": [5], "gpu_milli": 250, "gpu_model": "A100"}]
        with conn.transaction():
            out = store.transition_allocations(conn, [
                (kept, AllocEvent.PREPARE_OK, {"at": t}),
                (cleared, AllocEvent.PREPARE_FAILED_RETRY, {"at": t, "assignments": []}),
                (moved, AllocEvent.PREPARE_OK, {"at": t, "assignments": other})])
        assert [store.load_allocation(conn, r.allocation_id).assignments for r in (kept, cleared, moved)] == [
            kept.assignments, [], other]
        assert [o.assignments for o in out] == [kept.assignments, [], other]
