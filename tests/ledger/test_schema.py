"""Append-only guards and the runtime role's privileges on the ledger schema."""
import psycopg
import pytest

from ledger import store
from tests.ledger.conftest import us

TABLES = ["accounts", "price_book", "meter_events", "usage_entries", "billing_entries", "dead_letters"]


def _one_usage(url):
    store.write_usage_batch(url, [store.UsageRow("00000000-0000-0000-0000-000000000001", 0, 0, 0, us(0), us(60), 1,
                                                 1000, "acme", "n1", "H100")])
    with psycopg.connect(url) as conn:
        st = store.LedgerStore(conn)
        with conn.transaction():
            st.lock()
            st.append_meter_events([store.MeterEvent(1, "00000000-0000-0000-0000-000000000001", store.START, us(0), 1,
                                                     "acme", "prepare_ok", (("n1", "H100", 1, 1000),))])
        conn.execute("INSERT INTO ledger.dead_letters (outbox_id, topic, key, reason, payload)"
                     " VALUES (1, 't', 'k', 'r', '\\x00')")
        conn.commit()


@pytest.mark.parametrize("table", TABLES)
def test_ledger_tables_reject_update_delete_truncate_even_for_owner(ledger_db, table):
    """Every ledger table refuses UPDATE, DELETE and TRUNCATE, even from the owner."""
    _one_usage(ledger_db.app)
    with psycopg.connect(ledger_db.owner, autocommit=True) as conn:
        before = conn.execute(f"SELECT count(*) FROM ledger.{table}").fetchone()[0]
        assert before > 0
        for stmt in (f"UPDATE ledger.{table} SET created_at = now()", f"DELETE FROM ledger.{table}",
                     f"TRUNCATE ledger.{table} CASCADE"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                conn.execute(stmt)
        assert conn.execute(f"SELECT count(*) FROM ledger.{table}").fetchone()[0] == before


def test_runtime_role_holds_only_insert_and_select(ledger_db):
    """gpuaas_app may SELECT and INSERT ledger rows; UPDATE, DELETE and TRUNCATE are denied by privilege."""
    _one_usage(ledger_db.app)
    with psycopg.connect(ledger_db.app, autocommit=True) as conn:
        for table in TABLES:
            privs = {p: conn.execute("SELECT has_table_privilege(%s, %s)", (f"ledger.{table}", p)).fetchone()[0]
                     for p in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")}
            assert privs == {"SELECT": True, "INSERT": True, "UPDATE": False, "DELETE": False, "TRUNCATE": False,
                             "REFERENCES": False, "TRIGGER": False}, table
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            conn.execute("UPDATE ledger.usage_entries SET gpu_milli = 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            conn.execute("DELETE FROM ledger.billing_entries")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SET session_replication_role = replica")


def _raw_usage_reversal(conn, seq_expr: str, reverses_id: int) -> None:
    """A reversal row of usage entry 1 inserted by hand, past the writer's own checks."""
    conn.execute(
        "INSERT INTO ledger.usage_entries (id, allocation_id, seq, replica, kind, interval_start, interval_end,"
        " gpu_count, gpu_milli, gpu_milli_us, util_bp, energy_mj, reverses_id, tenant_id, node_id, gpu_model,"
        f" hash) SELECT 99, allocation_id, {seq_expr}, replica, 1, interval_start, interval_end, gpu_count,"
        f" gpu_milli, -gpu_milli_us, util_bp, 0, {int(reverses_id)}, tenant_id, node_id, gpu_model, hash"
        " FROM ledger.usage_entries WHERE id = 1")


def _raw_billing_reversal(conn, usage_entry_id: int, side: int, reverses_id: int) -> None:
    """A reversal line of billing entry 1 inserted by hand, past the writer's own checks."""
    conn.execute(
        "INSERT INTO ledger.billing_entries (id, usage_entry_id, side, amount_micros, price_id, at,"
        f" reverses_id, account_id, currency, hash) SELECT 99, {int(usage_entry_id)}, {int(side)}, amount_micros,"
        f" price_id, at, {int(reverses_id)}, account_id, currency, hash FROM ledger.billing_entries WHERE id = 1")


def _append_unbilled_usage(conn) -> None:
    st = store.LedgerStore(conn)
    with conn.transaction():
        st.lock()
        st.append_usage([store.UsageRow("00000000-0000-0000-0000-000000000002", 0, 0, 0, us(0), us(60), 1, 1000,
                                        "acme", "n1", "H100")], bill=False)


def test_an_entry_can_be_reversed_only_once_by_the_database(ledger_db):
    """Past the writer's own check, a second reversal row of the same entry violates a unique index."""
    _one_usage(ledger_db.app)
    with psycopg.connect(ledger_db.app) as conn:
        st = store.LedgerStore(conn)
        with conn.transaction():
            st.lock()
            assert st.reverse_usage([1]).written == 1
        with pytest.raises(psycopg.errors.UniqueViolation, match="usage_entries_reverses_uq"):
            _raw_usage_reversal(conn, "seq + 1", 1)
        conn.rollback()
        _append_unbilled_usage(conn)  # entry 3
        with pytest.raises(psycopg.errors.UniqueViolation, match="billing_entries_reverses_uq"):
            _raw_billing_reversal(conn, 3, 2, 1)


def test_a_reversal_must_reference_an_existing_entry(ledger_db):
    """The database refuses a reversal row (usage or billing) whose reverses_id names no entry."""
    _one_usage(ledger_db.app)
    with psycopg.connect(ledger_db.app) as conn:
        with pytest.raises(psycopg.errors.ForeignKeyViolation, match="reverses id 42, which does not exist"):
            _raw_usage_reversal(conn, "seq", 42)
        conn.rollback()
        _append_unbilled_usage(conn)  # entry 2
        with pytest.raises(psycopg.errors.ForeignKeyViolation, match="reverses id 42, which does not exist"):
            _raw_billing_reversal(conn, 2, 1, 42)
