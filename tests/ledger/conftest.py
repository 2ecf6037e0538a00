"""Ledger fixtures: a migrated database with tenants and default prices, and a
helper that writes allocation transitions into control.outbox exactly as the
control plane's contract says (event row + AllocationTransitioned payload)."""
from __future__ import annotations

import datetime as dt
import uuid

import psycopg
import pytest
from google.protobuf import timestamp_pb2

from gpuaas.v1 import common_pb2, events_pb2
from ledger import prices

S = common_pb2
T0 = dt.datetime(2025, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def us(seconds: float) -> int:
    return int((T0 - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)).total_seconds() * 1_000_000) + int(
        round(seconds * 1_000_000))


class Outbox:
    """Writes AllocationTransitioned rows (event + outbox) the way actors/store.py does."""

    def __init__(self, url: str):
        self.url = url
        self.versions: dict[str, int] = {}

    def emit(self, alloc: str, tenant: str, src, dst, event: str, when: dt.datetime, assignments=(),
             conn=None) -> int:
        own = conn is None
        conn = conn or psycopg.connect(self.url, autocommit=True)
        try:
            v = self.versions.get(alloc, 0) + 1
            self.versions[alloc] = v
            name = lambda s: S.AllocationState.Name(s).removeprefix("ALLOCATION_STATE_") if s else None  # noqa: E731
            eid = conn.execute(
                "INSERT INTO control.allocation_events (allocation_id, tenant_id, from_state, to_state, event,"
                " reason, version, at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING event_id",
                (alloc, tenant, name(src), name(dst), event, event, v, when)).fetchone()[0]
            ts = timestamp_pb2.Timestamp()
            ts.FromDatetime(when)
            payload = events_pb2.AllocationTransitioned(
                event_id=eid, allocation_id=alloc, tenant_id=tenant, from_state=src or 0, to_state=dst, event=event,
                reason=event, at=ts, version=v,
                assignments=[S.GpuAssignment(node_id=n, gpu_indices=list(idx), gpu_milli=m, gpu_model=model)
                             for n, idx, m, model in assignments]).SerializeToString()
            conn.execute("INSERT INTO control.outbox (topic, key, payload) VALUES (%s, %s, %s)",
                         ("allocation.transitioned", alloc, payload))
            return eid
        finally:
            if own:
                conn.close()

    def run(self, tenant: str, start_s: float, assignments, alloc: str | None = None) -> str:
        """QUEUED → PLACED → RUNNING at T0 + start_s; returns the allocation id."""
        alloc = alloc or str(uuid.uuid4())
        self.emit(alloc, tenant, None, S.ALLOCATION_STATE_QUEUED, "accepted", at(start_s - 2))
        self.emit(alloc, tenant, S.ALLOCATION_STATE_QUEUED, S.ALLOCATION_STATE_PLACED, "placed", at(start_s - 1),
                  assignments)
        self.emit(alloc, tenant, S.ALLOCATION_STATE_PLACED, S.ALLOCATION_STATE_RUNNING, "prepare_ok", at(start_s),
                  assignments)
        return alloc

    def stop(self, alloc: str, tenant: str, stop_s: float, event: str = "release_requested",
             dst=S.ALLOCATION_STATE_RELEASING, conn=None) -> None:
        self.emit(alloc, tenant, S.ALLOCATION_STATE_RUNNING, dst, event, at(stop_s), conn=conn)


@pytest.fixture
def ledger_db(fresh_db):
    """fresh_db with tenants acme and globex and the default price book."""
    with psycopg.connect(fresh_db.owner, autocommit=True) as conn:
        conn.execute("INSERT INTO iam.tenants (tenant_id, name) VALUES ('acme', 'Acme'), ('globex', 'Globex')")
    prices.ensure_default_prices(fresh_db.app)
    return fresh_db


@pytest.fixture
def outbox(ledger_db):
    return Outbox(ledger_db.app)


def count(url: str, table: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def net_milli_us(url: str, alloc: str | None = None) -> int:
    with psycopg.connect(url) as conn:
        if alloc:
            return int(conn.execute("SELECT coalesce(sum(gpu_milli_us), 0) FROM ledger.usage_entries"
                                    " WHERE allocation_id = %s::uuid", (alloc,)).fetchone()[0])
        return int(conn.execute("SELECT coalesce(sum(gpu_milli_us), 0) FROM ledger.usage_entries").fetchone()[0])
