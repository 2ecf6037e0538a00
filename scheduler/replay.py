"""Trace replay with a virtual clock: the FGD paper's protocol, and a replay over time.

    gpuaas simulate --workload default --policy all --seeds 42-51 --json out.json
    gpuaas simulate --mode time --workload default --add-nodes 200:G2

``--mode arrivals`` (default) is the paper's "arrived workload" protocol, as
described in benchmarks/data/openb/README.md: order tasks by name, shuffle
with the seed, resize the list to 1.3× the cluster's GPUs, place one at a time
with no departures (a failed task is never retried), and report the share of
GPU capacity left unallocated as the arrived demand grows.

``--mode time`` replays creation/deletion times: arrivals that do not fit wait
in the engine's queue and are retried when capacity comes back. It reports
utilization over time and queue waits — what a capacity planner runs to ask
"what if we add 200 nodes of model X".

The engine is the product's (scheduler.Engine); nothing is re-implemented here.
"""
from __future__ import annotations

import argparse
import collections
import functools
import heapq
import json
import math
import multiprocessing as mp
import os
import pathlib
import random
import statistics
import sys
import time

from scheduler.engine import Engine
from scheduler.frag import typical_shapes
from scheduler.trace import Pod, load_nodes, load_pods
from scheduler.types import BEST_QUALITY_POLICY, MILLI, GpuSpec, NodeSpec, PolicyName

REPO = pathlib.Path(__file__).resolve().parent.parent
DATA = REPO / "benchmarks" / "data" / "openb"
NODES_DEFAULT = DATA / "openb_node_list_gpu_node.csv"
CURVE = (80, 90, 95, 100, 110, 120, 130)
RESIZE_FACTOR = 1.3
PAPER_WORKLOADS = ("default", "cpu050", "cpu100", "cpu200", "cpu250", "gpushare40", "gpushare60", "gpushare80",
                   "gpushare100", "multigpu20", "multigpu30", "multigpu40", "multigpu50")

# Published means ± sd (unallocated GPU % at arrived = 100%), Weng et al., USENIX ATC'23, via data/README.md.
_PAPER_COLS = ("random", "dot-product", "gpu-clustering", "gpu-packing", "best-fit", "fgd")
_PAPER_ROWS = """
default 13.70 0.33 9.38 0.19 8.35 0.61 8.22 0.53 7.14 0.14 4.77 0.11
cpu050 10.98 0.26 6.97 0.19 6.48 0.34 6.54 0.32 6.44 0.13 5.00 0.11
cpu100 12.57 0.28 8.27 0.27 7.58 0.40 7.50 0.42 6.74 0.13 4.79 0.14
cpu200 16.97 0.27 12.55 0.61 10.33 0.38 10.02 0.48 7.85 0.21 5.18 0.16
cpu250 20.00 0.33 16.43 0.45 12.25 0.61 11.95 0.68 8.79 0.25 6.80 0.29
gpushare40 15.14 0.34 10.70 0.14 10.24 0.62 10.23 0.53 8.56 0.20 6.04 0.07
gpushare60 17.19 0.35 13.18 0.28 13.10 0.41 12.85 0.37 10.94 0.18 8.75 0.13
gpushare80 19.38 0.28 15.86 0.19 15.50 0.54 15.35 0.50 13.34 0.24 10.92 0.11
gpushare100 21.10 0.15 18.02 0.30 17.78 0.51 17.87 0.50 15.38 0.22 13.36 0.16
multigpu20 13.08 0.52 8.15 0.32 6.66 0.60 6.50 0.64 6.27 0.25 4.47 0.16
multigpu30 13.37 0.47 6.89 0.31 5.45 0.32 5.30 0.32 5.43 0.24 3.64 0.10
multigpu40 14.62 0.76 5.96 0.22 4.65 0.30 4.41 0.31 4.90 0.23 3.09 0.10
multigpu50 18.72 0.83 5.27 0.20 4.31 0.28 3.94 0.31 4.38 0.18 2.91 0.11
"""
PAPER: dict[str, dict[str, tuple[float, float]]] = {}
for _line in _PAPER_ROWS.strip().splitlines():
    _w, *_v = _line.split()
    PAPER[_w] = {c: (float(_v[2 * i]), float(_v[2 * i + 1])) for i, c in enumerate(_PAPER_COLS)}
