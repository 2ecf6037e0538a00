"""Durable placements through the running control plane, over gRPC.

Starts a real control plane (embedded Postgres, local Ray, the actors,
simulated node daemons), then, from this separate client process, each phase
after the previous phases' downstream work has drained (every allocation placed
so far prepared and RUNNING; the waits are reported as ``settle_s``), so that
each phase's rate and CPU are its own:
- PlaceBatch: batches of small fractional requests; every placement is
  committed to Postgres (group commit) before the answer. The headline is one client
  sending its batches one after another (each waits for the last answer, so it is
  latency-bound). Before the other phases, on the empty fleet, the same is measured from
  several client processes at once (``--batch-clients``, 4; each releases what it placed,
  untimed, and the downstream work is drained before anything else is timed), which shows
  the server's capacity where the machine has the cores for it;
- Place unary, sustained: closed loop from several client threads (the headline, 8 by
  default), and again from more threads after the paced phase (``--threads-high``, 32): the
  closed loop from one client process is latency-bound, so the server's capacity shows only
  with more requests in flight. Right after each, the same loop against a bare gRPC server (the
  health service alone, in a process of its own) gives this machine's gRPC Python unary ceiling
  at that moment (``bare_unary_per_s``) and our share of it;
- Place unary paced at a fixed rate (default 500/s): latency percentiles at the
  client and inside the server (handler start to answer), measured
  with the client's threads already started, so they describe a steady 500/s.

    python benchmarks/grpc_placement.py --json results/grpc_placement.json

The fractional requests (1–2 thousandths of a GPU) let a small simulated
fleet hold tens of thousands of allocations, so the figure measures the
decision + commit path, not the fleet size.
"""
from __future__ import annotations

import argparse
import gc
import concurrent.futures as cf
import dataclasses
import random
import threading
import time
import uuid

import _common  # noqa: F401
from _common import (add_batch_args, cpu_per_op, median, percentile, pg_apps, placed_pending, processes,
                     start_control_plane, write_json)


def paced_with_threads(clients, run, rep, n, interval, threads, rng) -> list[float]:
    """The same schedule from a pool of client threads, one blocking call each."""
    pool = cf.ThreadPoolExecutor(threads)
    list(pool.map(lambda _: time.sleep(0.01), range(threads)))
    # The schedule starts once every request is queued in the pool: queueing thousands of
    # work items is the client's own work, and would make the first requests late.
    go = threading.Event()
    start = 0.0

    def one(i):
        go.wait()
        target = start + i * interval
        delay = target - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t = time.perf_counter()
        clients[i % len(clients)].place(f"{run}-{rep}-p{i}", gpu_milli=rng.randint(1, 2))
        # Latency from the scheduled send time: a late start counts against us.
        return time.perf_counter() - min(t, target) if t > target else time.perf_counter() - t

    with pool:
        futures = [pool.submit(one, i) for i in range(n)]
        start = time.perf_counter()
        go.set()
        return [f.result() for f in futures]


def _batch_client(address: str, token: str, prefix: str, batches: int, batch_size: int, seed: int,
                  go, release, out) -> None:
    """One client process of the concurrent PlaceBatch phase: builds its batches, waits for ``go``,
    sends them one after another, reports (placed, start, end) and releases what it placed."""
    from gpuaas.client import Client

    rng = random.Random(seed)
    client = Client(address, token, timeout_s=120)
    todo = [[Client.request(f"{prefix}-b{b}-{i}", gpu_milli=rng.randint(1, 2)) for i in range(batch_size)]
            for b in range(batches)]
    out.put("ready")
    go.wait()
    ids, t0 = [], time.perf_counter()
    for reqs in todo:
        resp = client.place_batch(reqs)
        ids.extend(r.allocation.allocation_id for r in resp.results if r.HasField("allocation"))
    out.put((len(ids), t0, time.perf_counter()))
    # Untimed, once every client has been answered: give the capacity back, so that the later
    # rounds find the fleet as the single client's phase left it.
    release.wait()
    for k in range(0, len(ids), batch_size):
        client.release_batch(ids[k:k + batch_size])


