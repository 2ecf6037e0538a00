"""Commit latency while the WAL grows: the embedded server's settings against PostgreSQL's defaults.

Why this exists: the placement actor answers a placement only after its group commit, so a commit
that stalls is a burst of slow answers (the paced p99 of ``grpc_placement.py``). PostgreSQL by
default fills every new 16 MB WAL segment with zeros, in the backend that first needs it and while
it holds the WAL write lock; every commit in flight waits. A fresh or fast-growing WAL creates
segments often (checkpoints recycle old ones later), so the stall repeats.

For each setting of ``wal_init_zero`` (``ledger.db.EMBEDDED_SETTINGS`` ships ``off``), on a fresh
scratch server each time: one connection commits one small row every ``--interval-ms`` and times
each commit, while a second connection writes ``--bulk-rows`` rows of 200 bytes every 20 ms (the
WAL of a busy control plane). Reported per setting and repeat: commit p50 / p99 / p99.9 / max, the
number of commits of 20 ms or more, and the WAL segments created; the medians over repeats.

    python benchmarks/commit_stalls.py --json out/commit_stalls.json
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import median, percentile, write_json


def one_run(zero: str, seconds: float, interval_s: float, bulk_rows: int) -> dict:
    import pgserver
    import psycopg

    data = tempfile.mkdtemp(prefix="gpuaas-stall-", dir="/tmp")  # short: the socket lives there
    server = pgserver.get_server(data, cleanup_mode="delete")
    url = server.get_uri()
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"ALTER SYSTEM SET wal_init_zero = '{zero}'")
            conn.execute("SELECT pg_reload_conf()")
            conn.execute("CREATE TABLE small (id bigserial PRIMARY KEY, v text)")
            conn.execute("CREATE TABLE bulk (id bigserial PRIMARY KEY, v text)")
        segments_before = len(os.listdir(os.path.join(data, "pg_wal")))
        stop = threading.Event()

        def bulk() -> None:
            with psycopg.connect(url, autocommit=True) as c:
                while not stop.is_set():
                    c.execute("INSERT INTO bulk (v) SELECT repeat('x', 200) FROM generate_series(1, %s)",
                              (bulk_rows,))
                    time.sleep(0.02)

        writer = threading.Thread(target=bulk, name="bulk-writer")
        writer.start()
        lat: list[float] = []
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                # Settings are read at session start: this session sees the reloaded value.
                assert conn.execute("SHOW wal_init_zero").fetchone()[0] == zero
                end = time.perf_counter() + seconds
                while time.perf_counter() < end:
                    t = time.perf_counter()
                    conn.execute("INSERT INTO small (v) VALUES ('a')")
                    lat.append(time.perf_counter() - t)
                    time.sleep(interval_s)
        finally:
            stop.set()
            writer.join()
        segments = len(os.listdir(os.path.join(data, "pg_wal"))) - segments_before
    finally:
        server.cleanup()
        shutil.rmtree(data, ignore_errors=True)
    ms = [x * 1000 for x in lat]
    return {"wal_init_zero": zero, "commits": len(ms), "p50_ms": round(percentile(ms, 50), 2),
            "p99_ms": round(percentile(ms, 99), 2), "p999_ms": round(percentile(ms, 99.9), 2),
            "max_ms": round(max(ms), 1), "commits_20ms_or_more": sum(x >= 20 for x in ms),
            "wal_segments_created": segments}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--interval-ms", type=float, default=2.0)
    ap.add_argument("--bulk-rows", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    ns = ap.parse_args()
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for rep in range(ns.repeats):
        # Alternating, so that the machine's slow stretches fall on both sides.
        for zero in (("on", "off") if rep % 2 == 0 else ("off", "on")):
            r = one_run(zero, ns.seconds, ns.interval_ms / 1000, ns.bulk_rows)
            runs[zero].append(r)
            print(f"run {rep + 1}, wal_init_zero={zero:3}: {r['commits']} commits, p50 {r['p50_ms']} ms, "
                  f"p99 {r['p99_ms']} ms, p99.9 {r['p999_ms']} ms, max {r['max_ms']} ms, "
                  f"{r['commits_20ms_or_more']} of 20 ms or more; {r['wal_segments_created']} WAL segments created",
                  flush=True)
    res = {k: {f: median([r[f] for r in v]) for f in ("p50_ms", "p99_ms", "p999_ms", "max_ms",
                                                      "commits_20ms_or_more", "wal_segments_created")}
           for k, v in runs.items()}
    for k, v in res.items():
        print(f"median of {ns.repeats}, wal_init_zero={k:3}: p50 {v['p50_ms']} ms, p99 {v['p99_ms']} ms, "
              f"p99.9 {v['p999_ms']} ms, max {v['max_ms']} ms, {v['commits_20ms_or_more']} commits of 20 ms or more")
    write_json(ns.json, {"by_setting": res, "runs": runs, "seconds": ns.seconds, "interval_ms": ns.interval_ms,
                         "bulk_rows": ns.bulk_rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
