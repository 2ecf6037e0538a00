"""The ledger write path: validation, idempotency, batch atomicity, rating, reversals."""
import psycopg
import pytest

from ledger import store, verify
from ledger.errors import IdempotencyConflict, InvalidEntry
from ledger.store import UsageRow
from tests.ledger.conftest import count, us

A = "11111111-1111-1111-1111-111111111111"
B = "22222222-2222-2222-2222-222222222222"


def row(seq=0, start=0.0, end=60.0, milli=1000, count_=1, tenant="acme", model="H100", kind=0, alloc=A):
    return UsageRow(alloc, seq, 0, kind, us(start), us(end), count_, milli, tenant, "node-1", model)


def test_replay_same_body_is_exists_and_different_body_names_the_field(ledger_db):
    """A replayed entry is a no-op reported as exists; a different body raises naming the field."""
    rows = [row(0, 0, 60), row(1, 60, 120)]
    assert store.write_usage_batch(ledger_db.app, rows).written == 2
    again = store.write_usage_batch(ledger_db.app, rows)
    assert (again.written, again.exists) == (0, 2)
    with pytest.raises(IdempotencyConflict, match="different gpu_milli") as e:
        store.write_usage_batch(ledger_db.app, [row(1, 60, 120, milli=500)])
    assert e.value.field == "gpu_milli"
    with pytest.raises(IdempotencyConflict, match="different interval_end"):
        store.write_usage_batch(ledger_db.app, [row(0, 0, 61)])
    assert count(ledger_db.app, "ledger.usage_entries") == 2
    assert count(ledger_db.app, "ledger.billing_entries") == 4


def test_mixed_batch_with_a_conflict_commits_nothing(ledger_db):
    """A batch that fails midway (new rows + a conflicting replay) writes none of its rows."""
    store.write_usage_batch(ledger_db.app, [row(0)])
    with pytest.raises(IdempotencyConflict):
        store.write_usage_batch(ledger_db.app, [row(1, 60, 120), row(0, 0, 60, tenant="globex"), row(2, 120, 180)])
    assert count(ledger_db.app, "ledger.usage_entries") == 1
    assert verify.verify(ledger_db.app).ok


@pytest.mark.parametrize("bad,field,msg", [
    (dict(start=60, end=0), "interval_end", "ends before it starts"),
    (dict(start=60, end=60), "interval_end", "zero duration"),
    (dict(tenant="nobody"), "tenant_id", "unknown tenant 'nobody'"),
    (dict(model="Z9000"), "gpu_model", "no price for GPU model 'Z9000'"),
    (dict(milli=0), "gpu_milli", "gpu_milli must be 1..1000"),
    (dict(count_=-1), "gpu_count", "gpu_count must be positive"),
])
def test_bad_input_is_rejected_with_a_clear_error_and_nothing_written(ledger_db, bad, field, msg):
    """Negative/empty durations, unknown tenant or model, bad shares: clear error, no row of the batch written."""
    with pytest.raises(InvalidEntry, match=msg) as e:
        store.write_usage_batch(ledger_db.app, [row(0), row(1, **bad), row(2, 120, 180)])
    assert e.value.field == field
    assert count(ledger_db.app, "ledger.usage_entries") == 0
    assert count(ledger_db.app, "ledger.billing_entries") == 0


def test_price_missing_at_interval_start_is_rejected(ledger_db):
    """A model priced only from a later date cannot rate an earlier interval."""
    import datetime as dt
    from ledger import prices
    prices.set_price(ledger_db.app, "B200", 5_000_000, effective_from=dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc))
    with pytest.raises(InvalidEntry, match="no price for GPU model 'B200'"):
        store.write_usage_batch(ledger_db.app, [row(0, model="B200")])


def test_rating_is_exact_integer_and_double_entry(ledger_db):
    """One H100 for 60 s at 2.49/h is 41,500 micro-USD, debited to the tenant and credited to revenue."""
    store.write_usage_batch(ledger_db.app, [row(0, 0, 60), row(1, 60, 90, milli=250, count_=2)])
    with psycopg.connect(ledger_db.app) as conn:
        lines = conn.execute("SELECT usage_entry_id, side, amount_micros, account_id FROM ledger.billing_entries"
                             " ORDER BY id").fetchall()
        mus = [r[0] for r in conn.execute("SELECT gpu_milli_us FROM ledger.usage_entries ORDER BY id")]
    assert mus == [1000 * 60_000_000, 2 * 250 * 30_000_000]
    # 2 × 0.25 GPU × 30 s = 15 GPU-s → 2.49 × 15 / 3600 = 0.010375
    assert lines == [(1, 1, 41_500, "tenant:acme:USD"), (1, 2, 41_500, "revenue:USD"),
                     (2, 1, 10_375, "tenant:acme:USD"), (2, 2, 10_375, "revenue:USD")]