# Default workload, median over seeds, arrived % → unallocated %.
PAPER_CURVE = {
    "random": (21.24, 14.97, 14.32, 13.75, 13.23, 12.84, 12.62),
    "best-fit": (19.99, 9.99, 7.14, 7.09, 7.02, 6.96, 6.89),
    "fgd": (19.99, 10.00, 5.09, 4.77, 4.68, 4.63, 4.60),
}


# ---------------------------------------------------------------- inputs

def resolve_workload(name: str) -> pathlib.Path:
    p = pathlib.Path(name)
    if p.suffix == ".csv" or os.sep in name:
        if not p.exists():
            raise SystemExit(f"no such workload file: {p}")
        return p
    f = DATA / f"openb_pod_list_{name}.csv"
    if not f.exists():
        names = sorted(x.stem.removeprefix("openb_pod_list_") for x in DATA.glob("openb_pod_list_*.csv"))
        raise SystemExit(f"unknown workload {name!r}; choose from {', '.join(names)} or give a CSV path")
    return f


def workload_name(path: pathlib.Path) -> str:
    return path.stem.removeprefix("openb_pod_list_")


def parse_seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        if "-" in part.strip()[1:]:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        elif part.strip():
            out.append(int(part))
    return out


def parse_policies(values: list[str] | None) -> list[PolicyName]:
    if not values:
        return [BEST_QUALITY_POLICY]
    out: list[PolicyName] = []
    for v in values:
        for item in v.split(","):
            if item.strip().lower() == "all":
                out.extend(p for p in PolicyName if p not in out)
            else:
                p = PolicyName.parse(item)
                if p not in out:
                    out.append(p)
    return out


def add_nodes(nodes: list[NodeSpec], spec: str) -> list[NodeSpec]:
    """'200:G2' → 200 more nodes shaped like the most common node with G2 GPUs."""
    count_s, _, model = spec.partition(":")
    count = int(count_s)
    like = [n for n in nodes if n.gpus and n.gpus[0].model == model]
    if not like:
        raise SystemExit(f"--add-nodes {spec}: no node of model {model!r} to copy")
    shape = collections.Counter((n.cpu_milli, n.memory_mib, len(n.gpus)) for n in like).most_common(1)[0][0]
    cpu, mem, g = shape
    return nodes + [NodeSpec(f"added-{model}-{i:05d}", cpu, mem, tuple(GpuSpec(model=model) for _ in range(g)))
                    for i in range(count)]


@functools.lru_cache(maxsize=32)
def _pods(path: str) -> tuple[Pod, ...]:
    return tuple(load_pods(path))


@functools.lru_cache(maxsize=8)
def _nodes(path: str, extra: tuple[str, ...]) -> tuple[NodeSpec, ...]:
    nodes = load_nodes(path)
    for spec in extra:
        nodes = add_nodes(nodes, spec)
    return tuple(nodes)


def arrivals(pods: tuple[Pod, ...], seed: int, total_gpu_milli: int, factor: float = RESIZE_FACTOR) -> list[Pod]:
    """Paper steps 1–2: order by name, shuffle with the seed, resize to ``factor`` × the cluster's GPUs."""
    rng = random.Random(seed)
    base = sorted(pods, key=lambda p: p.name)
    out = list(base)
    rng.shuffle(out)
    target = factor * total_gpu_milli
    demand = sum(p.gpu_demand_milli for p in out)
    if demand < target:
        while True:
            p = base[rng.randrange(len(base))]
            if demand + p.gpu_demand_milli > target:
                break
            out.append(p)
            demand += p.gpu_demand_milli
    else:
        while demand > target and out:
            p = out.pop(rng.randrange(len(out)))
            demand -= p.gpu_demand_milli
    return out


def make_engine(policy: PolicyName, seed: int, nodes, pods) -> Engine:
    e = Engine(policy=policy, seed=seed)
    for n in nodes:
        e.add_node(n)
    order = [n.node_id for n in sorted(nodes, key=lambda n: n.node_id)]
    random.Random(seed).shuffle(order)
    e.set_node_order(order)  # the paper simulator's tie-break: a fixed, seeded node order
    e.set_workload(typical_shapes([p.shape() for p in pods]))
    return e


# ---------------------------------------------------------------- arrivals-only (paper protocol)

