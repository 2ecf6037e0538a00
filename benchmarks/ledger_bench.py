"""Ledger benchmark: ingest through the real write path vs raw binary COPY,
verify, DuckDB sync and the capacity report.

    python benchmarks/ledger_bench.py --rows 1000000 --json out.json       # quick
    python benchmarks/ledger_bench.py --rows 10000000 --json out.json      # the full 10 M figures (minutes)

Figures (JSON fields):
  ingest_rows_per_s        usage rows/s through LedgerStore.append_usage (validation,
                           idempotency, hash chain, binary COPY, one transaction per batch)
  copy_rows_per_s          raw binary COPY of the very same rows (pre-encoded), same schema,
                           same batch size, into a twin database, batches interleaved with
                           the write path's (alternating which goes first)
  write_path_overhead_pct  (copy_rows_per_s / ingest_rows_per_s - 1) * 100   (target <= 15)
  write_path_overhead_pct_paired   median over rounds of each round's own overhead
  cpu_us_per_row           CPU µs per row of this process (client) and of the server backend,
                           for both: robust to the neighbours' load, unlike the rates
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
from ledger.chain import BILLING_ENTRIES, USAGE_ENTRIES  # noqa: E402
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


class Cpu:
    """CPU seconds of this process and of the connection's server backend over the timed sections.

    Wall-clock rates on a shared 2-core machine move with the neighbours' load;
    CPU time per row does much less, so it is reported next to them. The
    backend's time is read from /proc (local server only; 0 elsewhere)."""

    def __init__(self):
        self.client = self.server = 0.0

    @staticmethod
    def backend(conn) -> float:
        try:
            f = pathlib.Path(f"/proc/{conn.info.backend_pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return 0.0

    def start(self, conn) -> None:
        self._c, self._s = time.process_time(), self.backend(conn)

    def stop(self, conn) -> None:
        self.client += time.process_time() - self._c
        self.server += self.backend(conn) - self._s


class WritePath:
    """The real write path: one transaction per batch around LedgerStore.append_usage."""

    def __init__(self, url: str, *, bill: bool):
        self.conn = psycopg.connect(url, autocommit=True)
        self.st = LedgerStore(self.conn)
        self.bill = bill
        self.spent, self.rows, self.cpu = 0.0, 0, Cpu()

    def step(self, b: list[UsageRow]) -> None:
        self.cpu.start(self.conn)
        t0 = time.perf_counter()
        with self.conn.transaction():
            self.st.lock()
            self.st.append_usage(b, bill=self.bill)
        self.spent += time.perf_counter() - t0
        self.cpu.stop(self.conn)
        self.rows += len(b)

    def close(self) -> None:
        self.conn.close()


class RawCopy:
    """The reference: binary COPY of the same rows, encoded beforehand (encoding is not timed)."""

    def __init__(self, url: str, *, bill: bool):
        self.conn = psycopg.connect(url, autocommit=True)
        self.st = LedgerStore(self.conn)
        self.st.reload_prices()
        self.st.refresh_tenants()
        if bill:
            self.st._ensure_accounts({(t, "USD") for t in TENANTS})
        self.bill = bill
        self.h, self.hb = USAGE_ENTRIES.genesis, BILLING_ENTRIES.genesis
        self.spent, self.rows, self.cpu = 0.0, 0, Cpu()

    def step(self, b: list[UsageRow]) -> None:
        uid, bid = self.rows + 1, 2 * self.rows + 1
        payload, self.h, amounts, ps = self.st.encode_usage(b, uid, self.h)
        bpayload = None
        if self.bill:
            bpayload, self.hb = self.st.encode_billing(self.st.billing_lines(b, ps, amounts, uid), bid, self.hb)
        self.cpu.start(self.conn)
        t0 = time.perf_counter()
        with self.conn.transaction(), self.conn.cursor() as cur:
            with cur.copy(f"COPY {USAGE_ENTRIES.qualified} ({USAGE_ENTRIES.column_list()}) FROM STDIN"
                          " (FORMAT binary)") as cp:
                cp.write(payload)
            if bpayload:
                with cur.copy(f"COPY {BILLING_ENTRIES.qualified} ({BILLING_ENTRIES.column_list()}) FROM STDIN"
                              " (FORMAT binary)") as cp:
                    cp.write(bpayload)
        self.spent += time.perf_counter() - t0
        self.cpu.stop(self.conn)
        self.rows += len(b)

    def close(self) -> None:
        self.conn.close()


def interleaved(paths: list, gen: Gen, rows: int, batch: int) -> None:
    """Feed the same batches to every path, alternating which goes first, so that both see the
    same neighbours' load on this shared machine (a drift in load cancels out of the ratio)."""
    done = 0
    while done < rows:
        b = gen.batch(min(batch, rows - done))
        for p in (paths if (done // batch) % 2 == 0 else paths[::-1]):
            p.step(b)
        done += len(b)


def ingest(url: str, gen: Gen, rows: int, batch: int, *, bill: bool) -> float:
    """Seconds spent inside the write path (one transaction per batch)."""
    w = WritePath(url, bill=bill)
    try:
        interleaved([w], gen, rows, batch)
    finally:
        w.close()
    return w.spent


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
    ing, ref, cpu_ref, cpu_ing, paired = [], [], [], [], []
    for r in range(ns.repeats):
        a, b = make_db(server, "bench_ref"), make_db(server, "bench_ing")
        rc, wp = RawCopy(a.app, bill=False), WritePath(b.app, bill=False)
        interleaved([rc, wp], Gen(), ref_rows, ns.batch)
        rc.close()
        wp.close()
        ref.append(ref_rows / rc.spent)
        ing.append(ref_rows / wp.spent)
        paired.append((wp.spent / rc.spent - 1) * 100)
        cpu_ref.append(rc.cpu)
        cpu_ing.append(wp.cpu)
        say(f"round {r}: raw COPY {ref[-1]:,.0f} rows/s, write path {ing[-1]:,.0f} rows/s, overhead {paired[-1]:.1f}%"
            f" (CPU µs/row client+server: COPY {rc.cpu.client / ref_rows * 1e6:.2f}+"
            f"{rc.cpu.server / ref_rows * 1e6:.2f}, write path {wp.cpu.client / ref_rows * 1e6:.2f}+"
            f"{wp.cpu.server / ref_rows * 1e6:.2f})")
    out["copy_rows_per_s"] = round(statistics.median(ref))
    out["ingest_rows_per_s"] = round(statistics.median(ing))
    out["write_path_overhead_pct"] = round((out["copy_rows_per_s"] / out["ingest_rows_per_s"] - 1) * 100, 1)
    out["write_path_overhead_pct_paired"] = round(statistics.median(paired), 1)
    out["ingest_rounds"] = {"copy": [round(x) for x in ref], "write_path": [round(x) for x in ing],
                            "overhead_pct": [round(x, 1) for x in paired]}
    per_row = lambda cs, attr: round(statistics.median(getattr(c, attr) for c in cs) / ref_rows * 1e6, 3)  # noqa: E731
    out["cpu_us_per_row"] = {"copy_client": per_row(cpu_ref, "client"), "copy_server": per_row(cpu_ref, "server"),
                             "write_path_client": per_row(cpu_ing, "client"),
                             "write_path_server": per_row(cpu_ing, "server")}

    # 2. the billed path (usage + 2 billing lines), same comparison, one round.
    a = make_db(server, "bench_ref")
    main_db = make_db(server, "bench_main")
    gen = Gen()
    rc, wp = RawCopy(a.app, bill=True), WritePath(main_db.app, bill=True)
    interleaved([rc, wp], gen, ns.billed_rows, ns.batch)
    rc.close()
    wp.close()
    refb, tb = ns.billed_rows / rc.spent, wp.spent
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
