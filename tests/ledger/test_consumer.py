"""Metering from the outbox: the lifecycle's billing rules, restarts, late stops, dead letters, gaps."""
import time

import psycopg
import pytest

from ledger import reports, verify
from ledger.consumer import LedgerConsumer
from tests.ledger.conftest import S, count, net_milli_us, us

H100x2 = [("node-1", [0, 1], 1000, "H100")]
GPU_S = 1000 * 1_000_000  # gpu-milli-µs in one GPU-second


def consumer(db, **kw):
    kw.setdefault("meter_interval_s", 60.0)
    return LedgerConsumer(db.app, **kw).open()


@pytest.mark.parametrize("event,dst", [
    ("release_requested", S.ALLOCATION_STATE_RELEASING), ("lease_expired", S.ALLOCATION_STATE_RELEASING),
    ("preempted", S.ALLOCATION_STATE_RELEASING), ("node_lost", S.ALLOCATION_STATE_FAILED),
    ("gpu_fault", S.ALLOCATION_STATE_FAILED)])
def test_billing_stops_at_each_exit_transition_time(ledger_db, outbox, event, dst):
    """Billing runs from the RUNNING event's time to the exit event's time; cleanup retries add nothing."""
    a = outbox.run("acme", 10, H100x2)
    outbox.stop(a, "acme", 10 + 125.5, event, dst)
    if dst == S.ALLOCATION_STATE_RELEASING:
        for _ in range(3):  # platform cleanup retries: never billed
            outbox.emit(a, "acme", S.ALLOCATION_STATE_RELEASING, S.ALLOCATION_STATE_RELEASING, "cleanup_failed",
                        outbox_at(200))
        outbox.emit(a, "acme", S.ALLOCATION_STATE_RELEASING, S.ALLOCATION_STATE_RELEASED, "cleanup_ok", outbox_at(300))
    else:
        outbox.emit(a, "acme", S.ALLOCATION_STATE_FAILED, S.ALLOCATION_STATE_RELEASED, "cleanup_ok", outbox_at(300))
    with consumer(ledger_db) as c:
        assert c.flush(5)["done"]
        assert c.stats()["open_meters"] == 0
        assert c.close_intervals(us(10_000)) == 0  # nothing runs any more
    assert net_milli_us(ledger_db.app, a) == 2 * 125.5 * GPU_S
    with psycopg.connect(ledger_db.app) as conn:
        ivs = conn.execute("SELECT seq, interval_start, interval_end FROM ledger.usage_entries ORDER BY seq").fetchall()
    assert [(s, (b - a_).total_seconds()) for s, a_, b in ivs] == [(0, 60.0), (1, 60.0), (2, 5.5)]
    assert verify.verify(ledger_db.app).ok


def outbox_at(s):
    from tests.ledger.conftest import at
    return at(s)


def test_fractional_gang_is_billed_by_milli_share(ledger_db, outbox):
    """Two replicas of 2 × 0.25 GPU for 30 s bill 30 GPU-seconds, one usage row per replica."""
    a = outbox.run("globex", 0, [("n1", [0, 1], 250, "A100"), ("n2", [3, 4], 250, "A100")])
    outbox.stop(a, "globex", 30)
    with consumer(ledger_db) as c:
        c.flush(5)
    assert net_milli_us(ledger_db.app, a) == 30 * GPU_S
    r = reports.usage_by_tenant(ledger_db.app)
    # 30 GPU-s of A100 at 1.69/h = 0.014083 (two rows of 7,042 after half-up rounding)
    assert r == [dict(tenant_id="globex", gpu_seconds=30.0, cost_micros=14_084, currency="USD")]


def test_paced_closing_writes_the_same_intervals_over_several_calls(ledger_db, outbox):
    """close_intervals(rows_max=…) writes at most that many rows a call; the calls together write exactly what
    one unpaced call would (the tick paces a burst of allocations started together)."""
    allocs = [outbox.run("acme", 0, [("node-1", [g], 1000, "H100")]) for g in range(3)]
    with consumer(ledger_db) as c:
        c.flush(5)
        got = [c.close_intervals(us(150), rows_max=2) for _ in range(4)]
        assert got == [2, 2, 2, 0]                      # 3 allocations × [0,60), [60,120)
        assert c.close_intervals(us(150)) == 0
    for a in allocs:
        assert net_milli_us(ledger_db.app, a) == 120 * GPU_S
    assert verify.verify(ledger_db.app).ok