def run_arrivals(job: tuple) -> dict:
    workload, nodes_path, extra, policy_value, seed, limit = job
    policy = PolicyName(policy_value)
    pods = _pods(workload)
    nodes = _nodes(nodes_path, extra)
    total = sum(len(n.gpus) for n in nodes) * MILLI
    seq = arrivals(pods, seed, total)
    if limit:
        seq = seq[:limit]
    e = make_engine(policy, seed, nodes, pods)
    sums: dict[int, float] = collections.defaultdict(float)
    counts: dict[int, int] = collections.defaultdict(int)
    arrived = allocated = placed = 0
    t0 = time.perf_counter()
    for i, p in enumerate(seq):
        d = e.place(p.request(key=f"t{i}"))
        arrived += p.gpu_demand_milli
        if d.placed:
            placed += 1
            allocated += sum(a.gpu_milli * len(a.gpu_indices) for a in d.assignments)
        x = int(math.floor(100.0 * arrived / total + 0.5))
        sums[x] += 100.0 - 100.0 * allocated / total
        counts[x] += 1
    took = time.perf_counter() - t0
    e.check_invariants()
    engine_alloc = sum(al.gpu_milli_total for al in e.allocs.values())
    curve = {str(x): (sums[x] / counts[x] if counts[x] else None) for x in CURVE}
    return {"workload": workload_name(pathlib.Path(workload)), "policy": policy.value, "seed": seed,
            "tasks": len(seq), "placed": placed, "failed": len(seq) - placed,
            "allocated_milli": allocated, "engine_allocated_milli": engine_alloc, "arrived_milli": arrived,
            "total_gpu_milli": total, "curve": curve, "decisions_per_s": len(seq) / took if took else 0.0}


