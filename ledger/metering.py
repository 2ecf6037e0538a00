"""Pure metering: the allocation lifecycle's billing rules as interval arithmetic.

No I/O, no clock: every time is an integer in microseconds since the Unix
epoch, passed in. The consumer (ledger.consumer) feeds it events and a horizon.

    start (into RUNNING, at S) ──► intervals [S + k·I, S + (k+1)·I), k = 0, 1, …
                                   closed when their end <= horizon (the tick)
    stop (out of RUNNING, at T) ─► every full interval ending <= T, then the
                                   partial [S + n·I, T) — billing stops at T

Interval k of an allocation always has the same bounds (S and I fixed), so a
restarted consumer recomputes exactly the intervals a crash left open and the
ledger's unique key (allocation, seq, replica, kind) turns any re-emission into
a no-op. If the tick closed an interval beyond T before the stop event arrived
(the stop committed late), the plan reverses those intervals and re-issues the
one containing T as a correction [S + j·I, T): exact, and never an edit.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple


class Replica(NamedTuple):
    node_id: str
    gpu_model: str
    gpu_count: int   # GPUs of this replica (len(gpu_indices))
    gpu_milli: int   # share of each of them, 1..1000

    @property
    def milli(self) -> int:
        return self.gpu_count * self.gpu_milli


class Interval(NamedTuple):
    seq: int
    start_us: int
    end_us: int


@dataclasses.dataclass(frozen=True)
class Meter:
    """An allocation being billed: started at ``start_us``; intervals < next_seq are closed."""
    allocation_id: str
    tenant_id: str
    start_us: int
    replicas: tuple[Replica, ...]
    interval_us: int
    next_seq: int = 0

    def bounds(self, seq: int) -> Interval:
        s = self.start_us + seq * self.interval_us
        return Interval(seq, s, s + self.interval_us)

    @property
    def closed_until_us(self) -> int:
        return self.start_us + self.next_seq * self.interval_us


@dataclasses.dataclass(frozen=True)
class StopPlan:
    intervals: tuple[Interval, ...]     # new usage (kind USAGE), in seq order
    reverse_seqs: tuple[int, ...]       # closed intervals to reverse (they lie at or after the stop)
    correction: Interval | None         # re-issued part [start_j, T) of a reversed interval


def close_due(meter: Meter, horizon_us: int, *, max_intervals: int = 100_000) -> tuple[Meter, list[Interval]]:
    """Full intervals ending at or before ``horizon_us``; returns the advanced meter."""
    out = []
    seq = meter.next_seq
    while len(out) < max_intervals:
        iv = meter.bounds(seq)
        if iv.end_us > horizon_us:
            break
        out.append(iv)
        seq += 1
    return dataclasses.replace(meter, next_seq=seq), out


def stop(meter: Meter, stop_us: int) -> StopPlan:
    """What billing needs at the transition out of RUNNING at ``stop_us``."""
    stop_us = max(stop_us, meter.start_us)  # a stop stamped before its start bills nothing
    if stop_us >= meter.closed_until_us:
        _, full = close_due(meter, stop_us, max_intervals=10**9)
        last_end = full[-1].end_us if full else meter.closed_until_us
        tail = [Interval(meter.next_seq + len(full), last_end, stop_us)] if stop_us > last_end else []
        return StopPlan(tuple(full + tail), (), None)
    # The stop lies inside what the tick already closed: reverse from there.
    j = (stop_us - meter.start_us) // meter.interval_us
    reverse = tuple(range(j, meter.next_seq))
    b = meter.bounds(j)
    correction = Interval(j, b.start_us, stop_us) if stop_us > b.start_us else None
    return StopPlan((), reverse, correction)


class TelemetrySample(NamedTuple):
    start_us: int
    end_us: int
    util_pct: float
    energy_j: float


def summarize_telemetry(samples, start_us: int, end_us: int) -> tuple[int, int]:
    """(average utilization in basis points, energy in millijoules) over [start, end).

    Utilization is the overlap-weighted mean of the samples that cover the
    interval (0 when none does); energy is each sample's energy prorated by
    its overlap with the interval.
    """
    covered = 0
    util_weighted = 0.0
    energy = 0.0
    for s in samples:
        a, b = max(s.start_us, start_us), min(s.end_us, end_us)
        if b <= a or s.end_us <= s.start_us:
            continue
        ov = b - a
        covered += ov
        util_weighted += s.util_pct * ov
        energy += s.energy_j * ov / (s.end_us - s.start_us)
    util_bp = int(round(util_weighted / covered * 100)) if covered else 0
    return max(0, min(10_000, util_bp)), max(0, int(round(energy * 1000)))