def concurrent_batches(address: str, token: str, prefix: str, clients: int, batches: int, batch_size: int) -> float:
    """PlaceBatch from ``clients`` processes at once, each sending ``batches`` batches one after
    another: placements answered per second, from the first send to the last answer. Requests are
    built before the clock starts (each process's own work, not the server's). Each process then
    releases its placements; this returns once they are released."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    go, release, out = ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_batch_client,
                         args=(address, token, f"{prefix}-c{k}", batches, batch_size, k, go, release, out))
             for k in range(clients)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            if out.get(timeout=120) != "ready":
                raise RuntimeError("a batch client failed to start")
        go.set()
        results = [out.get(timeout=600) for _ in procs]
    finally:
        release.set()
        for p in procs:
            p.join(120)
    placed = sum(r[0] for r in results)
    return placed / (max(r[2] for r in results) - min(r[1] for r in results))


def _bare_server(port_q, stop) -> None:
    """A bare gRPC server in a process of its own: the health service alone, on a thread pool of the
    control plane's size. Its closed-loop rate is the machine's gRPC Python unary ceiling, now."""
    import concurrent.futures as cf_

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from gpuaas.config import ControlPlaneConfig

    server = grpc.server(cf_.ThreadPoolExecutor(max_workers=ControlPlaneConfig().grpc_workers))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port_q.put(port)
    stop.wait()
    server.stop(0)


class BareCeiling:
    """The same closed loop as ``closed_loop`` (one thread and one channel per client), against a bare
    server doing nothing: what gRPC in Python manages on this machine at the moment it is measured, so
    that ``place_unary_per_s`` can be read as a share of it on a machine whose speed drifts."""

    def __init__(self, threads: int):
        import multiprocessing as mp

        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        ctx = mp.get_context("spawn")
        q, self._stop = ctx.Queue(), ctx.Event()
        self._proc = ctx.Process(target=_bare_server, args=(q, self._stop), daemon=True)
        self._proc.start()
        port = q.get(timeout=120)
        self._channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _ in range(threads)]
        self._stubs = [health_pb2_grpc.HealthStub(ch) for ch in self._channels]
        self._req = health_pb2.HealthCheckRequest()
        for stub in self._stubs:
            stub.Check(self._req, timeout=30)

    def rate(self, n: int) -> float:
        counter = iter(range(n))
        lock = threading.Lock()

        def worker(stub):
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                stub.Check(self._req, timeout=30)

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(len(self._stubs)) as ex:
            list(ex.map(worker, self._stubs))
        return n / (time.perf_counter() - t0)

    def close(self) -> None:
        for ch in self._channels:
            ch.close()
        self._stop.set()
        self._proc.join(30)


def closed_loop(clients, prefix: str, n: int, rng) -> float:
    """Place unary from one thread per client, each sending its next request when the last is
    answered, until ``n`` are answered: the rate."""
    counter = iter(range(n))
    lock = threading.Lock()

    def worker(c):
        done = 0
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return done
            c.place(f"{prefix}{i}", gpu_milli=rng.randint(1, 2))
            done += 1

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(len(clients)) as ex:
        done = sum(ex.map(worker, clients))
    return done / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_batch_args(ap)
    ap.add_argument("--batch-clients", type=int, default=4,
                    help="client processes of the concurrent PlaceBatch phase (0: skip it)")
    ap.add_argument("--batch-client-batches", type=int, default=2,
                    help="batches of --batch-size each client process sends in the concurrent phase")
    ap.add_argument("--unary", type=int, default=3000, help="requests in the sustained unary run")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--threads-high", type=int, default=32,
                    help="client threads of the second closed unary loop, after the paced phase (0: skip it)")
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--paced-seconds", type=float, default=6.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--settle-max-s", type=float, default=10.0,
                    help="before each phase, wait at most this long for every PLACED allocation to be RUNNING")
    ap.add_argument("--dispatch-linger-s", type=float, default=None,
                    help="override ControlPlaneConfig.dispatch_linger_s (hand-off window to the allocation shards)")
    ap.add_argument("--json")
    ns = ap.parse_args()

    import ray

    from gpuaas.client import Client
    from gpuaas.config import ControlPlaneConfig

    cfg = ControlPlaneConfig(listen="127.0.0.1:0")
    if ns.dispatch_linger_s is not None:
        cfg = dataclasses.replace(cfg, dispatch_linger_s=ns.dispatch_linger_s)
    # A fresh database per run, deleted when the control plane stops.
    cp, token = start_control_plane("grpc", ns.nodes, ns.gpus_per_node, cfg)
    bare = None
    rng = random.Random(1)
    try:
        clients = [Client(cp.address, token) for _ in range(ns.threads)]
        clients_high = [Client(cp.address, token) for _ in range(ns.threads_high)]
        bare = BareCeiling(ns.threads)
        bare_rates: list[float] = []  # the bare server's closed loop, right after ours, each repeat
        high_rates: list[float] = []  # the closed unary loop from --threads-high threads
        run = uuid.uuid4().hex[:6]
        batch_rates, unary_rates, p50s, p99s = [], [], [], []
        batch_cpu: list[dict] = []  # per repeat: ms of CPU per placement by process, PlaceBatch phase
        unary_cpu: list[dict] = []  # the same for the closed unary loop
        batch_conc_rates: list[float] = []  # PlaceBatch from --batch-clients processes at once
        srv_p50s, srv_p99s = [], []  # the same paced requests, measured inside the server
        pauses: list[dict] = []  # per repeat: whole-process pauses during the paced phase
        from actors.runtime import GcPacer, PauseProbe
        client_probe = PauseProbe(name="client-pause-probe")
        client_gc = GcPacer(own_full_collections=False)  # counts and times this process's collections only
        timeline: list[list[float]] = []  # per repeat: each paced request's latency (ms), in send order
        paced_started: list[float] = []  # per repeat: the paced schedule's start (Unix time), to line it up with other records
        settle_s: list[dict] = []  # per repeat and phase: the wait for PLACED allocations to reach RUNNING first
        # PlaceBatch from several client processes at once, first, on the empty fleet (after the other
        # phases it would find the fleet nearly full). Each round's releases, their cleanups and the
        # ledger's reading of it all finish before the next round and before the other phases.
        for rep in range(ns.repeats if ns.batch_clients else 0):
            batch_conc_rates.append(concurrent_batches(cp.address, token, f"{run}-{rep}-k", ns.batch_clients,
                                                       ns.batch_client_batches, ns.batch_size))
            print(f"PlaceBatch from {ns.batch_clients} client processes at once, run {rep + 1}: "
                  f"{batch_conc_rates[-1]:,.0f} durable placements/s", flush=True)
            t_wait = time.perf_counter()
            while time.perf_counter() - t_wait < 60 and (
                    placed_pending(cp, ("PLACED", "RELEASING")) > 0
                    or ray.get(cp.ledger.stats.remote()).get("lag_rows", 0) > 0):
                time.sleep(0.1)
        def settle() -> float:
            """Wait (at most --settle-max-s) until every allocation placed so far is prepared and RUNNING,
            so that a phase does not pay for the previous phase's downstream work (hand-offs,
            Prepares, PLACED -> RUNNING): each phase measures its own. Returns the wait."""
            t = time.perf_counter()
            while time.perf_counter() - t < ns.settle_max_s and placed_pending(cp) > 0:
                time.sleep(0.05)
            return round(time.perf_counter() - t, 2)

        for rep in range(ns.repeats):
            # --- PlaceBatch
            settle_s.append({"before_batch": settle()})
            placed = 0
            apps, before = pg_apps(cp), processes()
            t0 = time.perf_counter()
            for b in range(ns.batches):
                reqs = [Client.request(f"{run}-{rep}-b{b}-{i}", gpu_milli=rng.randint(1, 2))
                        for i in range(ns.batch_size)]
                resp = clients[0].place_batch(reqs)
                placed += sum(1 for r in resp.results if r.HasField("allocation"))
            took = time.perf_counter() - t0
            batch_rates.append(placed / took)
            # CPU per placement by process (/proc) over the phase: where the machine's cores went. Work the
            # phase set off downstream and still running at its end (hand-offs, prepares) is partly left out.
            batch_cpu.append(cpu_per_op(before, processes(), {**apps, **pg_apps(cp)}, max(placed, 1)))
            # --- unary, closed loop. Before this wait was added, the loop started at once and ran beside
            # the PlaceBatch phase's downstream work (10,000 hand-offs, Prepares and PLACED -> RUNNING),
            # whose CPU then counted as the unary placements'.
            settle_s[-1]["before_unary"] = settle()
            apps, before = pg_apps(cp), processes()
            unary_rates.append(closed_loop(clients, f"{run}-{rep}-u", ns.unary, rng))
            unary_cpu.append(cpu_per_op(before, processes(), {**apps, **pg_apps(cp)}, ns.unary))
            bare_rates.append(bare.rate(ns.unary))
            # --- unary, paced: latency at a steady offered rate. First let the previous phases'
            # downstream work finish (every allocation placed so far prepared and RUNNING), so the
            # paced phase does not measure the tail of the unary burst, and start the client's
            # threads before the clock does (thread start-up is the client's, not the server's).
            settle_s[-1]["before_paced"] = settle()
            interval = 1.0 / ns.rate
            n = int(ns.rate * ns.paced_seconds)
            ray.get(cp.placement.place_latency.remote())  # clears the server's record
            ray.get(cp.placement.commit_log.remote())  # and its record of group commits
            gc_before = ray.get(cp.placement.stats.remote())["gc"]
            threads_before = ray.get(cp.placement.thread_cpu.remote())
            # The client's own collections stay out of the measured latencies: a full collection of
            # this process (the Ray driver's objects and every earlier phase's) stopped its sender and
            # receiver threads for 64-68 ms in a paced phase here, counted as the server's latency.
            # What this process holds now is set aside (freeze), and nothing is collected while the
            # phase runs; it is collected afterwards.
            gc.collect()
            gc.freeze()
            gc.disable()
            client_gc_before = client_gc.stats["collection_s"]
            wall0 = time.time()
            paced_started.append(wall0)
            try:
                lat = paced_with_threads(clients, run, rep, n, interval, ns.threads * 4, rng)
            finally:
                wall1 = time.time()
                client_gc_after = client_gc.stats["collection_s"]
                gc.enable()
                gc.unfreeze()
            # Whole-process pauses during the phase, on both sides (runtime.PauseProbe): where a burst
            # of slow requests that the server's own timing does not show came from.
            after = ray.get(cp.placement.stats.remote())
            threads_after = ray.get(cp.placement.thread_cpu.remote())
            # The placement actor's CPU per paced placement, thread by thread: what its one interpreter
            # lock and the two cores were busy with while the paced requests waited.
            by_thread = {k: round((v - threads_before.get(k, 0.0)) / n * 1000, 3) for k, v in threads_after.items()}
            by_thread = dict(sorted(((k, v) for k, v in by_thread.items() if v > 0), key=lambda x: -x[1]))
            commits = [c for c in ray.get(cp.placement.commit_log.remote()) if wall0 <= c[0] <= wall1 + 1]
            secs = [c[1] for c in commits]
            pauses.append({
                # The placement actor's group commits during the phase: whether slow answers waited for
                # the database (a commit's wall time includes any wait for a core).
                "placement_commits": {
                    "count": len(commits), "rows": sum(c[2] for c in commits),
                    "p50_ms": round(percentile(secs, 50) * 1000, 2) if secs else None,
                    "p99_ms": round(percentile(secs, 99) * 1000, 2) if secs else None,
                    "max_ms": round(max(secs) * 1000, 2) if secs else None,
                    "slow": [(round(t - wall0, 3), round(x * 1000, 1), n) for t, x, n in commits if x >= 0.01]},
                "placement_actor_thread_cpu_ms_per_placement": by_thread,
                "placement_actor": [(round(t - wall0, 3), round(s * 1000, 1)) for t, s in after["pauses"]["recent"]
                                    if wall0 <= t <= wall1],
                "client": [(round(t - wall0, 3), round(s * 1000, 1)) for t, s in client_probe.recent
                           if wall0 <= t <= wall1],
                "placement_gc_s": [round(b - a, 4) for a, b in zip(gc_before["collection_s"],
                                                                   after["gc"]["collection_s"])],
                "placement_gc_longest_s": after["gc"]["longest_collection_s"],
                "client_gc_s": [round(b - a, 4) for a, b in zip(client_gc_before, client_gc_after)],
                "client_gc_longest_s": client_gc.stats["longest_collection_s"]})
            # The server's share: each Place from its handler's start to its answer.
            srv = ray.get(cp.placement.place_latency.remote())
            srv_p50s.append(percentile(srv, 50) * 1000)
            srv_p99s.append(percentile(srv, 99) * 1000)
            timeline.append([round(x * 1000, 2) for x in lat])
            p50s.append(percentile(lat, 50) * 1000)
            p99s.append(percentile(lat, 99) * 1000)
            if ns.threads_high:
                high_rates.append(closed_loop(clients_high, f"{run}-{rep}-h", ns.unary, rng))
            print(f"run {rep + 1}: PlaceBatch {batch_rates[-1]:,.0f} durable placements/s | Place unary "
                  f"{unary_rates[-1]:,.0f}/s ({ns.threads} threads, {unary_rates[-1] / bare_rates[-1]:.0%} of a bare "
                  f"server's {bare_rates[-1]:,.0f}/s"
                  f"{f', {high_rates[-1]:,.0f}/s from {ns.threads_high}' if high_rates else ''}) | at {ns.rate:.0f}/s: p50 {p50s[-1]:.1f} ms, "
                  f"p99 {p99s[-1]:.1f} ms (in the server: p50 {srv_p50s[-1]:.1f}, p99 {srv_p99s[-1]:.1f} ms)", flush=True)
            pa, cl = pauses[-1]["placement_actor"], pauses[-1]["client"]
            print(f"       pauses >= 10 ms while paced: placement actor {len(pa)} (longest "
                  f"{max((x[1] for x in pa), default=0):.0f} ms), client {len(cl)} (longest "
                  f"{max((x[1] for x in cl), default=0):.0f} ms); placement actor's collections "
                  f"{sum(pauses[-1]['placement_gc_s']) * 1000:.0f} ms, the client's "
                  f"{sum(pauses[-1]['client_gc_s']) * 1000:.0f} ms (by generation {pauses[-1]['client_gc_s']})", flush=True)
            b_cpu, u_cpu = batch_cpu[-1], unary_cpu[-1]
            print(f"       CPU per placement, all processes (placement actor): PlaceBatch {b_cpu['all']:.3f} ms "
                  f"({b_cpu.get('placement actor', 0):.3f}), unary {u_cpu['all']:.3f} ms "
                  f"({u_cpu.get('placement actor', 0):.3f})", flush=True)
            print("       placement actor's CPU per paced placement by thread (ms): " + ", ".join(
                f"{k} {v:.3f}" for k, v in list(pauses[-1]["placement_actor_thread_cpu_ms_per_placement"].items())[:6]),
                flush=True)
            pc = pauses[-1]["placement_commits"]
            print(f"       group commits while paced: {pc['count']} ({pc['rows']} rows), p50 {pc['p50_ms']} ms, "
                  f"p99 {pc['p99_ms']} ms, longest {pc['max_ms']} ms, {len(pc['slow'])} of 10 ms or more", flush=True)
        stats = ray.get(cp.placement.stats.remote())
        res = {"place_batch_per_s": median(batch_rates), "place_unary_per_s": median(unary_rates),
               "place_batch_per_s_clients": median(batch_conc_rates) if batch_conc_rates else None,
               "batch_clients": ns.batch_clients,
               "place_unary_per_s_threads_high": median(high_rates) if high_rates else None,
               "bare_unary_per_s": median(bare_rates),
               "place_unary_to_bare_ratio": median([u / b for u, b in zip(unary_rates, bare_rates)]),
               "threads_high": ns.threads_high,
               "place_unary_p99_ms_at_500": median(p99s), "place_unary_p50_ms_at_500": median(p50s),
               "place_unary_server_p99_ms_at_500": median(srv_p99s),
               "place_batch_cpu_ms_per_placement": median([c["all"] for c in batch_cpu]),
               "place_unary_cpu_ms_per_placement": median([c["all"] for c in unary_cpu]),
               "cpu_ms_per_placement_by_process": {"batch": batch_cpu, "unary": unary_cpu},
               "runs": {"batch": batch_rates, "batch_clients": batch_conc_rates, "unary": unary_rates, "bare_unary": bare_rates, "unary_threads_high": high_rates,
                        "p99_ms": p99s, "p50_ms": p50s, "server_p99_ms": srv_p99s, "server_p50_ms": srv_p50s},
               "placement_actor_stats": stats, "rate": ns.rate, "threads": ns.threads,
               "nodes": ns.nodes, "gpus_per_node": ns.gpus_per_node, "dispatch_linger_s": cfg.dispatch_linger_s,
               "settle_s": settle_s, "paced_latency_ms_in_send_order": timeline,
               "paced_started_at": paced_started,
               "paced_pauses": pauses}
        high = (f", {res['place_unary_per_s_threads_high']:,.0f}/s from {ns.threads_high}" if high_rates else "")
        conc = (f", {res['place_batch_per_s_clients']:,.0f}/s from {ns.batch_clients} clients" if batch_conc_rates
                else "")
        print(f"\nmedian of {ns.repeats}: PlaceBatch {res['place_batch_per_s']:,.0f}/s (target ≥ 20,000){conc} | "
              f"Place unary {res['place_unary_per_s']:,.0f}/s from {ns.threads} threads (target ≥ 1,500; "
              f"{res['place_unary_to_bare_ratio']:.0%} of a bare gRPC server's {res['bare_unary_per_s']:,.0f}/s){high}"
              f" | p99 at {ns.rate:.0f}/s "
              f"{res['place_unary_p99_ms_at_500']:.1f} ms (target ≤ 10; in the server "
              f"{res['place_unary_server_p99_ms_at_500']:.1f} ms)")
        write_json(ns.json, res)
        return 0
    finally:
        if bare is not None:
            bare.close()
        cp.stop()


if __name__ == "__main__":
    raise SystemExit(main())
