"""Ledger benchmark: ingest through the real write path vs raw binary COPY,
verify, DuckDB sync and the capacity report.

    python benchmarks/ledger_bench.py --rows 1000000 --json out.json       # quick
    python benchmarks/ledger_bench.py --rows 10000000 --json out.json      # the full 10 M figures (minutes)

Figures (JSON fields):
  ingest_rows_per_s        usage rows/s through LedgerStore.append_usage (validation,
                           idempotency, hash chain, binary COPY, one transaction per batch)
  copy_rows_per_s          raw binary COPY of the very same rows (pre-encoded), same schema,
                           same batch size, measured in the same run into a twin database
  write_path_overhead_pct  (copy_rows_per_s / ingest_rows_per_s - 1) * 100   (target <= 15)
  ingest_billed_usage_rows_per_s / ingest_billed_ledger_rows_per_s
                           the metering commit: each usage row + its two billing lines
  verify_s_10m             ledger verify over the whole ledger; measured when it holds >= 10 M
                           entries, else scaled linearly from verify_s (verify_extrapolated)
  report_s_10m             every named query over the rollups (usage rows synced: report_usage_rows)
  sync_s_1m                incremental sync of 1 M new usage rows (scaled when --rows < 1 M)
Input rows are generated before each timed call; generation is never timed.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
import urllib.parse as up
import uuid

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import psycopg  # noqa: E402

from ledger import analytics, capacity, db, prices, verify  # noqa: E402
from ledger.analytics import report  # noqa: E402
from ledger.chain import USAGE_ENTRIES  # noqa: E402
from ledger.migrate import apply_migrations  # noqa: E402
from ledger.store import LedgerStore, UsageRow  # noqa: E402

MODELS = ["H100", "A100", "A10", "L4", "T4", "V100M32", "V100M16", "P100"]
TENANTS = [f"tenant-{i:02d}" for i in range(50)]
BASE_US = 1_735_689_600_000_000  # 2025-01-01T00:00Z
INTERVAL_US = 60_000_000


def _swap_db(url: str, name: str) -> str:
    p = up.urlsplit(url)
    return up.urlunsplit((p.scheme, p.netloc, "/" + name, p.query, p.fragment))


def make_db(server: db.DatabaseUrls, name: str) -> db.DatabaseUrls:
    with psycopg.connect(server.owner, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    urls = db.DatabaseUrls(_swap_db(server.owner, name), _swap_db(server.app, name), server.embedded)
    apply_migrations(urls.owner)
    with psycopg.connect(urls.owner, autocommit=True) as conn:
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO iam.tenants (tenant_id, name) VALUES (%s, %s)", [(t, t) for t in TENANTS])
    prices.ensure_default_prices(urls.app)
    return urls


class Gen:
    """Deterministic usage rows: `allocations` allocations metered minute by minute over ~30 days."""

    def __init__(self, allocations: int = 20_000):
        self.allocs = [str(uuid.UUID(int=i + 1)) for i in range(allocations)]
        self.k = 0

    def batch(self, n: int) -> list[UsageRow]:
        out = []
        na = len(self.allocs)
        for k in range(self.k, self.k + n):
            a = k % na
            seq = k // na
            start = BASE_US + (a * 7919 % 43_200) * INTERVAL_US // 10 + seq * INTERVAL_US
            out.append(UsageRow(self.allocs[a], seq, 0, 0, start, start + INTERVAL_US, 1 + a % 8,
                                1000 if a % 5 else 250, TENANTS[a % len(TENANTS)], f"node-{a % 2000:04d}",
                                MODELS[a % len(MODELS)], (a * 37) % 10_000, 60_000 * (1 + a % 8)))
        self.k += n
        return out


def ingest(url: str, gen: Gen, rows: int, batch: int, *, bill: bool) -> float:
    """Seconds spent inside the write path (one transaction per batch)."""
    spent = 0.0
    with psycopg.connect(url, autocommit=True) as conn:
        st = LedgerStore(conn)
        done = 0
        while done < rows:
            b = gen.batch(min(batch, rows - done))
            t0 = time.perf_counter()
            with conn.transaction():
                st.lock()
                st.append_usage(b, bill=bill)
            spent += time.perf_counter() - t0
            done += len(b)
    return spent


def raw_copy(url: str, gen: Gen, rows: int, batch: int, *, bill: bool) -> float:
    """Seconds for binary COPY of the same rows, pre-encoded (the reference)."""
    spent = 0.0
    with psycopg.connect(url, autocommit=True) as conn:
        st = LedgerStore(conn)
        st.reload_prices()
        st.refresh_tenants()
        done, uid, bid = 0, 1, 1
        h, hb = USAGE_ENTRIES.genesis, b"\0" * 32
        if bill:
            st._ensure_accounts({(t, "USD") for t in TENANTS})
        while done < rows:
            b = gen.batch(min(batch, rows - done))
            payload, h, amounts, ps = st.encode_usage(b, uid, h)
            bpayload = None
            if bill:
                bpayload, hb = st.encode_billing(st.billing_lines(b, ps, amounts, uid), bid, hb)
            cols = USAGE_ENTRIES.column_list()
            t0 = time.perf_counter()
            with conn.transaction(), conn.cursor() as cur:
                with cur.copy(f"COPY ledger.usage_entries ({cols}) FROM STDIN (FORMAT binary)") as cp:
                    cp.write(payload)
                if bpayload:
                    from ledger.chain import BILLING_ENTRIES
                    with cur.copy(f"COPY ledger.billing_entries ({BILLING_ENTRIES.column_list()}) FROM STDIN"
                                  " (FORMAT binary)") as cp:
                        cp.write(bpayload)
            spent += time.perf_counter() - t0
            done += len(b)
            uid += len(b)
            bid += 2 * len(b)
    return spent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="usage rows through the write path (default 1 M)")
    ap.add_argument("--billed-rows", type=int, default=200_000, help="usage rows through the billed path")
    ap.add_argument("--ref-rows", type=int, default=0, help="rows for the raw COPY reference (default min(rows, 2 M))")
    ap.add_argument("--batch", type=int, default=50_000, help="rows per transaction")
    ap.add_argument("--repeats", type=int, default=3, help="ingest/COPY rounds (median reported)")
    ap.add_argument("--json", help="write the figures here")
    ns = ap.parse_args(argv)

    data = pathlib.Path(os.environ.get("GPUAAS_BENCH_PG", "/tmp/gpuaas-bench-pg"))
    server = db.resolve() if os.environ.get("GPUAAS_DATABASE_URL") else db.resolve(data_dir=data)
    out: dict = {"machine": f"{platform.machine()} {os.cpu_count()} cpu, {platform.python_version()}",
                 "rows": ns.rows, "batch": ns.batch}
    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    # 1. ingest vs raw COPY: alternating rounds of the same size, fresh databases each round.
    ref_rows = ns.ref_rows or min(ns.rows, 2_000_000)
    ing, ref = [], []
    for r in range(ns.repeats):
        a = make_db(server, "bench_ref")
        ref.append(ref_rows / raw_copy(a.app, Gen(), ref_rows, ns.batch, bill=False))
        b = make_db(server, "bench_ing")
        ing.append(ref_rows / ingest(b.app, Gen(), ref_rows, ns.batch, bill=False))
        say(f"round {r}: raw COPY {ref[-1]:,.0f} rows/s, write path {ing[-1]:,.0f} rows/s")
    out["copy_rows_per_s"] = round(statistics.median(ref))
    out["ingest_rows_per_s"] = round(statistics.median(ing))
    out["write_path_overhead_pct"] = round((out["copy_rows_per_s"] / out["ingest_rows_per_s"] - 1) * 100, 1)
    out["ingest_rounds"] = {"copy": [round(x) for x in ref], "write_path": [round(x) for x in ing]}

    # 2. the billed path (usage + 2 billing lines), same comparison, one round.
    a = make_db(server, "bench_ref")
    refb = ns.billed_rows / raw_copy(a.app, Gen(), ns.billed_rows, ns.batch, bill=True)
    main_db = make_db(server, "bench_main")
    gen = Gen()
    tb = ingest(main_db.app, gen, ns.billed_rows, ns.batch, bill=True)
    out["ingest_billed_usage_rows_per_s"] = round(ns.billed_rows / tb)
    out["ingest_billed_ledger_rows_per_s"] = round(3 * ns.billed_rows / tb)
    out["copy_billed_usage_rows_per_s"] = round(refb)
    say(f"billed: write path {out['ingest_billed_usage_rows_per_s']:,} usage rows/s, raw COPY {refb:,.0f}")

    # 3. fill the main ledger to --rows usage rows (unbilled bulk), leaving 1 M for the incremental sync.
    inc = min(1_000_000, max(1, ns.rows // 2))
    bulk = max(0, ns.rows - ns.billed_rows - inc)
    t = ingest(main_db.app, gen, bulk, ns.batch, bill=False)
    say(f"bulk: {bulk:,} rows in {t:.1f}s")
    for d in range(0, 30):
        capacity.record_samples(main_db.app, [(m, 800, 800, 500_000 + 2000 * d, 300_000 - 2000 * d, 20_000 + 10 * d)
                                              for m in MODELS], at=__import__("datetime").datetime.fromtimestamp(
            BASE_US / 1e6 + d * 86400, tz=__import__("datetime").timezone.utc))
    duck = tempfile.mktemp(prefix="gpuaas-bench-", suffix=".duckdb")
    s = analytics.sync(main_db.app, duck)
    out["sync_full_rows"], out["sync_full_s"] = s["usage_entries"], s["elapsed_s"]
    say(f"sync (initial): {s}")
    ingest(main_db.app, gen, inc, ns.batch, bill=False)
    s = analytics.sync(main_db.app, duck)
    out["sync_rows"] = s["usage_entries"]
    out["sync_s_1m"] = round(s["elapsed_s"] * 1_000_000 / s["usage_entries"], 3)
    out["sync_extrapolated"] = s["usage_entries"] < 1_000_000
    say(f"sync (incremental): {s}")

    # 4. the report over rollups (median of 3).
    con = analytics.open_duckdb(duck)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        results = report.run_all(con)
        times.append(time.perf_counter() - t0)
    out["report_usage_rows"] = con.execute("SELECT count(*) FROM usage_entries").fetchone()[0]
    out["report_s_10m"] = round(statistics.median(times), 3)
    out["report_queries"] = {name: round(secs, 4) for name, _, _, _, secs in results}
    con.close()
    os.unlink(duck)
    say(f"report: {out['report_s_10m']}s over {out['report_usage_rows']:,} usage rows")

    # 5. verify the whole main ledger.
    res = verify.verify(main_db.owner)
    assert res.ok, res.message
    out["verify_entries"] = res.entries_checked
    out["verify_s"] = round(res.elapsed_s, 2)
    out["verify_s_10m"] = round(res.elapsed_s * 10_000_000 / res.entries_checked, 2)
    out["verify_extrapolated"] = res.entries_checked < 10_000_000
    say(f"verify: {res.entries_checked:,} entries in {res.elapsed_s:.1f}s")

    text = json.dumps(out, indent=2)
    print(text)
    if ns.json:
        pathlib.Path(ns.json).write_text(text + "\n")
    for name in ("bench_ref", "bench_ing"):
        with psycopg.connect(server.owner, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
