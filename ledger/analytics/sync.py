"""Incremental sync Postgres → DuckDB by the append-only id watermark.

    for each source table (one REPEATABLE READ snapshot for all of them):
        COPY (SELECT … WHERE id > watermark ORDER BY id) TO STDOUT (FORMAT csv) ─► temp file
        DuckDB: stage ◄─ read_csv ; raw table += stage ; rollups += GROUP BY(stage) ; watermark = max(id)
    one DuckDB transaction per sync: a failed sync leaves the copy as it was.

Rollups (``usage_hourly``, ``cost_hourly``, ``capacity_hourly``) are additive:
each sync appends its delta's group sums and queries sum them again, so the
report never rescans raw usage. Postgres stays the source of truth; the DuckDB
file can be deleted and rebuilt by the next sync.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time

import duckdb
import psycopg


@dataclasses.dataclass(frozen=True)
class Source:
    name: str        # DuckDB table
    pg_table: str
    id_col: str
    columns: tuple[tuple[str, str, str], ...]  # (duckdb name, duckdb type, postgres expression)

    def ddl(self) -> str:
        return f"CREATE TABLE IF NOT EXISTS {self.name} (" + ", ".join(f"{n} {t}" for n, t, _ in self.columns) + ")"

    def select(self) -> str:
        return ", ".join(e for _, _, e in self.columns)


def _ts(col: str) -> str:
    return f"({col} AT TIME ZONE 'UTC')"


SOURCES = (
    Source("usage_entries", "ledger.usage_entries", "id", (
        ("id", "BIGINT", "id"), ("allocation_id", "UUID", "allocation_id"), ("seq", "INTEGER", "seq"),
        ("replica", "SMALLINT", "replica"), ("kind", "SMALLINT", "kind"),
        ("interval_start", "TIMESTAMP", _ts("interval_start")), ("interval_end", "TIMESTAMP", _ts("interval_end")),
        ("gpu_count", "INTEGER", "gpu_count"), ("gpu_milli", "INTEGER", "gpu_milli"),
        ("gpu_milli_us", "BIGINT", "gpu_milli_us"), ("util_bp", "INTEGER", "util_bp"),
        ("energy_mj", "BIGINT", "energy_mj"), ("reverses_id", "BIGINT", "reverses_id"),
        ("tenant_id", "VARCHAR", "tenant_id"), ("node_id", "VARCHAR", "node_id"), ("gpu_model", "VARCHAR", "gpu_model"))),
    Source("billing_entries", "ledger.billing_entries", "id", (
        ("id", "BIGINT", "id"), ("usage_entry_id", "BIGINT", "usage_entry_id"), ("side", "SMALLINT", "side"),
        ("amount_micros", "BIGINT", "amount_micros"), ("price_id", "BIGINT", "price_id"), ("ts", "TIMESTAMP", _ts("at")),
        ("reverses_id", "BIGINT", "reverses_id"), ("account_id", "VARCHAR", "account_id"),
        ("currency", "VARCHAR", "currency"))),
    Source("allocation_events", "control.allocation_events", "event_id", (
        ("event_id", "BIGINT", "event_id"), ("allocation_id", "UUID", "allocation_id"),
        ("tenant_id", "VARCHAR", "tenant_id"), ("from_state", "VARCHAR", "from_state"),
        ("to_state", "VARCHAR", "to_state"), ("event", "VARCHAR", "event"), ("reason", "VARCHAR", "reason"),
        ("version", "BIGINT", "version"), ("ts", "TIMESTAMP", _ts("at")))),
    Source("node_events", "control.node_events", "event_id", (
        ("event_id", "BIGINT", "event_id"), ("node_id", "VARCHAR", "node_id"), ("gpu_index", "INTEGER", "gpu_index"),
        ("from_state", "VARCHAR", "from_state"), ("to_state", "VARCHAR", "to_state"), ("event", "VARCHAR", "event"),
        ("reason", "VARCHAR", "reason"), ("automatic", "BOOLEAN", "automatic"), ("ts", "TIMESTAMP", _ts("at")))),
    Source("capacity_samples", "ledger.capacity_samples", "id", (
        ("id", "BIGINT", "id"), ("ts", "TIMESTAMP", _ts("at")), ("gpu_model", "VARCHAR", "gpu_model"),
        ("total_gpus", "INTEGER", "total_gpus"), ("healthy_gpus", "INTEGER", "healthy_gpus"),
        ("allocated_milli", "BIGINT", "allocated_milli"), ("free_milli", "BIGINT", "free_milli"),
        ("stranded_milli", "BIGINT", "stranded_milli"), ("queue_depth", "INTEGER", "queue_depth"))),
)

ROLLUP_DDL = (
    "CREATE TABLE IF NOT EXISTS sync_state (source VARCHAR PRIMARY KEY, last_id BIGINT NOT NULL, rows BIGINT NOT NULL,"
    " synced_at TIMESTAMP NOT NULL)",
    "CREATE TABLE IF NOT EXISTS usage_hourly (hour TIMESTAMP, tenant_id VARCHAR, gpu_model VARCHAR,"
    " gpu_milli_us HUGEINT, util_x_milli_us HUGEINT, energy_mj HUGEINT, entries BIGINT)",
    "CREATE TABLE IF NOT EXISTS cost_hourly (hour TIMESTAMP, tenant_id VARCHAR, gpu_model VARCHAR, currency VARCHAR,"
    " cost_micros HUGEINT)",
    "CREATE TABLE IF NOT EXISTS capacity_hourly (hour TIMESTAMP, gpu_model VARCHAR, samples BIGINT,"
    " total_gpus_sum HUGEINT, allocated_milli_sum HUGEINT, free_milli_sum HUGEINT, stranded_milli_sum HUGEINT,"
    " queue_depth_sum HUGEINT)",
)

# Appended per sync from the staged delta (stage_<source>), never from the raw tables.
ROLLUPS = {
    "usage_entries": "INSERT INTO usage_hourly SELECT date_trunc('hour', interval_start), tenant_id, gpu_model,"
                     " sum(gpu_milli_us), sum(util_bp::HUGEINT * gpu_milli_us), sum(energy_mj), count(*)"
                     " FROM stage_usage_entries GROUP BY ALL",
    # Billing lines join their usage rows; a usage row is written in the same
    # transaction as its lines, so it is in this delta or an earlier one (the
    # id range filter keeps the probe on recent rows).
    "billing_entries": "INSERT INTO cost_hourly SELECT date_trunc('hour', u.interval_start), u.tenant_id, u.gpu_model,"
                       " b.currency, sum(CASE b.side WHEN 1 THEN b.amount_micros ELSE -b.amount_micros END)"
                       " FROM stage_billing_entries b JOIN usage_entries u ON u.id = b.usage_entry_id"
                       " WHERE b.account_id LIKE 'tenant:%'"
                       "   AND u.id >= (SELECT coalesce(min(usage_entry_id), 0) FROM stage_billing_entries)"
                       " GROUP BY ALL",
    "capacity_samples": "INSERT INTO capacity_hourly SELECT date_trunc('hour', ts), gpu_model, count(*),"
                        " sum(total_gpus), sum(allocated_milli), sum(free_milli), sum(stranded_milli), sum(queue_depth)"
                        " FROM stage_capacity_samples GROUP BY ALL",
}


def open_duckdb(path: str) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(path)
    for s in SOURCES:
        con.execute(s.ddl())
    for ddl in ROLLUP_DDL:
        con.execute(ddl)
    return con


def sync(app_url: str, duckdb_path: str, *, con: duckdb.DuckDBPyConnection | None = None) -> dict:
    """Copy rows added since the last sync; returns {source: rows copied, ..., "elapsed_s": …}."""
    t0 = time.perf_counter()
    own = con is None
    con = con or open_duckdb(duckdb_path)
    out: dict = {}
    try:
        marks = dict(con.execute("SELECT source, last_id FROM sync_state").fetchall())
        with psycopg.connect(app_url) as pg, tempfile.TemporaryDirectory(prefix="gpuaas-sync-") as tmp:
            pg.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            pg.execute("SET TIME ZONE 'UTC'")
            con.execute("BEGIN")
            try:
                for s in SOURCES:
                    out[s.name] = _sync_one(pg, con, s, marks.get(s.name, 0), os.path.join(tmp, s.name + ".csv"))
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
    finally:
        if own:
            con.close()
    out["elapsed_s"] = round(time.perf_counter() - t0, 3)
    return out


def _sync_one(pg, con, s: Source, last_id: int, path: str) -> int:
    sql = (f"COPY (SELECT {s.select()} FROM {s.pg_table} WHERE {s.id_col} > {int(last_id)} ORDER BY {s.id_col})"
           " TO STDOUT (FORMAT csv)")
    n_bytes = 0
    with open(path, "wb") as f, pg.cursor() as cur, cur.copy(sql) as cp:
        for chunk in cp:
            f.write(chunk)
            n_bytes += len(chunk)
    if n_bytes == 0:
        return 0
    cols = "{" + ", ".join(f"'{n}': '{t}'" for n, t, _ in s.columns) + "}"
    con.execute(f"CREATE OR REPLACE TEMP TABLE stage_{s.name} AS SELECT * FROM read_csv('{path}', header=false,"
                f" columns={cols}, quote='\"', escape='\"', nullstr='', allow_quoted_nulls=false, auto_detect=false)")
    n, top = con.execute(f"SELECT count(*), max({s.columns[0][0]}) FROM stage_{s.name}").fetchone()
    con.execute(f"INSERT INTO {s.name} SELECT * FROM stage_{s.name}")
    if s.name in ROLLUPS:
        con.execute(ROLLUPS[s.name])
    con.execute(f"DROP TABLE stage_{s.name}")
    con.execute("INSERT OR REPLACE INTO sync_state VALUES (?, ?, ?, now()::TIMESTAMP)",
                [s.name, top, n + (con.execute("SELECT rows FROM sync_state WHERE source = ?", [s.name]).fetchone()
                                   or (0,))[0]])
    return n
