"""`gpuaas demo`: the whole product on one machine, end to end.

Embedded Postgres, local Ray, simulated GPU nodes on real gRPC. Runs single
placements, one PlaceBatch, a 2-node gang, an ML job through Ray on an
allocation's GPUs, bad input, releases, and reads usage back from the ledger.
"""
from __future__ import annotations

import logging
import shutil
import time
import uuid

import grpc

from gpuaas.client import Client, state_name
from gpuaas.v1 import common_pb2

S = common_pb2.AllocationState
TOPO = common_pb2.Topology


def training_step(n: int = 256) -> dict:
    """A tiny stand-in for a training step: one matmul, and what the worker saw."""
    import numpy as np

    from gpuaas.sdk import describe_worker

    a = np.random.default_rng(0).standard_normal((n, n))
    info = describe_worker()
    info["checksum"] = round(float((a @ a.T).trace()), 3)
    return info


def _say(msg: str) -> None:
    print(msg, flush=True)


def run(*, sim_nodes: int = 4, gpus_per_node: int = 8, gpu_model: str = "H100", verbose: bool = False) -> int:
    from actors.bootstrap import ControlPlane, SimNodes
    from gpuaas import sdk
    from gpuaas.config import ControlPlaneConfig
    from ledger import db as dbmod

    if not verbose:
        logging.getLogger().setLevel(logging.WARNING)
    t0 = time.perf_counter()
    data_dir = dbmod.gpuaas_home() / "demo" / "pg"
    shutil.rmtree(data_dir.parent, ignore_errors=True)  # each demo starts from an empty database
    cfg = ControlPlaneConfig(listen="127.0.0.1:0", meter_interval_s=2.0, heartbeat_grace_s=3.0)
    cp = ControlPlane(config=cfg, data_dir=data_dir, sim=SimNodes(sim_nodes, gpus_per_node, gpu_model))
    try:
        _say(f"[1/8] starting control plane: embedded Postgres, local Ray, {sim_nodes} simulated "
             f"{gpu_model}×{gpus_per_node} nodes …")
        cp.start()
        _say(f"      up at {cp.address} after {time.perf_counter() - t0:.1f}s")
        admin = Client(cp.address, cp.admin_token)
        for t in ("acme", "globex"):
            admin.create_tenant(t, t.title())
        acme = Client(cp.address, admin.create_token("acme"))
        globex = Client(cp.address, admin.create_token("globex"))
        run_id = uuid.uuid4().hex[:6]

        _say("[2/8] single placements over gRPC")
        singles = [
            acme.place(f"train-{run_id}", gpu_count=2, cpu_milli=8000, memory_mib=65536,
                       topology=TOPO.TOPOLOGY_SAME_NVLINK_ISLAND, lease_s=3600),
            acme.place(f"notebook-{run_id}", gpu_milli=500, cpu_milli=2000, memory_mib=8192),
            globex.place(f"finetune-{run_id}", gpu_count=4, cpu_milli=16000, memory_mib=131072),
        ]
        again = acme.place(f"train-{run_id}", gpu_count=2, cpu_milli=8000, memory_mib=65536,
                           topology=TOPO.TOPOLOGY_SAME_NVLINK_ISLAND, lease_s=3600)
        assert again.allocation_id == singles[0].allocation_id, "idempotent replay must return the same allocation"
        for a in singles:
            _say(f"      {a.request_id:22} → {a.assignments[0].node_id} GPUs {list(a.assignments[0].gpu_indices)}"
                 f" ×{a.assignments[0].gpu_milli}m  [{state_name(a.state)}]")

        _say("[3/8] one PlaceBatch of 12 inference replicas")
        batch = globex.place_batch([Client.request(f"infer-{run_id}-{i}", gpu_milli=250 if i % 2 else 0,
                                                   gpu_count=0 if i % 2 else 1, cpu_milli=1000, memory_mib=4096)
                                    for i in range(12)])
        placed_batch = [r.allocation for r in batch.results if r.HasField("allocation")]
        _say(f"      {len(placed_batch)}/12 placed in one group commit")

        _say("[4/8] a 2-node gang (2 replicas × 8 GPUs, spread)")
        gang = acme.place(f"gang-{run_id}", gpu_count=gpus_per_node, replicas=2, cpu_milli=32000,
                          memory_mib=262144, topology=TOPO.TOPOLOGY_SPREAD)
        _say(f"      replicas on {[a.node_id for a in gang.assignments]}")

        _say("      bad input is refused with field violations and writes nothing:")
        try:
            acme.place(f"bad-{run_id}", gpu_count=-1, gpu_models=["Z9000"])
            raise RuntimeError("a bad request was accepted")
        except grpc.RpcError as err:
            from gpuaas.errors import from_rpc_error
            code, msg, violations = from_rpc_error(err)
            _say(f"      {code.name}: " + "; ".join(f"{f}: {d}" for f, d in violations))

        everything = singles + placed_batch + [gang]
        for a in everything:
            acme_or_globex = acme if a.tenant_id == "acme" else globex
            acme_or_globex.wait_state(a.allocation_id, {S.ALLOCATION_STATE_RUNNING}, timeout_s=30)
        _say(f"      all {len(everything)} allocations RUNNING (prepared on their nodes; billing started)")

        _say("[5/8] ML job through Ray on the 2-GPU allocation, and on each gang replica")
        seen = sdk.run(singles[0], training_step)
        _say(f"      job on {seen['node_id']}: CUDA_VISIBLE_DEVICES={seen['cuda_visible_devices']} "
             f"(allocation GPUs {list(singles[0].assignments[0].gpu_indices)}), pid {seen['pid']}, "
             f"ray node {seen['ray_node']}, checksum {seen['checksum']}")
        for i, info in enumerate(sdk.run_gang(gang, training_step)):
            _say(f"      gang replica {i} on {info['node_id']}: CUDA_VISIBLE_DEVICES={info['cuda_visible_devices']}")

        _say("[6/8] letting usage accrue for 3 s, then releasing everything (one ReleaseBatch per tenant)")
        time.sleep(3.0)
        for client, tenant_id in ((acme, "acme"), (globex, "globex")):
            mine = [a.allocation_id for a in everything if a.tenant_id == tenant_id]
            if mine:
                resp = client.release_batch(mine)
                refused = [r.error.message for r in resp.results if not r.HasField("allocation")]
                if refused:
                    raise RuntimeError(f"release refused for {tenant_id}: {refused[:3]}")
                _say(f"      {tenant_id}: {len(mine)} allocations RELEASING in one call, billing stopped at one instant")
        for a in everything:
            (acme if a.tenant_id == "acme" else globex).wait_state(a.allocation_id, {S.ALLOCATION_STATE_RELEASED},
                                                                   timeout_s=30)

        _say("[7/8] metering into the ledger")
        import ray
        if cp.ledger is None:
            raise RuntimeError("this build has no ledger actor")
        ray.get(cp.ledger.flush.remote(timeout_s=30), timeout=40)

        _say("[8/8] summary")
        _summary(cp)
        _say(f"demo finished in {time.perf_counter() - t0:.1f}s")
        return 0
    finally:
        cp.stop()


