"""Ours vs Ray placement groups on the same request stream, in one run.

Ray side: a local Ray with fake GPU resources; each request becomes a
placement group (one bundle of GPUs per replica) that is created, waited on
until ready, and removed. Ours: the same requests through the public gRPC API
of a running control plane (PlacementActor, group commit to Postgres before
the answer), each placed and then released.

    python benchmarks/ray_compare.py --requests 200 --json results/ray_compare.json
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import random
import shutil
import time
import uuid

import _common  # noqa: F401  (puts the repo on sys.path)
from _common import median, write_json


def request_stream(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    shapes = [dict(gpu_count=1), dict(gpu_count=2), dict(gpu_count=4), dict(gpu_count=8), dict(gpu_milli=500),
              dict(gpu_count=4, replicas=2)]
    return [rng.choice(shapes) for _ in range(n)]


def ray_pg_rate(reqs: list[dict], total_gpus: int) -> float:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    ray.init(num_cpus=2, num_gpus=total_gpus, include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        for r in reqs:
            gpus = r.get("gpu_count") or r.get("gpu_milli", 0) / 1000
            pg = placement_group([{"GPU": gpus}] * r.get("replicas", 1), strategy="SPREAD"
                                 if r.get("replicas", 1) > 1 else "PACK")
            ray.get(pg.ready(), timeout=60)
            remove_placement_group(pg)
        return len(reqs) / (time.perf_counter() - t0)
    finally:
        ray.shutdown()


def ours_rate(reqs: list[dict], nodes: int, gpus: int, clients: int) -> tuple[float, float]:
    """(place+release per s, PlaceBatch durable placements per s)."""
    import ray

    from actors.bootstrap import ControlPlane, SimNodes
    from gpuaas.client import Client
    from gpuaas.config import ControlPlaneConfig
    from gpuaas.v1 import common_pb2 as pb
    from ledger import db as dbmod

    # A fresh database per run (the embedded server of an earlier run keeps its own folder).
    data = dbmod.gpuaas_home() / f"bench-ray-compare-{uuid.uuid4().hex[:6]}" / "pg"
    shutil.rmtree(data.parent, ignore_errors=True)
    cp = ControlPlane(config=ControlPlaneConfig(listen="127.0.0.1:0"), data_dir=data,
                      sim=SimNodes(nodes, gpus, "H100"))
    cp.start(wait_nodes_s=120)
    try:
        admin = Client(cp.address, cp.admin_token)
        admin.create_tenant("bench")
        token = admin.create_token("bench")
        clis = [Client(cp.address, token) for _ in range(clients)]
        run = uuid.uuid4().hex[:6]

        import grpc

        def one(i_r):
            i, r = i_r
            c = clis[i % clients]
            while True:
                try:
                    a = c.place(f"{run}-{i}", **r)
                    break
                except grpc.RpcError as err:
                    # Released GPUs come back once the node has cleaned up; retry, and the
                    # waiting counts against us.
                    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    time.sleep(0.02)
            c.release(a.allocation_id)

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(clients) as ex:
            list(ex.map(one, enumerate(reqs)))
        unary = len(reqs) / (time.perf_counter() - t0)
        # Let cleanups finish, then the batch path on the same stream.
        time.sleep(2.0)
        batch = [Client.request(f"{run}-b{i}", **r) for i, r in enumerate(reqs)]
        t0 = time.perf_counter()
        resp = clis[0].place_batch(batch)
        took = time.perf_counter() - t0
        placed = sum(1 for x in resp.results if x.HasField("allocation"))
        # Only what was placed counts (the stream's big shapes do not all fit the fleet at once).
        batch_rate = placed / took
        print(f"  PlaceBatch placed {placed}/{len(reqs)} in {took * 1000:.0f} ms")
        for c in clis:
            c.close()
        return unary, batch_rate
    finally:
        cp.stop()
        ray.shutdown() if ray.is_initialized() else None
        shutil.rmtree(data.parent, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--ray-requests", type=int, default=100, help="Ray PGs are slow; a smaller sample suffices")
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json")
    ns = ap.parse_args()
    reqs = request_stream(ns.requests, ns.seed)
    ray_rates, ours, ours_batch = [], [], []
    for i in range(ns.repeats):
        ray_rates.append(ray_pg_rate(reqs[:ns.ray_requests], ns.nodes * ns.gpus_per_node))
        u, b = ours_rate(reqs, ns.nodes, ns.gpus_per_node, ns.clients)
        ours.append(u)
        ours_batch.append(b)
        print(f"run {i + 1}: ray PG {ray_rates[-1]:.1f}/s  ours place+release {u:.0f}/s  ours PlaceBatch {b:.0f}/s")
    r, o, ob = median(ray_rates), median(ours), median(ours_batch)
    print(f"\nmedian of {ns.repeats}: Ray placement groups {r:.1f}/s | ours (Place+Release, durable) {o:.0f}/s "
          f"→ {o / r:.0f}× | ours PlaceBatch {ob:.0f}/s → {ob / r:.0f}×")
    write_json(ns.json, {"ours_per_s": o, "ray_pg_per_s": r, "ratio": o / r, "ours_batch_per_s": ob,
                         "batch_ratio": ob / r, "runs": {"ray": ray_rates, "ours": ours, "ours_batch": ours_batch},
                         "requests": ns.requests, "ray_requests": ns.ray_requests})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
