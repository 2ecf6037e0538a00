"""Releases through the running control plane: rate, and CPU per release by component.

Starts a real control plane (embedded Postgres, local Ray, the actors, simulated node
daemons). Per repeat it places ``--allocations`` small fractional allocations with one
PlaceBatch, waits until every one is RUNNING, then releases them with unary ``Release``
calls from ``--threads`` client threads (each answered once the allocation is RELEASING;
the node's cleanup, RELEASED and the capacity's return follow). Reported:

- releases per second, from ``--threads`` threads and from one;
- CPU per release summed over every process and by component (read from /proc, so on Linux
  only): the placement actor, the allocation shards, the daemons, Postgres (by each
  connection's application_name), the client;
- how many releases shared one actor call to their shard (``release_calls``).

    python benchmarks/release_path.py --json results/release_path.json
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import threading
import time
import uuid

import _common  # noqa: F401  (puts the repo on sys.path)
from _common import cpu_per_op, median, pg_apps, placed_pending, processes, start_control_plane, write_json


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=12)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--allocations", type=int, default=1000, help="allocations released per repeat")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--serial", type=int, default=300, help="allocations released from one thread per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    ns = ap.parse_args()

    import ray

    from gpuaas.client import Client

    cp, token = start_control_plane("release", ns.nodes, ns.gpus_per_node)
    try:
        clients = [Client(cp.address, token) for _ in range(ns.threads)]
        run = uuid.uuid4().hex[:6]

        def placed_running(n: int, tag: str) -> list[str]:
            resp = clients[0].place_batch([Client.request(f"{run}-{tag}-{i}", gpu_milli=1) for i in range(n)])
            ids = [r.allocation.allocation_id for r in resp.results if r.HasField("allocation")]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and placed_pending(cp) > 0:
                time.sleep(0.1)
            time.sleep(1.0)  # let the hand-offs' own work settle before the clock starts
            return ids

        def release_all(ids: list[str], threads: int) -> tuple[float, dict]:
            it, lock = iter(ids), threading.Lock()

            def worker(c: Client) -> None:
                while True:
                    with lock:
                        aid = next(it, None)
                    if aid is None:
                        return
                    c.release(aid)

            apps, before = pg_apps(cp), processes()
            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(threads) as ex:
                list(ex.map(worker, clients[:threads]))
            took = time.perf_counter() - t0
            return len(ids) / took, cpu_per_op(before, processes(), {**apps, **pg_apps(cp)}, len(ids))

        rates, serial_rates, cpus, serial_cpus = [], [], [], []
        calls0 = ray.get(cp.placement.stats.remote()).get("release_calls", [])
        for rep in range(ns.repeats):
            rate, cpu = release_all(placed_running(ns.allocations, f"c{rep}"), ns.threads)
            rates.append(rate)
            cpus.append(cpu)
            srate, scpu = release_all(placed_running(ns.serial, f"s{rep}"), 1)
            serial_rates.append(srate)
            serial_cpus.append(scpu)
            print(f"run {rep + 1}: Release from {ns.threads} threads {rate:,.0f}/s, {cpu['all']:.2f} ms CPU each "
                  f"| from 1 thread {srate:,.0f}/s, {scpu['all']:.2f} ms CPU each", flush=True)
        calls1 = ray.get(cp.placement.stats.remote()).get("release_calls", [])
        calls = sum(c["calls"] for c in calls1) - sum(c["calls"] for c in calls0)
        items = sum(c["items"] for c in calls1) - sum(c["items"] for c in calls0)

        def median_by(runs: list[dict]) -> dict:
            return {k: round(median([r.get(k, 0.0) for r in runs]), 3) for k in runs[0]}

        res = {"release_per_s": median(rates), "release_serial_per_s": median(serial_rates),
               "cpu_ms_per_release": median_by(cpus), "cpu_ms_per_release_serial": median_by(serial_cpus),
               "releases_per_shard_call": round(items / calls, 2) if calls else None,
               "runs": {"release_per_s": rates, "release_serial_per_s": serial_rates,
                        "cpu_ms_per_release": cpus, "cpu_ms_per_release_serial": serial_cpus},
               "threads": ns.threads, "allocations": ns.allocations, "serial": ns.serial,
               "nodes": ns.nodes, "gpus_per_node": ns.gpus_per_node}
        print(f"\nmedian of {ns.repeats}: Release {res['release_per_s']:,.0f}/s from {ns.threads} threads "
              f"({res['cpu_ms_per_release']['all']:.2f} ms CPU each), {res['release_serial_per_s']:,.0f}/s from one "
              f"({res['cpu_ms_per_release_serial']['all']:.2f} ms); {res['releases_per_shard_call']} releases per "
              f"shard call")
        print("CPU per release by component (ms, from", ns.threads, "threads):", res["cpu_ms_per_release"])
        write_json(ns.json, res)
        return 0
    finally:
        cp.stop()


if __name__ == "__main__":
    raise SystemExit(main())
