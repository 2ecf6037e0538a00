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
import os
import threading
import time
import uuid

import _common  # noqa: F401  (puts the repo on sys.path)
from _common import median, placed_pending, start_control_plane, write_json


def _processes() -> dict[int, tuple[str, int]]:
    """pid → (command line, CPU ticks used so far)."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            st = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            out[int(pid)] = (cmd, int(st[11]) + int(st[12]))
        except OSError:
            continue
    return out


def _component(cmd: str, pid: int, pg_apps: dict[int, str]) -> str:
    if pid == os.getpid():
        return "client"
    if pid in pg_apps:
        return "postgres:" + (pg_apps[pid].removeprefix("gpuaas-").split("-shard")[0] or "other")
    if cmd.startswith("ray::"):
        name = cmd.split()[0].removeprefix("ray::").split(".")[0]
        return {"PlacementActor": "placement actor", "AllocationShardActor": "allocation shards",
                "NodeShardActor": "node shards", "LedgerActor": "ledger"}.get(name, "ray")
    if "node_daemon" in cmd:
        return "daemons"
    if "postgres" in cmd:
        return "postgres:other"
    if "raylet" in cmd or "gcs_server" in cmd:
        return "ray"
    return ""


def cpu_per_op(before, after, pg_apps, n: int) -> dict[str, float]:
    """ms of CPU per operation, by component, between two /proc readings."""
    tick = os.sysconf("SC_CLK_TCK")
    by: dict[str, float] = {}
    for pid, (cmd, t) in after.items():
        if pid in before:
            used = (t - before[pid][1]) / tick
            name = _component(cmd, pid, pg_apps)
            if used > 0 and name:
                by[name] = by.get(name, 0.0) + used
    out = {k: round(v / n * 1000, 3) for k, v in sorted(by.items(), key=lambda x: -x[1])}
    out["all"] = round(sum(by.values()) / n * 1000, 3)
    return out


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

    import psycopg
    import ray

    from gpuaas.client import Client

    cp, token = start_control_plane("release", ns.nodes, ns.gpus_per_node)
    try:
        clients = [Client(cp.address, token) for _ in range(ns.threads)]
        run = uuid.uuid4().hex[:6]

        def pg_apps() -> dict[int, str]:
            with psycopg.connect(cp.urls.owner, autocommit=True) as conn:
                return {pid: app or "" for pid, app in conn.execute(
                    "SELECT pid, application_name FROM pg_stat_activity")}

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

            apps, before = pg_apps(), _processes()
            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(threads) as ex:
                list(ex.map(worker, clients[:threads]))
            took = time.perf_counter() - t0
            return len(ids) / took, cpu_per_op(before, _processes(), apps, len(ids))

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
