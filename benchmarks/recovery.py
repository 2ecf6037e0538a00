"""Recovery benchmark: capacity-view rebuild at 100k allocations, daemon death →
FAILED (billing stopped), and the full fault-scenario table (tests/faults/).

    .venv/bin/python benchmarks/recovery.py --json out/recovery.json [--runs 3] [--scale 2] [--skip-scenarios]
        [--only preemption_load,lease_bulk] [--seeds 3]

Fields: rebuild_s_100k (median of --runs; target ≤ 5 s), daemon_death_to_failed_s
(median; target ≤ heartbeat_offline_s + 1), scenarios (scenario, operations,
faults injected, invariant violations — must be 0). ``--only`` runs the named
scenarios; ``--seeds N`` runs each N times with different seeds (one table row each).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import pathlib
import shutil
import sys
import time
import uuid

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import machine, median, write_json  # noqa: E402

N_ALLOC = 100_000
GPUS_PER_NODE = 8


class _NoShard:
    class _M:
        @staticmethod
        def remote(*a, **k):
            return None

    adopt = start = capacity_freed = _M()


def bench_rebuild(runs: int) -> dict:
    import psycopg

    from actors import convert, store
    from actors.placement import PlacementCore
    from gpuaas.config import ControlPlaneConfig
    from gpuaas.lifecycle import AllocEvent, AllocState
    from gpuaas.v1 import common_pb2
    from ledger import db as dbmod
    from ledger.migrate import apply_migrations

    data = pathlib.Path("/tmp") / f"gpuaas-rb-{os.getpid()}"
    shutil.rmtree(data, ignore_errors=True)
    urls = dbmod.resolve(data / "pg")
    apply_migrations(urls.owner)
    nodes = N_ALLOC // GPUS_PER_NODE
    now = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    with psycopg.connect(urls.owner) as conn:
        with conn.cursor().copy("COPY control.nodes (node_id, address, state, backend, simulated, cpu_milli,"
                                " memory_mib, labels, inventory) FROM STDIN") as cp:
            for n in range(nodes):
                cp.write_row((f"n{n:05d}", f"10.0.{n // 250}.{n % 250}:7000", "READY", "simulated", True,
                              128000, 1048576, "{}", b""))
        with conn.cursor().copy("COPY control.gpus (node_id, gpu_index, uuid, model, memory_mib, state)"
                                " FROM STDIN") as cp:
            for n in range(nodes):
                for g in range(GPUS_PER_NODE):
                    cp.write_row((f"n{n:05d}", g, f"GPU-{n}-{g}", "H100", 81920, "READY"))
        req = common_pb2.PlacementRequest(request_id="x", gpu_count=1)
        items = []
        for i in range(N_ALLOC):
            n, g = divmod(i, GPUS_PER_NODE)
            r = common_pb2.PlacementRequest(request_id=f"r{i}", gpu_count=1)
            row = store.AllocRow(
                allocation_id=str(uuid.uuid4()), tenant_id="bench", request_id=r.request_id,
                request_hash=convert.request_hash(r), request=r.SerializeToString(), state=AllocState.RUNNING,
                version=3, gpu_model="H100", gpu_milli_total=1000, created_at=now, updated_at=now,
                running_since=now, reason="prepare_ok",
                assignments=[{"node_id": f"n{n:05d}", "gpu_indices": [g], "gpu_milli": 1000, "gpu_model": "H100"}])
            items.append((row, [(AllocEvent.ACCEPTED, None), (AllocEvent.PLACED, AllocState.QUEUED),
                                (AllocEvent.PREPARE_OK, AllocState.PLACED)]))
        del req
        with conn.transaction():
            store.insert_new_allocations(conn, items)
    setup_s = time.perf_counter() - t0
    cfg = ControlPlaneConfig(listen="127.0.0.1:0")
    times, walls = [], []
    for _ in range(runs):
        w0 = time.perf_counter()
        core = PlacementCore(app_url=urls.app, config=cfg, alloc_shards=[_NoShard()], node_shards=[_NoShard()])
        walls.append(time.perf_counter() - w0)
        times.append(core.rebuild_info["seconds"])
        assert core.rebuild_info["allocations"] == N_ALLOC, core.rebuild_info
        with core.lock:
            core.engine.check_invariants()
        core.shutdown()
    shutil.rmtree(data, ignore_errors=True)
    return {"rebuild_s_100k": round(median(times), 3), "rebuild_runs_s": [round(t, 3) for t in times],
            "core_start_s_100k": round(median(walls), 3), "setup_s": round(setup_s, 1),
            "nodes": nodes, "gpus": nodes * GPUS_PER_NODE}


def bench_cluster(runs: int, scale: int, skip_scenarios: bool, only: list[str] | None = None,
                  seeds: int = 1) -> dict:
    import psycopg

    from actors.bootstrap import ControlPlane, SimNodes
    from gpuaas.client import Client
    from gpuaas.config import ControlPlaneConfig
    from gpuaas.v1 import common_pb2 as pb
    from tests.faults import scenarios

    data = pathlib.Path("/tmp") / f"gpuaas-rc-{os.getpid()}"
    shutil.rmtree(data, ignore_errors=True)
    cfg = ControlPlaneConfig(listen="127.0.0.1:0", meter_interval_s=1.0, heartbeat_grace_s=2.0,
                             heartbeat_offline_s=4.0, telemetry_interval_ms=250, cleanup_backoff_base_s=0.05,
                             cleanup_backoff_max_s=0.2, allocation_shards=2)
    cp = ControlPlane(config=cfg, data_dir=data / "pg", sim=SimNodes(3, 4, "H100"))
    cp.start(wait_nodes_s=120)
    out: dict = {"heartbeat_offline_s": cfg.heartbeat_offline_s}
    admin = Client(cp.address, cp.admin_token)
    try:
        deaths = []
        for _ in range(runs):
            node = scenarios.start_pool_node(cp)
            tid, token = scenarios.new_tenant(admin, cp.address, "death")
            c = Client(cp.address, token)
            ids = [c.place(f"d-{uuid.uuid4().hex[:6]}", gpu_count=1, node_selector={"pool": node}).allocation_id
                   for _ in range(2)]
            for a in ids:
                c.wait_state(a, {pb.ALLOCATION_STATE_RUNNING}, 30)
            t_kill = time.time()
            cp.daemon_by_name[node].kill()
            scenarios.wait_for(lambda: all(s == "FAILED" and st is not None for s, st in scenarios.q(
                cp, "SELECT state, stopped_at FROM control.allocations WHERE allocation_id = ANY(%b::uuid[])",
                ids)), 30, "allocations FAILED")
            deaths.append(time.time() - t_kill)
            c.close()
            scenarios.stop_pool_node(cp, node)
        out["daemon_death_to_failed_s"] = round(median(deaths), 2)
        out["daemon_death_runs_s"] = [round(d, 2) for d in deaths]
        table = []
        if not skip_scenarios:
            import random
            chosen = [fn for fn in scenarios.ALL if not only or fn.__name__ in only]
            unknown = set(only or ()) - {fn.__name__ for fn in scenarios.ALL}
            if unknown:
                raise SystemExit(f"unknown scenario(s) {sorted(unknown)}; known: "
                                 f"{[fn.__name__ for fn in scenarios.ALL]}")
            for fn in chosen:
                for _ in range(seeds):
                    seed = random.randrange(1, 1_000_000)
                    res = fn(cp, admin, seed, scale)
                    table.append(res.row() | {"violations_detail": res.violations[:5]})
                    extra = {k: v for k, v in res.notes.items() if k in ("victims", "preemptors",
                                                                          "preemptor_wait_s_median",
                                                                          "preemptor_wait_s_max")}
                    print(f"{res.scenario:32s} seed={seed:<7d} ops={res.operations:<6d} faults={res.faults:<4d} "
                          f"violations={len(res.violations)}" + "".join(f" {k}={v}" for k, v in extra.items()),
                          flush=True)
        out["scenarios"] = table
    finally:
        admin.close()
        cp.stop()
        shutil.rmtree(data, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--scale", type=int, default=2, help="fault repetitions per scenario (CI runs 1)")
    ap.add_argument("--skip-scenarios", action="store_true")
    ap.add_argument("--skip-rebuild", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    ap.add_argument("--seeds", type=int, default=1, help="runs per scenario, each with its own seed")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    result: dict = {"machine": machine(), "runs": args.runs, "scale": args.scale}
    if not args.skip_rebuild:
        result.update(bench_rebuild(args.runs))
        print(f"rebuild_s_100k = {result['rebuild_s_100k']} s (runs {result['rebuild_runs_s']}; target ≤ 5)",
              flush=True)
    only = [x for x in args.only.split(",") if x] or None
    result.update(bench_cluster(args.runs, args.scale, args.skip_scenarios, only, args.seeds))
    print(f"daemon_death_to_failed_s = {result['daemon_death_to_failed_s']} s "
          f"(target ≤ {result['heartbeat_offline_s'] + 1})", flush=True)
    violations = sum(r["invariant_violations"] for r in result.get("scenarios", []))
    result["invariant_violations_total"] = violations
    write_json(args.json, result)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