def summarize(runs: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
    for r in runs:
        groups[(r["workload"], r["policy"])].append(r)
    out = []
    for (w, p), rs in groups.items():
        at100 = [r["curve"]["100"] for r in rs if r["curve"]["100"] is not None]
        curve = {}
        for x in CURVE:
            vals = [r["curve"][str(x)] for r in rs if r["curve"][str(x)] is not None]
            curve[str(x)] = statistics.median(vals) if vals else None
        paper = PAPER.get(w, {}).get(p)
        out.append({"workload": w, "policy": p, "seeds": [r["seed"] for r in rs],
                    "unallocated_pct_at_100_mean": statistics.fmean(at100) if at100 else None,
                    "unallocated_pct_at_100_sd": statistics.stdev(at100) if len(at100) > 1 else 0.0,
                    "curve": curve,
                    "decisions_per_s": statistics.median(r["decisions_per_s"] for r in rs),
                    "paper_mean": paper[0] if paper else None, "paper_sd": paper[1] if paper else None,
                    "paper_fgd_mean": PAPER.get(w, {}).get("fgd", (None,))[0]})
    order = {p.value: i for i, p in enumerate(PolicyName)}
    out.sort(key=lambda r: (PAPER_WORKLOADS.index(r["workload"]) if r["workload"] in PAPER_WORKLOADS else 99,
                            r["workload"], order.get(r["policy"], 99)))
    return out


def print_table(results: list[dict], out=sys.stdout) -> None:
    print(f"{'workload':<12} {'policy':<14} {'ours at 100%':>14} {'paper':>13} {'Δ pp':>6} "
          f"{'vs paper FGD':>12} {'decisions/s':>11}", file=out)
    for r in results:
        m, sd = r["unallocated_pct_at_100_mean"], r["unallocated_pct_at_100_sd"]
        ours = f"{m:6.2f} ± {sd:4.2f}" if m is not None else "n/a"
        paper = f"{r['paper_mean']:5.2f} ± {r['paper_sd']:4.2f}" if r["paper_mean"] is not None else "—"
        delta = f"{m - r['paper_mean']:+5.2f}" if (m is not None and r["paper_mean"] is not None) else "—"
        fgd = r["paper_fgd_mean"]
        vs = f"{100 * (m - fgd) / fgd:+6.1f}%" if (m is not None and fgd) else "—"
        print(f"{r['workload']:<12} {r['policy']:<14} {ours:>14} {paper:>13} {delta:>6} {vs:>12} "
              f"{r['decisions_per_s']:>11.0f}", file=out)
    curves = [r for r in results if r["workload"] == "default"]
    if curves:
        print("\ndefault workload, unallocated GPU % by arrived % (median over seeds; paper in brackets)", file=out)
        print(f"{'policy':<14} " + " ".join(f"{x:>14}" for x in CURVE), file=out)
        for r in curves:
            paper = PAPER_CURVE.get(r["policy"])
            cells = []
            for i, x in enumerate(CURVE):
                v = r["curve"][str(x)]
                s = "n/a" if v is None else f"{v:.2f}"
                if paper:
                    s += f" [{paper[i]:.2f}]"
                cells.append(f"{s:>14}")
            print(f"{r['policy']:<14} " + " ".join(cells), file=out)


def run_jobs(jobs: list[tuple], processes: int, fn=run_arrivals) -> list[dict]:
    if processes <= 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    ctx = mp.get_context("fork") if sys.platform != "win32" else mp.get_context()
    with ctx.Pool(processes) as pool:
        return list(pool.imap_unordered(fn, jobs))


# ---------------------------------------------------------------- replay over time

def run_time(job: tuple) -> dict:
    """Arrivals at creation_time, departures after the task's duration; the queue retries on departures."""
    workload, nodes_path, extra, policy_value, seed, limit, samples = job
    policy = PolicyName(policy_value)
    pods = [p for p in _pods(workload) if p.creation_time is not None]
    if limit:
        pods = sorted(pods, key=lambda p: p.creation_time)[:limit]
    nodes = _nodes(nodes_path, extra)
    total = sum(len(n.gpus) for n in nodes) * MILLI
    e = make_engine(policy, seed, nodes, pods)
    events: list[tuple[int, int, int]] = []  # (time, kind 0=departure 1=arrival, index)
    for i, p in enumerate(pods):
        heapq.heappush(events, (p.creation_time, 1, i))
    t_end = max((p.deletion_time or p.creation_time) for p in pods) if pods else 0
    t_start = min((p.creation_time for p in pods), default=0)
    step = max(1, (t_end - t_start) // max(1, samples))
    next_sample = t_start
    util: list[tuple[int, float, int]] = []
    allocated = 0
    arrived_at: dict[int, int] = {}
    waits: list[int] = []
    max_queue = 0
    decisions = 0
    t0 = time.perf_counter()

    def started(i: int, d, now: int) -> None:
        nonlocal allocated
        p = pods[i]
        allocated += sum(a.gpu_milli * len(a.gpu_indices) for a in d.assignments)
        waits.append(now - arrived_at[i])
        dur = (p.deletion_time - p.creation_time) if p.deletion_time and p.deletion_time > p.creation_time else None
        if dur is not None:
            heapq.heappush(events, (now + dur, 0, i))

    while events:
        now, kind, i = heapq.heappop(events)
        while now >= next_sample and next_sample <= t_end:
            util.append((next_sample, 100.0 * allocated / total, len(e.queue)))
            next_sample += step
        key = f"t{i}"
        if kind == 1:
            arrived_at[i] = now
            d = e.place(pods[i].request(key=key))
            decisions += 1
            if d.placed:
                started(i, d, now)
            else:
                e.enqueue(pods[i].request(key=key))
                max_queue = max(max_queue, len(e.queue))
        else:
            al = e.allocs.get(key)
            if al is not None:
                allocated -= al.gpu_milli_total
                e.release(key)
            if len(e.queue):
                for d in e.schedule_pending(attempts_max=256):
                    decisions += 1
                    if d.placed:
                        started(int(d.key[1:]), d, now)
    took = time.perf_counter() - t0
    e.check_invariants()
    waits_sorted = sorted(waits)

    def pct(q: float) -> float:
        return float(waits_sorted[min(len(waits_sorted) - 1, int(q * (len(waits_sorted) - 1)))]) if waits else 0.0

    return {"workload": workload_name(pathlib.Path(workload)), "policy": policy.value, "seed": seed,
            "nodes": len(nodes), "gpus": total // MILLI, "tasks": len(pods), "started": len(waits),
            "never_started": len(pods) - len(waits), "max_queue": max_queue,
            "wait_s_mean": statistics.fmean(waits) if waits else 0.0, "wait_s_p50": pct(0.5),
            "wait_s_p95": pct(0.95), "wait_s_max": float(waits_sorted[-1]) if waits else 0.0,
            "utilization_pct_mean": statistics.fmean(u for _, u, _ in util) if util else 0.0,
            "utilization_pct_max": max((u for _, u, _ in util), default=0.0),
            "utilization": [{"t": t, "allocated_pct": round(u, 3), "queued": q} for t, u, q in util],
            "decisions_per_s": decisions / took if took else 0.0}


def print_time(results: list[dict], out=sys.stdout) -> None:
    print(f"{'workload':<12} {'policy':<14} {'nodes':>6} {'GPUs':>6} {'tasks':>6} {'never':>6} "
          f"{'util mean%':>10} {'util max%':>9} {'wait p50 s':>10} {'wait p95 s':>10} {'max queue':>9}", file=out)
    for r in results:
        print(f"{r['workload']:<12} {r['policy']:<14} {r['nodes']:>6} {r['gpus']:>6} {r['tasks']:>6} "
              f"{r['never_started']:>6} {r['utilization_pct_mean']:>10.2f} {r['utilization_pct_max']:>9.2f} "
              f"{r['wait_s_p50']:>10.0f} {r['wait_s_p95']:>10.0f} {r['max_queue']:>9}", file=out)


# ---------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gpuaas simulate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", action="append", help="NAME (openb_pod_list_NAME.csv), a CSV path, or 'all' "
                    "(the paper's 13 workloads); repeatable; default 'default'")
    ap.add_argument("--policy", action="append", help="policy name, repeatable, or 'all'; default "
                    f"{BEST_QUALITY_POLICY.value}")
    ap.add_argument("--seeds", default="42-51", help="e.g. 42-51 or 42,43 (default 42-51)")
    ap.add_argument("--nodes", default=str(NODES_DEFAULT), help="node list CSV (default: the shipped GPU nodes)")
    ap.add_argument("--add-nodes", action="append", default=[], metavar="N:MODEL",
                    help="add N nodes shaped like the cluster's MODEL nodes (repeatable)")
    ap.add_argument("--mode", choices=("arrivals", "time"), default="arrivals")
    ap.add_argument("--json", help="write results as JSON here")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: all cores)")
    ap.add_argument("--limit", type=int, default=0, help="replay only the first N tasks (smoke runs)")
    ap.add_argument("--samples", type=int, default=200, help="utilization samples over time (--mode time)")
    ap.add_argument("--list-policies", action="store_true", help="print the policy names and exit")
    return ap


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.list_policies:
        for p in PolicyName:
            tag = " (best quality, replay default)" if p is BEST_QUALITY_POLICY else ""
            tag += " (engine default)" if p is PolicyName.FAST_BEST_FIT else ""
            print(f"{p.value}{tag}")
        return 0
    names = ns.workload or ["default"]
    workloads: list[pathlib.Path] = []
    for w in names:
        if w == "all":
            workloads.extend(resolve_workload(x) for x in PAPER_WORKLOADS)
        else:
            workloads.append(resolve_workload(w))
    policies = parse_policies(ns.policy)
    seeds = parse_seeds(ns.seeds)
    extra = tuple(ns.add_nodes)
    nodes_path = str(pathlib.Path(ns.nodes))
    t0 = time.perf_counter()
    if ns.mode == "arrivals":
        jobs = [(str(w), nodes_path, extra, p.value, s, ns.limit) for w in workloads for p in policies for s in seeds]
        # longest first keeps both cores busy to the end
        frag = (PolicyName.FGD, PolicyName.FGD_PLUS, PolicyName.FGD_BALANCED)
        jobs.sort(key=lambda j: (PolicyName(j[3]) not in frag, j[0], j[3], j[4]))
        runs = run_jobs(jobs, ns.jobs)
        results = summarize(runs)
        print_table(results)
        payload = {"mode": "arrivals", "results": results, "runs": sorted(runs, key=lambda r: (
            r["workload"], r["policy"], r["seed"]))}
    else:
        jobs = [(str(w), nodes_path, extra, p.value, s, ns.limit, ns.samples)
                for w in workloads for p in policies for s in seeds[:1]]
        results = run_jobs(jobs, ns.jobs, run_time)
        print_time(results)
        payload = {"mode": "time", "results": results}
    payload["wall_s"] = time.perf_counter() - t0
    payload["add_nodes"] = list(extra)
    print(f"\n{len(jobs)} replays in {payload['wall_s']:.1f} s")
    if ns.json:
        p = pathlib.Path(ns.json)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