def test_versioned_price_applies_from_its_effective_time(ledger_db):
    """A new price version rates intervals starting at or after its effective_from; earlier ones keep the old."""
    from ledger import prices
    from tests.ledger.conftest import at
    prices.set_price(ledger_db.app, "H100", 3_600_000, effective_from=at(60))
    store.write_usage_batch(ledger_db.app, [row(0, 0, 60), row(1, 60, 120)])
    with psycopg.connect(ledger_db.app) as conn:
        amounts = [r[0] for r in conn.execute("SELECT amount_micros FROM ledger.billing_entries WHERE side = 1"
                                              " ORDER BY id")]
    assert amounts == [41_500, 60_000]


def test_reversal_is_a_new_entry_referencing_the_reversed_one(ledger_db):
    """Reversing an entry adds negated usage and swapped billing lines that point at the originals; net is zero."""
    store.write_usage_batch(ledger_db.app, [row(0), row(1, 60, 120)])
    with psycopg.connect(ledger_db.app) as conn:
        st = store.LedgerStore(conn)
        with conn.transaction():
            st.lock()
            res = st.reverse_usage([2])
        assert (res.written, res.billing_written) == (1, 2)
        with conn.transaction():
            st.lock()
            assert st.reverse_usage([2]).exists == 1
        rev = conn.execute("SELECT id, kind, reverses_id, gpu_milli_us FROM ledger.usage_entries WHERE kind = 1"
                           ).fetchall()
        assert rev == [(3, 1, 2, -60_000_000_000)]
        lines = conn.execute("SELECT side, amount_micros, reverses_id, account_id FROM ledger.billing_entries"
                             " WHERE usage_entry_id = 3 ORDER BY id").fetchall()
        assert lines == [(2, 41_500, 3, "tenant:acme:USD"), (1, 41_500, 4, "revenue:USD")]
        with pytest.raises(InvalidEntry, match="itself a reversal"):
            with conn.transaction():
                st.lock()
                st.reverse_usage([3])
    assert verify.verify(ledger_db.app).ok


def test_invalid_row_in_a_late_chunk_aborts_the_streamed_copy(ledger_db):
    """Earlier chunks are already on the wire when a later row fails validation: still nothing is written."""
    n = 3 * store.copy_chunk_rows + 7
    rows = [row(s, 60 * s, 60 * s + 60) for s in range(n)]
    rows[n - 3] = row(n - 3, 60 * (n - 3), 60 * (n - 3))  # zero duration, in the last chunk
    with pytest.raises(InvalidEntry, match=f"usage row {n - 3} .*zero duration") as e:
        store.write_usage_batch(ledger_db.app, rows)
    assert e.value.field == "interval_end"
    assert count(ledger_db.app, "ledger.usage_entries") == 0
    assert count(ledger_db.app, "ledger.billing_entries") == 0
    rows[n - 3] = row(n - 3, 60 * (n - 3), 60 * (n - 3) + 60)
    assert store.write_usage_batch(ledger_db.app, rows).written == n
    assert verify.verify(ledger_db.app).ok


def test_values_of_the_wrong_type_or_range_are_rejected(ledger_db):
    """A non-UUID allocation id or an integer outside its column's range is an InvalidEntry, nothing written."""
    with pytest.raises(InvalidEntry, match="not a UUID") as e:
        store.write_usage_batch(ledger_db.app, [row(0), row(1, 60, 120, alloc="not-a-uuid")])
    assert e.value.field == "allocation_id"
    with pytest.raises(InvalidEntry, match="usage row 1: value of the wrong type or out of range"):
        store.write_usage_batch(ledger_db.app, [row(0), row(2**40, 60, 120)])
    assert count(ledger_db.app, "ledger.usage_entries") == 0


def test_long_lived_store_sees_new_tenants_and_new_prices(ledger_db):
    """A store that cached tenants and prices picks up a tenant and a price version added by another connection."""
    from ledger import prices
    from tests.ledger.conftest import at
    with psycopg.connect(ledger_db.app) as conn:
        st = store.LedgerStore(conn)
        with conn.transaction():
            st.lock()
            st.append_usage([row(0, 0, 60)])
        with psycopg.connect(ledger_db.owner, autocommit=True) as owner:
            owner.execute("INSERT INTO iam.tenants (tenant_id, name) VALUES ('initech', 'Initech')")
        prices.set_price(ledger_db.app, "H100", 3_600_000, effective_from=at(60))
        with conn.transaction():
            st.lock()
            res = st.append_usage([row(1, 60, 120), row(0, 0, 60, tenant="initech", alloc=B)])
        assert res.written == 2
        amounts = [r[0] for r in conn.execute("SELECT amount_micros FROM ledger.billing_entries WHERE side = 1"
                                              " ORDER BY id")]
        assert amounts == [41_500, 60_000, 41_500]  # the new version rates from at(60) on; initech's row is before it
        with pytest.raises(InvalidEntry, match="unknown tenant 'hooli'"):
            with conn.transaction():
                st.lock()
                st.append_usage([row(2, 120, 180), row(0, 0, 60, tenant="hooli", alloc=B)])
    assert count(ledger_db.app, "ledger.usage_entries") == 3
    assert verify.verify(ledger_db.app).ok
