"""The versioned price book: price of one GPU-hour per model, integer micro-units.

There is no wildcard price: usage of a model without a price in force is
rejected (the consumer dead-letters its start event), so every model the
fleet runs must be priced here or through ``set_price``.
"""
from __future__ import annotations

import datetime as dt

import psycopg

from ledger.store import AppendResult, LedgerStore, to_us

DEFAULT_CURRENCY = "USD"
DEFAULT_EFFECTIVE_FROM = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
# micro-USD per GPU-hour
DEFAULT_PRICES = {
    "H100": 2_490_000, "A100": 1_690_000, "A10": 750_000, "L4": 700_000, "T4": 350_000,
    "V100M32": 950_000, "V100M16": 800_000, "P100": 450_000, "G3": 900_000, "G2": 600_000,
}


def set_prices(url: str, prices: list[tuple[str, str, int, dt.datetime]]) -> AppendResult:
    """Append price versions (gpu_model, currency, micros_per_gpu_hour, effective_from); idempotent."""
    with psycopg.connect(url) as conn:
        store = LedgerStore(conn)
        with conn.transaction():
            store.lock()
            return store.append_prices([(m, c, p, to_us(e)) for m, c, p, e in prices])


def set_price(url: str, gpu_model: str, micros_per_gpu_hour: int, *, currency: str = DEFAULT_CURRENCY,
              effective_from: dt.datetime | None = None) -> AppendResult:
    eff = effective_from or dt.datetime.now(dt.timezone.utc)
    return set_prices(url, [(gpu_model, currency, micros_per_gpu_hour, eff)])


def ensure_default_prices(url: str) -> AppendResult:
    """Seed the default price book (effective 2020-01-01); a no-op when already there."""
    return set_prices(url, [(m, DEFAULT_CURRENCY, p, DEFAULT_EFFECTIVE_FROM) for m, p in DEFAULT_PRICES.items()])


def list_prices(url: str) -> list[dict]:
    with psycopg.connect(url) as conn:
        return [dict(gpu_model=m, currency=c, micros_per_gpu_hour=p, effective_from=e) for m, c, p, e in conn.execute(
            "SELECT gpu_model, currency, micros_per_gpu_hour, effective_from FROM ledger.price_book"
            " ORDER BY gpu_model, effective_from")]
