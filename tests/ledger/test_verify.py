"""Tamper evidence: verify recomputes every chain and the balance and names the first bad row."""
import psycopg
import pytest

from ledger import store, verify
from ledger.store import UsageRow
from tests.ledger.conftest import us

A = "22222222-2222-2222-2222-222222222222"


def _fill(url, n=20):
    store.write_usage_batch(url, [UsageRow(A, i, 0, 0, us(60 * i), us(60 * i + 60), 1, 1000, "acme", "n1", "H100")
                                  for i in range(n)])


def _as_superuser(url, sql):
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")  # bypasses the append-only triggers
        conn.execute(sql)


def test_verify_passes_on_an_untouched_ledger_and_counts_entries(ledger_db):
    """An honest ledger verifies: every chained row counted, debits = credits."""
    _fill(ledger_db.app)
    res = verify.verify(ledger_db.app)
    assert res.ok, res.message
    assert res.per_table == {"price_book": 10, "meter_events": 0, "usage_entries": 20, "billing_entries": 40}
    assert res.balances["USD"][0] == res.balances["USD"][1] == 20 * 41_500
    assert verify.main(["--url", ledger_db.owner]) == 0


@pytest.mark.parametrize("sql,first_bad", [
    ("UPDATE ledger.usage_entries SET gpu_milli_us = gpu_milli_us / 2 WHERE id = 7", "ledger.usage_entries id 7"),
    ("UPDATE ledger.billing_entries SET amount_micros = 1 WHERE id = 12", "ledger.billing_entries id 12"),
    ("UPDATE ledger.billing_entries SET account_id = 'tenant:globex:USD' WHERE id = 5",
     "ledger.billing_entries id 5"),
    ("UPDATE ledger.price_book SET micros_per_gpu_hour = 1 WHERE gpu_model = 'H100'", "ledger.price_book id 1"),
    ("DELETE FROM ledger.billing_entries WHERE id IN (9, 10)", "ledger.billing_entries id 11"),
    ("UPDATE ledger.usage_entries SET hash = (SELECT hash FROM ledger.usage_entries WHERE id = 3) WHERE id = 4",
     "ledger.usage_entries id 4"),
])
def test_verify_catches_superuser_tampering_and_names_the_first_bad_row(ledger_db, capsys, sql, first_bad):
    """Edits and deletions made as superuser past the triggers are caught at the first altered row."""
    _fill(ledger_db.app)
    _as_superuser(ledger_db.owner, sql)
    res = verify.verify(ledger_db.owner)
    assert not res.ok
    assert res.first_bad == first_bad, res.message
    assert verify.main(["--url", ledger_db.owner]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_verify_catches_an_unbalanced_book_even_with_a_consistent_chain(ledger_db):
    """A forged but correctly chained one-sided line still fails the debits = credits check."""
    _fill(ledger_db.app, 2)
    with psycopg.connect(ledger_db.app) as conn:
        st = store.LedgerStore(conn)
        with conn.transaction():
            st.lock()
            st.append_usage([UsageRow(A, 9, 0, 0, us(0), us(1), 1, 1000, "acme", "n1", "H100")], bill=False)
            st._write_billing([(3, store.DEBIT, 5, 1, us(0), None, "tenant:acme:USD", "USD")])
    res = verify.verify(ledger_db.app)
    assert not res.ok and res.first_bad == "ledger.billing_entries usage_entry_id 3", res.message
