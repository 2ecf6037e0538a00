"""LedgerActor: the Ray host of ledger.consumer.LedgerConsumer.

A thin shell: a background thread polls the outbox every ``poll_interval_s``
(bounded batches) and closes metering intervals as they come due (lagging
the wall clock by ``close_lag_s`` so a stop committed a little late rarely
needs a correction). Every call and the loop share one lock, because the
consumer owns one connection. All logic and its tests live in ledger/.

    LedgerActor.options(name="ledger", namespace="gpuaas", max_restarts=-1).remote(app_url, meter_interval_s=60.0)
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading

import ray

from actors import runtime
from ledger.consumer import LedgerConsumer, now_us
from ledger.store import to_us

log = logging.getLogger("gpuaas.ledger.actor")

polls_per_wake_max = 20
backoff_s_max = 5.0
# Intervals closed by the tick, per poll: allocations started together (a PlaceBatch) close their
# intervals together, and tens of thousands of usage rows (each with two billing lines) written in one
# go are a burst every other component feels. Paced, the work spreads over several seconds: at least
# CLOSE_ROWS_PER_POLL_MIN a poll, and twice the steady rate (open meters / interval) so it keeps up.
CLOSE_ROWS_PER_POLL_MIN = 500


def close_rows_per_poll(open_meters: int, poll_interval_s: float, meter_interval_s: float) -> int:
    return max(CLOSE_ROWS_PER_POLL_MIN, int(2 * open_meters * poll_interval_s / meter_interval_s) + 1)


def _as_us(t) -> int | None:
    """datetime | seconds (float) | microseconds (int, > 1e14) | None → µs since the epoch."""
    if t is None:
        return None
    if isinstance(t, dt.datetime):
        return to_us(t)
    if isinstance(t, int) and t > 10**14:
        return t
    return int(round(float(t) * 1_000_000))


@ray.remote(num_cpus=0)
class LedgerActor:
    def __init__(self, app_url: str, meter_interval_s: float = 60.0, *, poll_interval_s: float = 0.2,
                 batch_size_max: int = 1000, close_lag_s: float = 2.0):
        logging.basicConfig(level=logging.INFO)
        from actors.hosts import name_connections

        name_connections("ledger")
        self._consumer = LedgerConsumer(app_url, meter_interval_s=meter_interval_s, batch_size_max=batch_size_max)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poll_interval_s = poll_interval_s
        self._close_lag_us = int(close_lag_s * 1_000_000)
        self._loop_errors = 0
        with self._lock:
            self._consumer.open()  # recovery: cursor + open meters from the ledger
        self._gc = runtime.GcPacer()
        self._thread = threading.Thread(target=self._run, name="ledger-poll", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        backoff_s = self._poll_interval_s
        while not self._stop.wait(backoff_s):
            self._gc.tick()  # one open meter per RUNNING allocation: keep full collections short
            try:
                with self._lock:
                    for _ in range(polls_per_wake_max):
                        if self._consumer.poll_once() < self._consumer.batch_size_max:
                            break
                    horizon = now_us() - self._close_lag_us
                    due = self._consumer.next_close_due_us()
                    if due is not None and due <= horizon:
                        c = self._consumer
                        c.close_intervals(horizon, rows_max=close_rows_per_poll(
                            len(c.meters), self._poll_interval_s, c.interval_us / 1e6))
                backoff_s = self._poll_interval_s
            except Exception:  # noqa: BLE001 — the loop must survive a bad moment of the database
                self._loop_errors += 1
                log.exception("ledger poll failed; retrying in %.1fs", backoff_s)
                backoff_s = min(backoff_s_max, backoff_s * 2)
                self._reopen()

    def _reopen(self) -> None:
        """After a lost connection: reconnect and reload cursor + open meters from the ledger."""
        try:
            with self._lock:
                conn = self._consumer.conn
                if conn is not None and (conn.closed or conn.broken):
                    self._consumer.conn = None
                    self._consumer.open()
        except Exception as exc:  # noqa: BLE001 — still down; the loop retries
            log.warning("ledger reconnect failed: %s", exc)

    def _locked(self, fn, *args):
        with self._lock:
            conn = self._consumer.conn
            if conn is not None and (conn.closed or conn.broken):
                self._consumer.conn = None
                self._consumer.open()
            return fn(*args)

    async def flush(self, timeout_s: float = 10.0) -> dict:
        """Deliver every outbox row up to the current max id; does not close running intervals."""
        return await asyncio.to_thread(self._locked, self._consumer.flush, timeout_s)

    async def close_intervals(self, now=None) -> int:
        """Close every running allocation's full intervals ending at or before ``now`` (default: the clock)."""
        return await asyncio.to_thread(self._locked, self._consumer.close_intervals, _as_us(now))

    async def record_telemetry(self, allocation_id: str, util_pct_avg: float, energy_j: float, window_start,
                               window_end) -> None:
        """One telemetry window of an allocation (datetimes, epoch seconds or µs)."""
        await asyncio.to_thread(self._locked, self._consumer.record_telemetry, allocation_id, util_pct_avg,
                                energy_j, _as_us(window_start), _as_us(window_end))

    async def record_telemetry_many(self, items: list) -> int:
        """Many windows at once: [(allocation_id, util % avg, energy J, start, end), …]."""
        def apply():
            for aid, util, energy, start, end in items:
                self._consumer.record_telemetry(aid, util, energy, _as_us(start), _as_us(end))
        await asyncio.to_thread(self._locked, apply)
        return len(items)

    async def stats(self) -> dict:
        out = await asyncio.to_thread(self._locked, self._consumer.stats)
        out["loop_errors"] = self._loop_errors
        return out

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 10)
        await asyncio.to_thread(self._locked, self._consumer.close)
