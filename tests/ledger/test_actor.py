"""LedgerActor on real Ray: background polling meters the outbox; flush, close_intervals, stats, stop."""
import time

import pytest
import ray

import datetime as dt

from tests.ledger.conftest import T0, net_milli_us, us


@pytest.fixture
def ray_local(ray_session):
    yield


def test_ledger_actor_meters_outbox_events_in_the_background(ledger_db, outbox, ray_local):
    """The actor's poll loop consumes the outbox on its own; flush and close_intervals work over Ray."""
    from actors.ledger_actor import LedgerActor
    actor = LedgerActor.options(name=None).remote(ledger_db.app, meter_interval_s=60.0)
    t = (dt.datetime.now(dt.timezone.utc) - T0).total_seconds()  # wall-clock times: the loop ticks on its own
    a = outbox.run("acme", t, [("n1", [0], 500, "H100")])
    deadline = time.monotonic() + 30
    while ray.get(actor.stats.remote())["open_meters"] == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.get(actor.stats.remote())["open_meters"] == 1          # picked up without a flush
    assert ray.get(actor.close_intervals.remote(us(t + 61))) == 1
    outbox.stop(a, "acme", t + 90)
    out = ray.get(actor.flush.remote(timeout_s=10))
    assert out["done"]
    st = ray.get(actor.stats.remote())
    assert st["open_meters"] == 0 and st["lag_rows"] == 0 and st["loop_errors"] == 0
    ray.get(actor.stop.remote())
    assert net_milli_us(ledger_db.app, a) == 500 * 90_000_000


def test_paced_closing_keeps_up_with_any_number_of_allocations():
    """The tick's per-poll budget spreads a burst of intervals yet always closes at least twice as fast as
    intervals come due (open meters / meter interval), however many allocations run."""
    from actors.ledger_actor import CLOSE_ROWS_PER_POLL_MIN, close_rows_per_poll

    for meters in (0, 10, 40_000, 1_000_000, 10_000_000):
        for poll_s, interval_s in ((0.2, 60.0), (0.2, 1.0), (1.0, 60.0)):
            budget = close_rows_per_poll(meters, poll_s, interval_s)
            assert budget >= CLOSE_ROWS_PER_POLL_MIN
            assert budget * (interval_s / poll_s) >= 2 * meters