def _summary(cp) -> None:
    import psycopg

    from ledger import reports
    with psycopg.connect(cp.urls.app, autocommit=True) as conn:
        rows = conn.execute("SELECT state, count(*) FROM control.allocations GROUP BY 1 ORDER BY 1").fetchall()
    _say("  allocations by final state:")
    for st, n in rows:
        _say(f"    {st:15} {n}")
    _say("  usage per tenant (read back from the ledger):")
    _say(f"    {'tenant':10} {'GPU-seconds':>12} {'cost':>14}")
    for r in reports.usage_by_tenant(cp.urls.app):
        _say(f"    {r['tenant_id']:10} {r['gpu_seconds']:12.3f} {r['cost_micros'] / 1e6:11.6f} {r['currency']}")
    try:
        from ledger import analytics
        import pathlib
        path = pathlib.Path(cp.data_dir or ".").parent / "analytics.duckdb"
        _say("  analytics (DuckDB copy of the ledger):")
        _say(analytics.demo_table(cp.urls.app, str(path)))
    except ImportError:
        _say("  analytics: not available in this build")
    from ledger import verify
    res = verify.verify(cp.urls.owner)
    _say(f"  ledger verify: {'OK' if res.ok else 'FAILED'} ({res.entries_checked} entries) {res.message}")
    if not res.ok:
        raise RuntimeError(f"ledger verification failed: {res.message}")
