"""The placement actor's own path, in process: durable placements/s and CPU per placement.

A ``PlacementCore`` (what the placement actor hosts) on a scratch database of the embedded Postgres
(or ``GPUAAS_DATABASE_URL``), with simulated nodes registered in memory and no gRPC, no Ray and no
shards: each repeat submits ``--batches`` batches of ``--batch-size`` fractional-GPU requests, as
``PlaceBatch`` does, and waits for every answer, each committed to Postgres before it. Reported per
repeat: placements/s, the process's CPU per placement, and that of the committer (decides) and the
writer (group commit) threads, from /proc. Then, ``--repeats`` times, how long one request of another
tenant sent right behind three 10,000-request batches waits for its answer (``behind_batches_ms``),
beside those batches (``batches_30k_ms``).

This is the bound on a machine with cores to spare: the placement actor is one process with one
interpreter lock, and everything else (gRPC, the shards, Postgres) runs beside it. On the 2-core
development machine the end-to-end figure (``grpc_placement.py``) is lower, since everything shares
the two cores.
"""
from __future__ import annotations

import argparse
import random
import time
import urllib.parse
import uuid

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import add_batch_args, median, write_json


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_batch_args(ap)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    ns = ap.parse_args()

    import psycopg

    from actors.placement import PlacementCore
    from actors.runtime import thread_cpu_s
    from gpuaas.config import ControlPlaneConfig
    from gpuaas.v1 import common_pb2
    from ledger import db as dbmod
    from ledger.migrate import apply_migrations

    # A scratch database on the shared server, dropped at the end.
    urls = dbmod.resolve(dbmod.gpuaas_home() / "bench-placement-core", scratch=True)
    name = "bench_core_" + uuid.uuid4().hex[:8]

    def on(url: str) -> str:
        p = urllib.parse.urlsplit(url)
        return urllib.parse.urlunsplit((p.scheme, p.netloc, "/" + name, p.query, p.fragment))

    with psycopg.connect(urls.owner, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    core = None
    try:
        apply_migrations(on(urls.owner))
        # No shards: hand-offs wait in the dispatcher's window (600 s) and are never sent.
        core = PlacementCore(app_url=on(urls.app), alloc_shards=[], node_shards=[],
                             config=ControlPlaneConfig(reconcile_s=0, dispatch_linger_s=600))
        gpus = [(i, "H100", 81920, 0, "READY") for i in range(ns.gpus_per_node)]
        for n in range(ns.nodes):
            core.node_registered(f"node-{n}", f"127.0.0.1:{20000 + n}", "READY", 64_000, 512_000, {}, gpus)
        rng = random.Random(1)
        runs = []
        for rep in range(ns.repeats):
            batches = [[common_pb2.PlacementRequest(request_id=f"r{rep}-{b}-{i}", gpu_milli=rng.randint(1, 2))
                        for i in range(ns.batch_size)] for b in range(ns.batches)]
            threads0, cpu0, t0 = thread_cpu_s(), time.process_time(), time.perf_counter()
            placed = 0
            for reqs in batches:
                for fut in core.submit("bench", reqs):
                    kind, _ = fut.result(60)
                    placed += kind == "new"
            took, cpu, threads1 = time.perf_counter() - t0, time.process_time() - cpu0, thread_cpu_s()
            us = lambda name: (threads1.get(name, 0.0) - threads0.get(name, 0.0)) / max(placed, 1) * 1e6  # noqa: E731
            runs.append({"placements_per_s": placed / took, "cpu_us_per_placement": cpu / max(placed, 1) * 1e6,
                         "committer_us_per_placement": us("placement-committer"),
                         "writer_us_per_placement": us("placement-writer"), "placed": placed})
            r = runs[-1]
            print(f"run {rep + 1}: {r['placements_per_s']:,.0f} durable placements/s | CPU per placement "
                  f"{r['cpu_us_per_placement']:.0f} µs (committer {r['committer_us_per_placement']:.0f}, "
                  f"writer {r['writer_us_per_placement']:.0f})", flush=True)
        res = {k: median([r[k] for r in runs]) for k in ("placements_per_s", "cpu_us_per_placement",
                                                         "committer_us_per_placement", "writer_us_per_placement")}
        print(f"\nmedian of {ns.repeats}: {res['placements_per_s']:,.0f} durable placements/s in process, "
              f"{res['cpu_us_per_placement']:.0f} µs of CPU per placement (committer "
              f"{res['committer_us_per_placement']:.0f}, writer {res['writer_us_per_placement']:.0f}); "
              f"one core at this cost: {1e6 / res['cpu_us_per_placement']:,.0f}/s")
        # Isolation between tenants: one request of another tenant sent right behind three full
        # PlaceBatch calls (10,000 requests each) of tenant "bench", as from clients sending them at
        # once. Each tenant's queue is taken in turns, so it is decided in the next decision after the
        # one under way instead of after all 30,000.
        behind, whole = [], []
        for n in range(ns.nodes, ns.nodes + 16 * ns.repeats):  # room for 30,000 more shares per repeat
            core.node_registered(f"node-{n}", f"127.0.0.1:{20000 + n}", "READY", 64_000, 512_000, {}, gpus)
        for rep in range(ns.repeats):
            calls = [[common_pb2.PlacementRequest(request_id=f"iso{rep}-{c}-{i}", gpu_milli=rng.randint(1, 2))
                      for i in range(10_000)] for c in range(3)]
            other = [common_pb2.PlacementRequest(request_id=f"iso{rep}-other", gpu_milli=1)]
            t0 = time.perf_counter()
            big = [f for reqs in calls for f in core.submit("bench", reqs)]
            [small] = core.submit("other", other)
            small.result(60)
            behind.append((time.perf_counter() - t0) * 1000)
            for fut in big:
                fut.result(60)
            whole.append((time.perf_counter() - t0) * 1000)
        res["behind_batches_ms"], res["batches_30k_ms"] = median(behind), median(whole)
        print(f"another tenant's request sent right behind three 10,000-request batches: answered in "
              f"{res['behind_batches_ms']:.0f} ms (runs {' / '.join(f'{x:.0f}' for x in behind)}); "
              f"the batches {res['batches_30k_ms']:.0f} ms")
        write_json(ns.json, dict(res, runs=runs, nodes=ns.nodes, gpus_per_node=ns.gpus_per_node,
                                 batch_size=ns.batch_size, batches=ns.batches, behind_batches_runs_ms=behind))
        return 0
    finally:
        if core is not None:
            core.shutdown()
        with psycopg.connect(urls.owner, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    raise SystemExit(main())
