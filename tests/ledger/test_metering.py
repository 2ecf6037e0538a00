"""Pure metering rules: interval bounds, stops, late-stop plans, telemetry summaries."""
from hypothesis import given, settings, strategies as st

from ledger import metering
from ledger.metering import Interval, Meter, Replica, TelemetrySample

M = Meter("a", "t", 1_000, (Replica("n", "H100", 1, 1000),), 60)


def test_close_due_emits_only_full_intervals_up_to_the_horizon():
    """Intervals are [S + k·I, S + (k+1)·I) and close when their end is at or before the horizon."""
    m, ivs = metering.close_due(M, 1_000 + 130)
    assert ivs == [Interval(0, 1000, 1060), Interval(1, 1060, 1120)] and m.next_seq == 2
    assert metering.close_due(m, 1_000 + 179)[1] == []


def test_stop_bills_up_to_the_stop_time_exactly():
    """A stop emits the remaining full intervals and the partial one ending at the stop."""
    p = metering.stop(M, 1_000 + 125)
    assert p.intervals == (Interval(0, 1000, 1060), Interval(1, 1060, 1120), Interval(2, 1120, 1125))
    assert metering.stop(M, 1_000 + 120).intervals[-1] == Interval(1, 1060, 1120)  # on a boundary: no empty tail
    assert metering.stop(M, 500).intervals == ()                                    # stop before start: nothing


def test_late_stop_plans_reversal_and_correction():
    """A stop inside already-closed intervals reverses them and re-issues the part before the stop."""
    m, _ = metering.close_due(M, 1_000 + 180)
    p = metering.stop(m, 1_000 + 90)
    assert p.intervals == () and p.reverse_seqs == (1, 2) and p.correction == Interval(1, 1060, 1090)
    p = metering.stop(m, 1_000 + 120)
    assert p.reverse_seqs == (2,) and p.correction is None


@settings(deadline=None)  # a 1 µs interval over 100 ms is 100k intervals: exactness is the property, not speed
@given(st.integers(1, 10_000), st.integers(0, 100_000), st.lists(st.integers(0, 100_000), max_size=5))
def test_billed_time_always_equals_run_time(interval, run, ticks):
    """Whatever the ticks, usage minus reversals plus corrections sums to exactly stop − start."""
    m = Meter("a", "t", 0, (), interval)
    closed = {}
    for t in sorted(ticks):
        m, ivs = metering.close_due(m, t)
        closed.update({iv.seq: iv.end_us - iv.start_us for iv in ivs})
    p = metering.stop(m, run)
    total = sum(closed.values()) + sum(iv.end_us - iv.start_us for iv in p.intervals)
    total -= sum(closed[s] for s in p.reverse_seqs)
    if p.correction:
        total += p.correction.end_us - p.correction.start_us
    assert total == run


def test_telemetry_summary_is_overlap_weighted():
    """Utilization is weighted by overlap; energy is prorated by overlap."""
    s = [TelemetrySample(0, 10, 20.0, 100.0), TelemetrySample(10, 30, 80.0, 200.0)]
    assert metering.summarize_telemetry(s, 0, 20) == (5000, 200_000)
    assert metering.summarize_telemetry([], 0, 20) == (0, 0)