def test_intervals_close_on_the_tick_and_a_restart_never_double_bills(ledger_db, outbox):
    """Ticks close full intervals; a new consumer resumes from the cursor and ledger, redelivery is a no-op."""
    a = outbox.run("acme", 0, H100x2)
    c1 = consumer(ledger_db)
    c1.flush(5)
    assert c1.close_intervals(us(59.9)) == 0
    assert c1.close_intervals(us(150)) == 2          # [0,60), [60,120)
    assert c1.close_intervals(us(150)) == 0
    c1.close()                                         # crash: the open interval [120, …) is lost from memory
    c2 = consumer(ledger_db)
    assert c2.stats()["open_meters"] == 1
    assert c2.close_intervals(us(250)) == 2           # recovered: [120,180), [180,240)
    outbox.stop(a, "acme", 270)
    c2.flush(5)
    c2.close()
    # Redeliver everything: rewind the cursor as if the commit had been lost.
    with psycopg.connect(ledger_db.owner, autocommit=True) as conn:
        conn.execute("UPDATE control.outbox_cursors SET last_id = 0 WHERE consumer = 'ledger'")
    with consumer(ledger_db) as c3:
        assert c3.flush(5)["done"]
        assert c3.stats().get("redelivered") == 2
        assert c3.close_intervals(us(10_000)) == 0
    assert net_milli_us(ledger_db.app, a) == 2 * 270 * GPU_S
    assert count(ledger_db.app, "ledger.usage_entries") == 5
    assert verify.verify(ledger_db.app).ok


def test_late_stop_reverses_overclosed_intervals_and_reissues_the_partial(ledger_db, outbox):
    """A stop committed after the tick closed past it is corrected by reversal entries, never edits."""
    a = outbox.run("acme", 0, H100x2)
    with consumer(ledger_db) as c:
        c.flush(5)
        assert c.close_intervals(us(185)) == 3        # [0,60) [60,120) [120,180)
        outbox.stop(a, "acme", 90)                     # the stop happened at 90 s
        c.flush(5)
        assert c.stats()["late_stop_corrections"] == 1
    assert net_milli_us(ledger_db.app, a) == 2 * 90 * GPU_S
    with psycopg.connect(ledger_db.app) as conn:
        kinds = conn.execute("SELECT seq, kind, gpu_milli_us / %s FROM ledger.usage_entries ORDER BY id",
                             (GPU_S,)).fetchall()
        cost = conn.execute("SELECT sum(CASE side WHEN 1 THEN amount_micros ELSE -amount_micros END)"
                            " FROM ledger.billing_entries WHERE account_id = 'tenant:acme:USD'").fetchone()[0]
    assert kinds == [(0, 0, 120), (1, 0, 120), (2, 0, 120), (1, 1, -120), (2, 1, -120), (1, 2, 60)]
    assert cost == 3 * 83_000 - 2 * 83_000 + 41_500   # 2 GPUs × 2.49/h: 83,000 per minute
    assert verify.verify(ledger_db.app).ok


def test_unmeterable_events_are_dead_lettered_and_the_consumer_moves_on(ledger_db, outbox):
    """Unknown tenant, unpriced model and a second RUNNING are dead-lettered; valid events still bill."""
    bad_tenant = outbox.run("nobody", 0, H100x2)
    bad_model = outbox.run("acme", 0, [("n1", [0], 1000, "Z9000")])
    good = outbox.run("acme", 0, H100x2)
    outbox.stop(good, "acme", 60)
    outbox.emit(good, "acme", S.ALLOCATION_STATE_PLACED, S.ALLOCATION_STATE_RUNNING, "prepare_ok", outbox_at(70),
                H100x2)
    outbox.stop(bad_tenant, "nobody", 60)
    with consumer(ledger_db) as c:
        assert c.flush(5)["done"]
        st = c.stats()
    reasons = [d["reason"] for d in reports.dead_letters(ledger_db.app)]
    assert any("unknown tenant 'nobody'" in r for r in reasons)
    assert any("no price for GPU model 'Z9000'" in r for r in reasons)
    assert any("billing never restarts" in r for r in reasons)
    assert any("start was never metered" in r for r in reasons)
    assert st["dead_letters"] == 4
    assert net_milli_us(ledger_db.app, bad_tenant) == 0 and net_milli_us(ledger_db.app, bad_model) == 0
    assert net_milli_us(ledger_db.app, good) == 2 * 60 * GPU_S


def test_telemetry_fills_utilization_and_energy(ledger_db, outbox):
    """Telemetry windows give the interval's weighted utilization and prorated energy; absent → zeros."""
    a = outbox.run("acme", 0, H100x2)
    b = outbox.run("globex", 0, H100x2)
    with consumer(ledger_db) as c:
        c.flush(5)
        c.record_telemetry(a, 50.0, 1000.0, us(0), us(30))
        c.record_telemetry(a, 100.0, 3000.0, us(30), us(90))   # half of it falls in [0, 60)
        c.close_intervals(us(60))
    with psycopg.connect(ledger_db.app) as conn:
        got = conn.execute("SELECT tenant_id, replica, util_bp, energy_mj FROM ledger.usage_entries ORDER BY id"
                           ).fetchall()
    assert sorted(got) == [("acme", 0, 7500, 2_500_000), ("globex", 0, 0, 0)]


