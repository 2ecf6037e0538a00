"""Placement decisions per second, in-process, against a bare best-fit kernel in the same run.

    python benchmarks/placement.py --json out/placement.json

Synthetic cluster: N nodes × 8 GPUs; requests 1/2/4/8 whole GPUs and
fractional shares; after a warm fill to ~75% of GPUs, every timed step places
one request and releases a random live one (interleaved releases). Decisions
= placements. Also: the best-quality policy on the openb cluster (1,213 nodes)
replaying the default trace. Medians of --repeat runs.

Also, per cluster size, the default policy on requests with topology and on a
failure: a 2 × 4-GPU gang on one rack (the filter → score pipeline), 2 GPUs on one
NVLink island (the index), and a request no node can hold (its failure explained
by the pipeline), each amid fast-path churn, median µs per request.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import _common  # noqa: F401  (puts the repo on sys.path)
from _common import machine, write_json

from scheduler import Engine, GpuSpec, NodeSpec, PolicyName, Request
from scheduler.types import BEST_QUALITY_POLICY, Topology

MILLI = 1000
GPUS = 8
FILL = 0.75


def mix(rng: random.Random, n: int) -> list[tuple[int, int]]:
    """(num_gpu, gpu_milli): 35% 1-GPU, 15% 2, 10% 4, 5% 8, 35% shares of 100..900."""
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.35:
            out.append((1, MILLI))
        elif r < 0.50:
            out.append((2, MILLI))
        elif r < 0.60:
            out.append((4, MILLI))
        elif r < 0.65:
            out.append((8, MILLI))
        else:
            out.append((1, rng.randrange(100, 901, 50)))
    return out


def ours(nodes: int, steps: int, seed: int, policy: PolicyName = PolicyName.FAST_BEST_FIT) -> float:
    rng = random.Random(seed)
    e = Engine(policy=policy, seed=seed)
    for i in range(nodes):
        e.add_node(NodeSpec(f"n{i:06d}", 128_000, 1_048_576, tuple(GpuSpec("H100") for _ in range(GPUS))))
    shapes = mix(rng, steps + nodes * GPUS)
    reqs = [Request(key=f"r{i}", num_gpu=k, gpu_milli=m, cpu_milli=1000, memory_mib=4096)
            for i, (k, m) in enumerate(shapes)]
    live: list[str] = []
    used, target, i = 0, FILL * nodes * GPUS * MILLI, 0
    while used < target:
        d = e.place(reqs[i])
        i += 1
        if d.placed:
            live.append(d.key)
            used += d.assignments[0].gpu_milli * len(d.assignments[0].gpu_indices)
    timed = reqs[i:i + steps]
    rand = rng.random
    place, release = e.place, e.release
    t0 = time.perf_counter()
    for r in timed:
        d = place(r)
        if d.placed:
            live.append(r.key)
        j = int(rand() * len(live))
        live[j], live[-1] = live[-1], live[j]
        release(live.pop())
    took = time.perf_counter() - t0
    e.check_invariants()
    return steps / took


def kernel(nodes: int, steps: int, seed: int) -> float:
    """A bare best-fit kernel in plain Python: free-GPU buckets, no engine around it."""
    rng = random.Random(seed)
    free = [[MILLI] * GPUS for _ in range(nodes)]
    full = [GPUS] * nodes
    buckets = [dict() for _ in range(GPUS + 1)]
    for n in range(nodes):
        buckets[GPUS][n] = None
    part = [dict() for _ in range(MILLI // 50)]  # (n<<3|g) of partly used GPUs by free//50
    shapes = mix(rng, steps + nodes * GPUS)
    live: list[tuple] = []

    def take(n, gs, m):
        row = free[n]
        k0 = full[n]
        k = k0
        for g in gs:
            old = row[g]
            row[g] = new = old - m
            if old == MILLI:
                k -= 1
            else:
                part[old // 50].pop(n << 3 | g, None)
            if 0 < new < MILLI:
                part[new // 50][n << 3 | g] = None
        if k != k0:
            del buckets[k0][n]
            buckets[k][n] = None
            full[n] = k

    def give(n, gs, m):
        row = free[n]
        k0 = full[n]
        k = k0
        for g in gs:
            old = row[g]
            row[g] = new = old + m
            if 0 < old < MILLI:
                part[old // 50].pop(n << 3 | g, None)
            if new == MILLI:
                k += 1
            else:
                part[new // 50][n << 3 | g] = None
        if k != k0:
            del buckets[k0][n]
            buckets[k][n] = None
            full[n] = k

    def place(k, m):
        if m < MILLI:
            for b in range(m // 50, MILLI // 50):
                for key in part[b]:
                    n, g = key >> 3, key & 7
                    if free[n][g] >= m:
                        take(n, (g,), m)
                        return (n, (g,), m)
            k = 1
        for kk in range(k, GPUS + 1):
            for n in buckets[kk]:
                row = free[n]
                gs = tuple(g for g in range(GPUS) if row[g] == MILLI)[:k]
                take(n, gs, m)
                return (n, gs, m)
        return None

    used, target, i = 0, FILL * nodes * GPUS * MILLI, 0
    while used < target:
        got = place(*shapes[i])
        i += 1
        if got:
            live.append(got)
            used += got[2] * len(got[1])
    rand = rng.random
    t0 = time.perf_counter()
    for k, m in shapes[i:i + steps]:
        got = place(k, m)
        if got:
            live.append(got)
        j = int(rand() * len(live))
        live[j], live[-1] = live[-1], live[j]
        give(*live.pop())
    took = time.perf_counter() - t0
    return steps / took


TOPOLOGY_REQUESTS = {
    "gang_2x4_same_rack": dict(num_gpu=4, replicas=2, topology=Topology.SAME_RACK),
    "2_gpus_same_nvlink_island": dict(num_gpu=2, topology=Topology.SAME_NVLINK_ISLAND),
    "unplaceable_explained": dict(num_gpu=16),
}


def topology_requests(nodes: int, seed: int, count: int = 200) -> dict[str, float]:
    """Median µs per request of each kind, on a cluster 60% full of 1-GPU allocations (4-node racks, two
    NVLink islands per node), each request after one fast-path placement and one release."""
    rng = random.Random(seed)
    e = Engine(policy=PolicyName.FAST_BEST_FIT, seed=seed)
    for i in range(nodes):
        e.add_node(NodeSpec(f"n{i:06d}", 128_000, 1_048_576,
                            tuple(GpuSpec("H100", nvlink_island=g // 4) for g in range(GPUS)),
                            labels={"rack": f"r{i // 4}"}))
    live = [f"f{i}" for i in range(int(nodes * GPUS * 0.6))
            if e.place(Request(key=f"f{i}", num_gpu=1, cpu_milli=1000, memory_mib=1024)).placed]
    out = {}
    for name, shape in TOPOLOGY_REQUESTS.items():
        took = []
        for i in range(count):
            if e.place(Request(key=f"c-{name}-{i}", num_gpu=1, cpu_milli=1000, memory_mib=1024)).placed:
                live.append(f"c-{name}-{i}")
            e.release(live.pop(rng.randrange(len(live))))
            t0 = time.perf_counter()
            d = e.place(Request(key=f"{name}-{i}", cpu_milli=1000, memory_mib=1024, **shape))
            took.append(time.perf_counter() - t0)
            if d.placed:
                e.release(d.key)
        out[name] = statistics.median(took) * 1e6
    e.check_invariants()
    return out


def openb_quality_policy(seed: int, limit: int) -> float:
    from scheduler import replay

    r = replay.run_arrivals((str(replay.resolve_workload("default")), str(replay.NODES_DEFAULT), (),
                             BEST_QUALITY_POLICY.value, seed, limit))
    return r["decisions_per_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json")
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sizes", default="1000,10000,50000")
    ap.add_argument("--openb-tasks", type=int, default=3000)
    ns = ap.parse_args(argv)
    sizes = [int(x) for x in ns.sizes.split(",")]
    per_size = {}
    for n in sizes:
        o = statistics.median(ours(n, ns.steps, s) for s in range(ns.repeat))
        k = statistics.median(kernel(n, ns.steps, s) for s in range(ns.repeat))
        off = [topology_requests(n, s) for s in range(ns.repeat)]
        off_us = {name: statistics.median(r[name] for r in off) for name in TOPOLOGY_REQUESTS}
        per_size[str(n)] = {"decisions_per_s": o, "kernel_decisions_per_s": k, "ratio_to_kernel": o / k,
                            "topology_requests_us": off_us}
        print(f"{n:>6} nodes × {GPUS} GPUs: ours {o:>10,.0f}/s   kernel {k:>10,.0f}/s   ratio {o / k:.2f}   "
              f"gang / island / unplaceable: " + ", ".join(f"{name} {v:,.0f} µs" for name, v in off_us.items()), flush=True)
    ref = per_size.get("10000") or per_size[str(sizes[0])]
    frag = statistics.median(openb_quality_policy(42 + s, ns.openb_tasks) for s in range(ns.repeat))
    print(f"openb (1,213 nodes), {BEST_QUALITY_POLICY.value}: {frag:,.0f} decisions/s "
          f"(first {ns.openb_tasks} tasks of default)")
    ok_fast = ref["decisions_per_s"] >= 100_000
    ok_frag = frag >= 10_000
    print(f"target ≥100,000/s at 10k nodes: {'met' if ok_fast else 'NOT met'}; "
          f"target ≥10,000/s best-quality on openb: {'met' if ok_frag else 'NOT met'}")
    write_json(ns.json, {"decisions_per_s": ref["decisions_per_s"],
                         "kernel_decisions_per_s": ref["kernel_decisions_per_s"],
                         "ratio_to_kernel": ref["ratio_to_kernel"],
                         "frag_policy": BEST_QUALITY_POLICY.value,
                         "frag_policy_decisions_per_s_openb": frag, "per_cluster_size": per_size,
                         "steps": ns.steps, "repeat": ns.repeat, "targets_met": {"fast": ok_fast, "frag": ok_frag}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
