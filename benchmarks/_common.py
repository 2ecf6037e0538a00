"""Helpers shared by the benchmark scripts: machine description, medians, JSON output."""
from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def machine() -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = 0.0
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_gib, 1),
            "python": platform.python_version(), "platform": platform.platform()}


def median(xs):
    return statistics.median(xs) if xs else 0.0


def percentile(xs, p: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def add_batch_args(ap) -> None:
    """The fleet and the PlaceBatch batches, as grpc_placement.py and placement_core.py both take them."""
    ap.add_argument("--nodes", type=int, default=12)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=2000)
    ap.add_argument("--batches", type=int, default=5)


def write_json(path: str | None, payload: dict) -> None:
    payload = dict(payload, machine=machine(), generated_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    text = json.dumps(payload, indent=2, sort_keys=True)
    if path:
        p = pathlib.Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text + "\n")
        print(f"wrote {p}")


def wait_quiet(timeout_s: float = 30.0) -> float:
    """Wait until the processes of an earlier phase are gone (Ray workers and raylets, simulated node
    daemons), so that one side's start-up or tear-down is not measured against the other; returns
    the seconds waited. Reads /proc, so it only waits on Linux."""
    def leftovers() -> int:
        n = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith("ray::") or "node_daemon.main" in cmd or "/raylet" in cmd or "gcs_server" in cmd:
                n += 1
        return n

    t0 = time.perf_counter()
    while os.path.isdir("/proc") and leftovers() and time.perf_counter() - t0 < timeout_s:
        time.sleep(0.2)
    return time.perf_counter() - t0


def start_control_plane(name: str, nodes: int, gpus_per_node: int, config=None, wait_nodes_s: float = 120.0):
    """A running control plane on a scratch database (deleted when it stops) with ``nodes`` simulated
    nodes of ``gpus_per_node`` H100s, and a placement token of the tenant "bench": (control plane,
    token). The caller stops it."""
    import uuid

    from actors.bootstrap import ControlPlane, SimNodes
    from gpuaas.client import Client
    from gpuaas.config import ControlPlaneConfig
    from ledger import db as dbmod

    data = dbmod.gpuaas_home() / f"bench-{name}-{uuid.uuid4().hex[:6]}"
    cp = ControlPlane(config=config or ControlPlaneConfig(listen="127.0.0.1:0"), data_dir=data, scratch_data=True,
                      sim=SimNodes(nodes, gpus_per_node, "H100"))
    cp.start(wait_nodes_s=wait_nodes_s)
    try:
        admin = Client(cp.address, cp.admin_token)
        admin.create_tenant("bench")
        return cp, admin.create_token("bench")
    except BaseException:
        cp.stop()
        raise


def placed_pending(cp, states: tuple[str, ...] = ("PLACED",)) -> int:
    """Allocations the control plane has placed but not yet prepared (its downstream backlog); with
    ``states`` ("PLACED", "RELEASING"), also those whose cleanup has yet to run."""
    import psycopg

    with psycopg.connect(cp.urls.app, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM control.allocations WHERE state = ANY(%s)",
                            (list(states),)).fetchone()[0]


# ---------------------------------------------------------------- CPU by component (from /proc)


def processes() -> dict[int, tuple[str, int]]:
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


def component(cmd: str, pid: int, pg_apps: dict[int, str]) -> str:
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
    if "/raylet" in cmd:
        return "raylets"
    if "gcs_server" in cmd:
        return "ray gcs"
    return ""


def pg_apps(cp) -> dict[int, str]:
    """Postgres backend pid → the connecting component's application_name."""
    import psycopg

    with psycopg.connect(cp.urls.owner, autocommit=True) as conn:
        return {pid: app or "" for pid, app in conn.execute("SELECT pid, application_name FROM pg_stat_activity")}


def cpu_per_op(before, after, pg_apps, n: int) -> dict[str, float]:
    """ms of CPU per operation, by component, between two /proc readings. A process that started in
    between counts in full (a connection opened on first use: the placement actor's writer, whose
    Postgres backend was left out of the first run's figures before). ``pg_apps`` should be read
    after the run, so that such a backend is named."""
    tick = os.sysconf("SC_CLK_TCK")
    by: dict[str, float] = {}
    for pid, (cmd, t) in after.items():
        used = (t - before[pid][1] if pid in before else t) / tick
        name = component(cmd, pid, pg_apps)
        if used > 0 and name:
            by[name] = by.get(name, 0.0) + used
    out = {k: round(v / n * 1000, 3) for k, v in sorted(by.items(), key=lambda x: -x[1])}
    out["all"] = round(sum(by.values()) / n * 1000, 3)
    return out