def test_uncommitted_outbox_row_below_a_committed_one_is_not_skipped(ledger_db, outbox):
    """The cursor waits at a gap while its writer is in flight, and skips it only once rolled back."""
    a = outbox.run("acme", 0, H100x2)
    with consumer(ledger_db, gap_settle_s=0.1) as c:
        c.flush(5)
        slow = psycopg.connect(ledger_db.app)          # a writer that has taken an id but not committed
        outbox.stop(a, "acme", 30, conn=slow)
        b = outbox.run("globex", 0, H100x2)            # later ids commit first
        outbox.stop(b, "globex", 30)
        for _ in range(5):
            c.poll_once()
            time.sleep(0.05)
        assert a in c.meters                           # its stop is still invisible
        assert net_milli_us(ledger_db.app, b) == 0     # held back behind the gap
        slow.commit()
        slow.close()
        assert c.flush(5)["done"]
        assert net_milli_us(ledger_db.app, a) == net_milli_us(ledger_db.app, b) == 2 * 30 * GPU_S
        # A rolled-back writer leaves a permanent gap: skipped after it settles.
        rb = psycopg.connect(ledger_db.app)
        outbox.stop(b, "globex", 40, conn=rb)
        rb.rollback()
        rb.close()
        d = outbox.run("acme", 100, H100x2)
        assert c.flush(5)["done"]
        assert c.stats()["outbox_gaps_skipped"] >= 1
        assert d in c.meters


def test_the_due_index_names_the_earliest_open_interval_through_starts_stops_and_closes(ledger_db, outbox):
    """next_close_due_us comes from an index, not a scan: after every start, stop and close it must equal
    the earliest end of an open interval over all meters, and closing in steps bills what one pass would."""
    import random

    rng = random.Random(5)
    starts = {outbox.run("acme", s, [("node-1", [i % 8], 500, "H100")]): s
              for i, s in enumerate(rng.sample(range(0, 300), 12))}
    stopped = {}
    for a in rng.sample(sorted(starts), 4):
        stopped[a] = starts[a] + rng.randint(30, 200) + 0.5
        outbox.stop(a, "acme", stopped[a])

    def brute(c):
        return min((m.closed_until_us + m.interval_us for m in c.meters.values()), default=None)

    with consumer(ledger_db, batch_size_max=5) as c:
        while c.poll_once():
            assert c.next_close_due_us() == brute(c)
        assert len(c.meters) == 12 - len(stopped)
        horizon = 0
        while horizon < 1000:  # paced: some due intervals are left for the next call
            horizon += rng.randint(20, 90)
            c.close_intervals(us(horizon), rows_max=3)
            assert c.next_close_due_us() == brute(c)
        c.close_intervals(us(horizon))
        assert c.next_close_due_us() == brute(c) > us(horizon)
    with consumer(ledger_db) as c2:  # a restart rebuilds the index from the ledger
        assert c2.next_close_due_us() == brute(c2)
    for a, s in starts.items():
        end = stopped.get(a)
        if end is None:  # closed up to the last full interval before the final horizon
            full = int((horizon - s) // 60) * 60
            assert net_milli_us(ledger_db.app, a) == full * GPU_S // 2
        else:
            assert net_milli_us(ledger_db.app, a) == int((end - s) * 1000) * GPU_S // 2 // 1000
    assert verify.verify(ledger_db.app).ok


def test_allocation_ids_that_are_not_canonical_uuids_are_dead_lettered(ledger_db, outbox):
    """Only the canonical text of a UUID (the form every allocation id takes) is metered; another
    spelling of a UUID (upper case, no dashes: the event table's uuid column takes both) is
    dead-lettered, and the batch moves on."""
    import uuid

    good = outbox.run("acme", 0, H100x2)
    for bad in (str(uuid.uuid4()).upper(), str(uuid.uuid4()).replace("-", "")):
        outbox.run("acme", 0, H100x2, alloc=bad)
    with consumer(ledger_db) as c:
        assert c.flush(5)["done"]
        st = c.stats()
    reasons = [d["reason"] for d in reports.dead_letters(ledger_db.app)]
    assert sum("is not a UUID" in r for r in reasons) == 2 and st["dead_letters"] == 2
    with psycopg.connect(ledger_db.app) as conn:
        started = [str(a) for (a,) in conn.execute("SELECT allocation_id FROM ledger.meter_events")]
    assert started == [good]
