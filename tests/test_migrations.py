"""Migrations and the append-only guards of the control schema."""
import psycopg
import pytest

from ledger.migrate import apply_migrations, migration_files


def test_migrations_apply_once_and_are_recorded(fresh_db):
    """Every migration file is recorded once; re-running applies nothing."""
    assert apply_migrations(fresh_db.owner) == []
    with psycopg.connect(fresh_db.owner) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM public.schema_migrations ORDER BY name")]
    assert names == [p.name for p in migration_files()]


@pytest.mark.parametrize("table", ["control.allocation_events", "control.node_events", "control.outbox"])
def test_event_tables_reject_update_delete_truncate(fresh_db, table):
    """Event and outbox rows cannot be changed or removed, even by the owner."""
    with psycopg.connect(fresh_db.owner, autocommit=True) as conn:
        if table == "control.allocation_events":
            conn.execute("INSERT INTO control.allocation_events (allocation_id, tenant_id, to_state, event, version, at)"
                         " VALUES (gen_random_uuid(), 't', 'QUEUED', 'accepted', 1, now())")
        elif table == "control.node_events":
            conn.execute("INSERT INTO control.node_events (node_id, to_state, event, automatic, at)"
                         " VALUES ('n', 'READY', 'registered', true, now())")
        else:
            conn.execute("INSERT INTO control.outbox (topic, key, payload) VALUES ('t', 'k', '\\x00')")
        for stmt in (f"UPDATE {table} SET created_at = now()" if table == "control.outbox"
                     else f"UPDATE {table} SET at = now()",
                     f"DELETE FROM {table}", f"TRUNCATE {table}"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                conn.execute(stmt)
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 1


def test_opaque_columns_carry_no_planner_statistics(fresh_db):
    """ANALYZE skips the columns no query filters on (migration 0009): their statistics cost most of an
    ANALYZE of control.allocations, which autovacuum runs in one burst as the table grows."""
    with psycopg.connect(fresh_db.owner, autocommit=True) as conn:
        conn.execute("INSERT INTO control.outbox (topic, key, payload) VALUES ('t', 'k', '\\x00')")
        conn.execute("ANALYZE control.allocations, control.outbox")
        skipped = {(t, c) for t, c in conn.execute(
            "SELECT c.relname, a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'control' AND a.attnum > 0"
            " AND a.attstattarget = 0")}
        assert skipped == {("allocations", "assignments"), ("allocations", "request"),
                           ("allocations", "request_hash"), ("outbox", "payload")}
        analyzed = {c for (c,) in conn.execute(
            "SELECT attname FROM pg_stats WHERE schemaname = 'control' AND tablename = 'outbox'")}
        assert "key" in analyzed and "payload" not in analyzed


def test_one_index_per_event_keyed_by_allocation_and_lookups_still_use_it(fresh_db):
    """Migration 0010 leaves one index led by allocation_id on control.allocation_events, the unique
    (allocation_id, version), and a lookup of an allocation's events in order still reads it."""
    with psycopg.connect(fresh_db.owner, autocommit=True) as conn:
        led = [name for name, cols in conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'control'"
            " AND tablename = 'allocation_events'") if "(allocation_id" in cols]
        assert led == ["allocation_events_version_uq"]
        conn.execute("INSERT INTO control.allocation_events (allocation_id, tenant_id, to_state, event, version, at)"
                     " SELECT gen_random_uuid(), 't', 'QUEUED', 'accepted', 1, now() FROM generate_series(1, 5000)")
        conn.execute("ANALYZE control.allocation_events")
        aid = conn.execute("SELECT allocation_id FROM control.allocation_events LIMIT 1").fetchone()[0]
        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN SELECT event_id, version FROM control.allocation_events WHERE allocation_id = %s"
            " ORDER BY event_id", (aid,)))
        assert "allocation_events_version_uq" in plan, plan
