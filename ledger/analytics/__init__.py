"""DuckDB analytics over a copy of the ledger and the control-plane event log.

    sync(app_url, duckdb_path) -> dict        incremental, by append-only id watermark
    queries.QUERIES                           the named capacity-planner queries
    run_report(duckdb_path) -> results        every query (rollups only)
    demo_table(app_url, duckdb_path) -> str   one printable table for the demo
    cli.main(argv) -> int                     `gpuaas analytics sync|report|sql`
"""
from __future__ import annotations

from ledger.analytics.sync import open_duckdb, sync


def run_report(duckdb_path: str):
    from ledger.analytics import report
    con = open_duckdb(duckdb_path)
    try:
        return report.run_all(con)
    finally:
        con.close()


def demo_table(app_url: str, duckdb_path: str) -> str:
    """Sync, then render GPU-hours and cost by tenant per day."""
    from ledger.analytics import queries, report
    con = open_duckdb(duckdb_path)
    try:
        sync(app_url, duckdb_path, con=con)
        cols, rows = queries.run(con, "tenant_gpu_hours_cost_by_day")
        return report.format_table(cols, rows)
    finally:
        con.close()


__all__ = ["sync", "open_duckdb", "run_report", "demo_table"]
