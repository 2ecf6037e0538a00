"""`gpuaas analytics …`: sync, report, ad-hoc SQL against the DuckDB copy."""
from __future__ import annotations

import argparse
import pathlib
import sys
import time


def _urls(ns):
    if ns.url:
        return ns.url
    from ledger import db
    return db.resolve().app


def _duck_path(ns) -> str:
    if ns.duckdb:
        return ns.duckdb
    from ledger import db
    return str(db.gpuaas_home() / "analytics.duckdb")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpuaas analytics", description="Capacity analytics over a DuckDB copy of the ledger")
    ap.add_argument("--url", help="Postgres URL (default: the runtime URL of GPUAAS_DATABASE_URL or the embedded server)")
    ap.add_argument("--duckdb", help="DuckDB file (default: $GPUAAS_HOME/analytics.duckdb)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("sync", help="copy new ledger and event rows into DuckDB")
    rp = sub.add_parser("report", help="sync, print every named query, write report.html")
    rp.add_argument("--out", default=".", help="folder for report.html")
    rp.add_argument("--no-sync", action="store_true", help="report on the copy as it is")
    sp = sub.add_parser("sql", help="run SQL against the DuckDB copy")
    sp.add_argument("query")
    sp.add_argument("--no-sync", action="store_true")
    ns = ap.parse_args(argv)

    from ledger.analytics import report
    from ledger.analytics.sync import open_duckdb, sync
    path = _duck_path(ns)
    con = open_duckdb(path)
    try:
        if ns.cmd == "sync" or not getattr(ns, "no_sync", False):
            res = sync(_urls(ns), path, con=con)
            print("synced " + ", ".join(f"{k}={v}" for k, v in res.items()), file=sys.stderr)
        if ns.cmd == "report":
            t0 = time.perf_counter()
            results = report.run_all(con)
            secs = time.perf_counter() - t0
            print(report.text_report(results))
            out = pathlib.Path(ns.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "report.html").write_text(report.html_report(results))
            print(f"\nreport: {len(results)} queries in {secs:.3f}s; charts: {out / 'report.html'}")
        elif ns.cmd == "sql":
            cur = con.execute(ns.query)
            if cur.description:
                print(report.format_table([d[0] for d in cur.description], cur.fetchall(), limit=1000))
    except Exception as e:  # noqa: BLE001 — a CLI answers with one line, not a stack trace
        print(f"gpuaas analytics: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        con.close()
    return 0
