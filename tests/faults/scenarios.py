"""The fault scenarios, each run with the workload on; used by the CI tests
(tests/integration/test_crash_*.py, short) and benchmarks/recovery.py (full).

Each scenario takes the running ControlPlane, an admin Client, a seed and a
scale (1 = CI), and returns a Result; ``violations`` must be empty.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import subprocess
import time
import uuid

import grpc
import psycopg
import ray

from gpuaas.client import Client
from gpuaas.client import health_status as client_health_status
from tests.faults.harness import Workload, audit, double_booked, flush_ledger, new_tenant


@dataclasses.dataclass
class Result:
    scenario: str
    seed: int
    operations: int = 0
    faults: int = 0
    violations: list = dataclasses.field(default_factory=list)
    notes: dict = dataclasses.field(default_factory=dict)

    def row(self) -> dict:
        return {"scenario": self.scenario, "seed": self.seed, "operations": self.operations,
                "faults_injected": self.faults, "invariant_violations": len(self.violations), **self.notes}


# ---------------------------------------------------------------- helpers

def inject(cp, node: str, command: dict, wait_s: float = 10.0) -> None:
    folder = cp.daemon_dir / node / "faults"
    name = uuid.uuid4().hex[:8]
    (folder / f".{name}.tmp").write_text(json.dumps(command))
    os.rename(folder / f".{name}.tmp", folder / f"{name}.json")
    deadline = time.monotonic() + wait_s
    while (folder / f"{name}.json").exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"daemon {node} did not apply {command}")
        time.sleep(0.05)
    if (folder / f"{name}.json.rejected").exists():
        raise AssertionError(f"daemon {node} rejected {command}")


def wait_for(pred, timeout_s: float, what: str) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


def q(cp, sql, *params):
    with psycopg.connect(cp.urls.owner, autocommit=True, connect_timeout=5) as conn:
        return conn.execute(sql, params).fetchall()


def node_state(cp, node):
    r = q(cp, "SELECT state FROM control.nodes WHERE node_id=%s", node)
    return r[0][0] if r else None


def start_pool_node(cp, gpus: int = 4) -> str:
    name = "crash-" + uuid.uuid4().hex[:6]
    cp.start_daemon(name, gpus, "H100", ["--cpu-milli", "64000", "--memory-mib", "262144", "--labels", f"pool={name}"])
    cp.wait_nodes([name], 60)
    return name


def stop_pool_node(cp, name: str) -> None:
    """Cordon first (no new placements), then stop the daemon."""
    try:
        from gpuaas.client import Client as _C
        c = _C(cp.address, cp.admin_token, timeout_s=10)
        c.node_action("cordon", name, "fault scenario over")
        c.close()
    except Exception:  # noqa: BLE001 - already gone / not READY
        pass
    proc = cp.daemon_by_name.get(name)
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def serving(cp, token: str) -> bool:
    c = Client(cp.address, token, timeout_s=3)
    try:
        list(c.list(page_size=1))
        return True
    except grpc.RpcError:
        return False
    finally:
        c.close()


def health_status(cp) -> str:
    """The control plane's gRPC health status (what a load balancer's check sees)."""
    return client_health_status(cp.address, timeout_s=3)


def _finish(cp, admin, res: Result, load: Workload, tenant: str, settle_s: float = 60.0) -> Result:
    load.stop()
    stragglers = load.settle(settle_s)
    res.violations += [f"[seed {res.seed}] not settled: {s}" for s in stragglers]
    if load.stats.gave_up:
        res.violations.append(f"[seed {res.seed}] {load.stats.gave_up} request(s) still unanswered after "
                              f"{load.retry_window_s:.0f} s of retries with the same request id")
    flush_ledger(cp.ledger)
    res.violations += audit(cp.urls.owner, tenant, load, seed=res.seed)
    res.operations = load.stats.attempts + load.stats.released
    res.notes.update(acked=load.stats.acked, retries=load.stats.retries, rejected=load.stats.rejected,
                     other_errors=load.stats.other_errors,
                     slowest_call_s=round(load.stats.slowest_call_s, 2))
    return res


def _load(cp, token, tenant, seed, scale, **kw) -> Workload:
    kw.setdefault("threads", 3)
    kw.setdefault("duration_s", 60.0 * scale)
    kw.setdefault("node_selector", {"zone": "sim-a"})  # the shared simulated nodes, never a scenario's pool node
    return Workload(cp.address, token, tenant, seed=seed, **kw).start()


# ---------------------------------------------------------------- scenarios

def placement_kill(cp, admin, seed: int, scale: int = 1) -> Result:
    """kill -9 the placement actor mid-batch (Ray restarts it); same request id → same allocation."""
    res = Result("kill -9 placement actor", seed)
    rng = random.Random(seed)
    tenant, token = new_tenant(admin, cp.address)
    load = _load(cp, token, tenant, seed, scale, threads=4)
    c = Client(cp.address, token, timeout_s=10)
    address = cp.address
    try:
        for _ in range(scale):
            time.sleep(rng.uniform(0.5, 1.5))
            probe_rid = f"probe-{uuid.uuid4().hex[:8]}"
            first = load._retrying("place", c.place, probe_rid, gpu_milli=250)
            load.sent.add(probe_rid)
            load.acked[probe_rid] = first.allocation_id
            ray.kill(ray.get_actor("placement", namespace="gpuaas"), no_restart=False)
            res.faults += 1
            t0 = time.monotonic()
            wait_for(lambda: serving(cp, token), 90, "the placement actor to serve again")
            res.notes["restart_to_serving_s"] = round(time.monotonic() - t0, 2)
            again = load._retrying("place", c.place, probe_rid, gpu_milli=250)
            if again.allocation_id != first.allocation_id:
                res.violations.append(f"[seed {seed}] retry of {probe_rid} gave {again.allocation_id}, "
                                      f"first {first.allocation_id}")
            load._retrying("release", c.release, first.allocation_id)
            addr = ray.get(ray.get_actor("placement", namespace="gpuaas").address.remote(), timeout=30)
            if addr != address:
                res.violations.append(f"[seed {seed}] placement came back on {addr}, not {address}")
            time.sleep(1.0)
    finally:
        c.close()
    return _finish(cp, admin, res, load, tenant)


def shard_kill(cp, admin, seed: int, scale: int = 1) -> Result:
    """Kill an allocation shard and a node shard under load; both resume from Postgres."""
    res = Result("kill allocation + node shard", seed)
    rng = random.Random(seed)
    tenant, token = new_tenant(admin, cp.address)
    load = _load(cp, token, tenant, seed, scale)
    for _ in range(scale):
        time.sleep(rng.uniform(0.5, 1.5))
        a = rng.randrange(cp.cfg.allocation_shards)
        n = rng.randrange(cp.cfg.node_shards)
        ray.kill(ray.get_actor(f"allocations-{a}", namespace="gpuaas"), no_restart=False)
        ray.kill(ray.get_actor(f"nodes-{n}", namespace="gpuaas"), no_restart=False)
        res.faults += 2
        time.sleep(rng.uniform(2.0, 3.0))
    return _finish(cp, admin, res, load, tenant)


def _embedded_server(cp):
    """The embedded Postgres's handle (pgserver), or None with an external database."""
    from ledger import db as dbmod

    return dbmod._EMBEDDED.get(str(cp.data_dir.resolve())) if cp.urls.embedded and cp.data_dir else None


def postgres_restart(cp, admin, seed: int, scale: int = 1, down_s: float = 2.0) -> Result:
    """Stop the embedded Postgres immediately under load; requests fail UNAVAILABLE fast; service resumes."""
    from pgserver._commands import pg_ctl

    res = Result("kill + restart Postgres", seed)
    rng = random.Random(seed)
    server = _embedded_server(cp)
    if server is None:
        res.notes["skipped"] = "external database"
        return res
    tenant, token = new_tenant(admin, cp.address)
    load = _load(cp, token, tenant, seed, scale)
    probe = Client(cp.address, token, timeout_s=15)
    try:
        for _ in range(scale):
            time.sleep(rng.uniform(0.5, 1.5))
            pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=server.pgdata, user=server.system_user)
            res.faults += 1
            t0 = time.monotonic()
            try:
                probe.place(f"down-{uuid.uuid4().hex[:6]}", gpu_milli=250)
                res.violations.append(f"[seed {seed}] a placement succeeded with the database down")
            except grpc.RpcError as err:
                took = time.monotonic() - t0
                res.notes["down_answer_s"] = round(took, 2)
                if err.code() != grpc.StatusCode.UNAVAILABLE or took > 10:
                    res.violations.append(f"[seed {seed}] with the database down: {err.code().name} after "
                                          f"{took:.1f}s (want UNAVAILABLE, fast)")
            # Readiness: the health check says NOT_SERVING while the database is down (no answer to its
            # checks for 2.5 s), so a load balancer stops sending requests that can only fail.
            try:
                res.notes["health_not_serving_after_s"] = round(
                    wait_for(lambda: health_status(cp) == "NOT_SERVING", 10, "health NOT_SERVING"), 2)
            except AssertionError as err:
                res.violations.append(f"[seed {seed}] {err} (health said {health_status(cp)})")
            time.sleep(max(0.0, down_s - (time.monotonic() - t0)))
            with server._lock:
                server.ensure_postgres_running()
            t1 = time.monotonic()
            wait_for(lambda: serving(cp, token), 60, "service after the database came back")
            res.notes["db_back_to_serving_s"] = round(time.monotonic() - t1, 2)
            try:
                wait_for(lambda: health_status(cp) == "SERVING", 10, "health SERVING again")
            except AssertionError as err:
                res.violations.append(f"[seed {seed}] {err} (health said {health_status(cp)})")
            time.sleep(1.5)
    finally:
        probe.close()
    return _finish(cp, admin, res, load, tenant)


def _superuser(cp) -> bool:
    """Whether the owner URL may ALTER SYSTEM (an external database's owner may not)."""
    with psycopg.connect(cp.urls.owner, autocommit=True, connect_timeout=5) as conn:
        return conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]


@contextlib.contextmanager
def _commits_wait_for_a_missing_standby(conn, *, reload_on_exit: bool = True):
    """While inside, every commit is written and flushed locally and then waits for a synchronous
    standby that does not exist (``synchronous_standby_names``); on the way out the setting is reset
    and the waiting commits finish normally. Real Postgres, nothing in between.

    ``reload_on_exit=False``: the reset is written to the configuration file but not reloaded, so the
    running server keeps its commits waiting and only a restarted one reads it (the caller stops the
    server next). On an exception the reset is reloaded all the same."""
    conn.execute("ALTER SYSTEM SET synchronous_standby_names = 'gpuaas_fault_no_such_standby'")
    conn.execute("SELECT pg_reload_conf()")
    try:
        yield
    except BaseException:
        conn.execute("ALTER SYSTEM RESET synchronous_standby_names")
        conn.execute("SELECT pg_reload_conf()")
        raise
    conn.execute("ALTER SYSTEM RESET synchronous_standby_names")
    if reload_on_exit:
        conn.execute("SELECT pg_reload_conf()")


def _commit_waiters(conn, hold_s: float) -> list[tuple[int, str]]:
    """(pid, application_name) of the control plane's backends whose commit waits for the standby,
    once at least one does (looking every ``hold_s``, for at most 5 s)."""
    deadline, waiting = time.monotonic() + 5.0, []
    while not waiting and time.monotonic() < deadline:
        time.sleep(hold_s)
        waiting = conn.execute(
            "SELECT pid, application_name FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
            " AND datname = current_database() AND application_name LIKE 'gpuaas-%%'").fetchall()
    return waiting


def _lose_commit_answers(cp, hold_s: float) -> list[str]:
    """Make Postgres commit and then drop the connection before the answer, for whatever the control
    plane commits in the next ``hold_s``; returns the components whose answers were lost.

    A backend terminated while its commit waits for the standby keeps its commit and closes the
    connection without an answer ("The transaction has already committed locally")."""
    with psycopg.connect(cp.urls.owner, autocommit=True, connect_timeout=5) as conn:
        with _commits_wait_for_a_missing_standby(conn):
            victims = _commit_waiters(conn, hold_s)
            for pid, _ in victims:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    return [app for _, app in victims]


def _capacity_still_held(cp, tenant: str, seed: int, timeout_s: float = 30.0) -> list[str]:
    """Once settled, the tenant holds nothing in Postgres; the capacity view must free all of it too
    (a commit left in doubt for good would keep its GPUs reserved)."""
    ids = [str(a) for (a,) in q(cp, "SELECT allocation_id FROM control.allocations WHERE tenant_id = %s", tenant)]
    deadline = time.monotonic() + timeout_s
    while (held := ray.get(cp.placement.held.remote(ids), timeout=30)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [f"[seed {seed}] capacity still held for settled allocation {a}" for a in held[:20]]


def commit_answer_lost(cp, admin, seed: int, scale: int = 1) -> Result:
    """Commits take effect but their answers are lost, in every component at once, under load: each
    writer settles by what Postgres holds. Nothing acknowledged is lost, nothing is booked twice or
    billed twice, and the placement actor's capacity view comes back to what Postgres holds."""
    res = Result("commit answers lost", seed)
    rng = random.Random(seed)
    if not _superuser(cp):
        res.notes["skipped"] = "needs a superuser owner URL (ALTER SYSTEM)"
        return res
    tenant, token = new_tenant(admin, cp.address)
    # More held than the shared nodes fit, a third of it asking to wait: the queue's placing commits
    # and cancels lose answers too.
    load = _load(cp, token, tenant, seed, scale, threads=4, hold_max=6, wait_p=0.3)
    cut: dict[str, int] = {}
    try:
        for _ in range(3 * scale):
            time.sleep(rng.uniform(0.3, 1.0))
            for app in _lose_commit_answers(cp, hold_s=rng.uniform(0.02, 0.2)):
                cut[app] = cut.get(app, 0) + 1
                res.faults += 1
            # A commit taken for "nothing written" frees GPUs that its rows still book: the next
            # placements book them again, until a release undoes it. Look while it would show.
            for _ in range(3):
                time.sleep(0.3)
                with psycopg.connect(cp.urls.owner, autocommit=True, connect_timeout=5) as conn:
                    res.violations += [f"[seed {seed}] while running: {x}" for x in double_booked(conn)]
        res.notes["answers_lost_by_component"] = dict(sorted(cut.items()))
        wait_for(lambda: serving(cp, token), 60, "service after the lost answers")
        time.sleep(1.0)
    except BaseException:
        load.stop()
        raise
    _finish(cp, admin, res, load, tenant)
    # Requests that waited in the queue (left QUEUED later than they entered it), by how they left it.
    res.notes["waited_then"] = dict(q(
        cp, "SELECT e2.to_state, count(*) FROM control.allocation_events e1 JOIN control.allocation_events e2"
            " ON e2.allocation_id = e1.allocation_id AND e2.from_state = 'QUEUED' AND e2.at > e1.at"
            " WHERE e1.tenant_id = %s AND e1.to_state = 'QUEUED' GROUP BY 1", tenant))
    res.violations += _capacity_still_held(cp, tenant, seed)
    return res


def commit_answer_lost_db_down(cp, admin, seed: int, scale: int = 1) -> Result:
    """Commits take effect, and Postgres goes down before their answers and before anyone can ask
    about them: the placement actor holds such commits in doubt (their GPUs reserved, their clients
    told to retry with the same request id) and settles them once Postgres is back; the audit holds."""
    from pgserver._commands import pg_ctl

    res = Result("commit answers lost, database down", seed)
    rng = random.Random(seed)
    server = _embedded_server(cp)
    if server is None or not _superuser(cp):
        res.notes["skipped"] = "needs the embedded database (stopped and started here)"
        return res
    tenant, token = new_tenant(admin, cp.address)
    load = _load(cp, token, tenant, seed, scale, threads=4)
    in_doubt_before = ray.get(cp.placement.stats.remote(), timeout=30).get("commits_in_doubt", 0)
    caught: dict[str, int] = {}
    try:
        for _ in range(scale):
            time.sleep(rng.uniform(0.5, 1.5))
            with psycopg.connect(cp.urls.owner, autocommit=True, connect_timeout=5) as conn:
                # The reset is not reloaded: the running server keeps its commits waiting; the
                # restarted one reads the file and waits for no standby.
                with _commits_wait_for_a_missing_standby(conn, reload_on_exit=False):
                    waiting = _commit_waiters(conn, rng.uniform(0.02, 0.1))
            # Down at once: every waiting commit is flushed (crash recovery keeps it), every connection
            # drops before its answer, and for a while nobody can ask what became of it.
            pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=server.pgdata, user=server.system_user)
            for _, app in waiting:
                caught[app] = caught.get(app, 0) + 1
            res.faults += len(waiting)
            time.sleep(rng.uniform(1.0, 2.0))
            with server._lock:
                server.ensure_postgres_running()
            wait_for(lambda: serving(cp, token), 60, "service after the database came back")
            time.sleep(1.0)
        res.notes["answers_lost_by_component"] = dict(sorted(caught.items()))
    except BaseException:
        load.stop()
        raise
    _finish(cp, admin, res, load, tenant)
    res.notes["placement_commits_held_in_doubt"] = (
        ray.get(cp.placement.stats.remote(), timeout=30).get("commits_in_doubt", 0) - in_doubt_before)
    res.violations += _capacity_still_held(cp, tenant, seed)
    return res


def commit_stall(cp, admin, seed: int, scale: int = 1) -> Result:
    """Every commit stalls for 2-6 s (a storage hiccup: Postgres waits for a standby that never
    answers), then completes: no node is taken for lost, nothing RUNNING fails, the health check stays
    SERVING, and the audit holds."""
    res = Result("commits stall", seed)
    rng = random.Random(seed)
    if not _superuser(cp):
        res.notes["skipped"] = "needs a superuser owner URL (ALTER SYSTEM)"
        return res
    t_start = q(cp, "SELECT now()")[0][0]
    tenant, token = new_tenant(admin, cp.address)
    load = _load(cp, token, tenant, seed, scale, threads=4)
    stalls = []
    try:
        for _ in range(scale):
            time.sleep(rng.uniform(0.5, 1.5))
            hold = rng.uniform(2.0, 6.0)
            with psycopg.connect(cp.urls.owner, autocommit=True, connect_timeout=5) as conn:
                with _commits_wait_for_a_missing_standby(conn):
                    # Slow commits are not an outage: the health check keeps saying SERVING.
                    end = time.monotonic() + hold
                    while time.monotonic() < end:
                        status = health_status(cp)
                        if status != "SERVING":
                            res.violations.append(f"[seed {seed}] health said {status} while commits only stalled")
                            break
                        time.sleep(0.25)
                    time.sleep(max(0.0, end - time.monotonic()))
                    waiting = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
                                           " AND application_name LIKE 'gpuaas-%%'").fetchone()[0]
            stalls.append((round(hold, 2), waiting))
            res.faults += 1
            time.sleep(1.0)
        res.notes["stalls_s_and_commits_waiting"] = stalls
    except BaseException:
        load.stop()
        raise
    _finish(cp, admin, res, load, tenant)
    # The shared simulated nodes (a scenario's pool node goes away with its scenario, as it should).
    lost = q(cp, "SELECT node_id, to_state FROM control.node_events WHERE at >= %s AND to_state IN"
                 " ('SUSPECT', 'OFFLINE') AND node_id LIKE 'sim-node-%%'", t_start)
    res.violations += [f"[seed {seed}] node {n} went {s} while only the database stalled" for n, s in lost]
    failed = q(cp, "SELECT allocation_id, reason FROM control.allocations WHERE tenant_id = %s AND state = 'FAILED'",
               tenant)
    res.violations += [f"[seed {seed}] allocation {a} FAILED ({r}) while only the database stalled"
                       for a, r in failed]
    return res


def daemon_sigkill(cp, admin, seed: int, scale: int = 1) -> Result:
    """SIGKILL a node daemon under load: OFFLINE, its allocations FAILED (billing stopped); it comes back."""
    res = Result("SIGKILL node daemon", seed)
    node = start_pool_node(cp)
    tenant, token = new_tenant(admin, cp.address)
    load = _load(cp, token, tenant, seed, scale, node_selector={"pool": node}, hold_max=4)
    try:
        for _ in range(scale):
            time.sleep(1.5)
            cp.daemon_by_name[node].kill()
            res.faults += 1
            t0 = time.monotonic()
            wait_for(lambda: node_state(cp, node) == "OFFLINE", cp.cfg.heartbeat_offline_s + 10, "OFFLINE")
            wait_for(lambda: not q(cp, "SELECT 1 FROM control.allocations WHERE state='RUNNING' AND"
                                       " assignments @> %s::jsonb", json.dumps([{"node_id": node}])),
                     10, "its allocations FAILED")
            res.notes["death_to_failed_s"] = round(time.monotonic() - t0, 2)
            time.sleep(1.0)
            cp.start_daemon(node, 4, "H100", ["--cpu-milli", "64000", "--memory-mib", "262144",
                                              "--labels", f"pool={node}"])
            cp.wait_nodes([node], 60)
            time.sleep(1.0)
        return _finish(cp, admin, res, load, tenant)
    finally:
        load.stop()
        stop_pool_node(cp, node)


def daemon_freeze(cp, admin, seed: int, scale: int = 1) -> Result:
    """Freeze a daemon's stream (process alive): SUSPECT, then back to READY; a longer freeze → OFFLINE."""
    res = Result("freeze node daemon", seed)
    node = start_pool_node(cp)
    tenant, token = new_tenant(admin, cp.address)
    load = _load(cp, token, tenant, seed, scale, node_selector={"pool": node})
    try:
        for _ in range(scale):
            time.sleep(1.0)
            seconds = cp.cfg.heartbeat_grace_s + 1.0
            inject(cp, node, {"fault": "freeze", "seconds": seconds})
            res.faults += 1
            wait_for(lambda: node_state(cp, node) == "SUSPECT", seconds + 5, "SUSPECT")
            wait_for(lambda: node_state(cp, node) == "READY", seconds + 10, "READY again after the freeze")
            time.sleep(1.0)
        return _finish(cp, admin, res, load, tenant)
    finally:
        load.stop()
        stop_pool_node(cp, node)


def cleanup_fails(cp, admin, seed: int, scale: int = 1) -> Result:
    """Cleanup fails N times: retries with backoff → RELEASED; past the limit → RELEASE_FAILED, quarantined,
    resolved by the operator."""
    from gpuaas.v1 import common_pb2 as pb

    res = Result("cleanup fails N times", seed)
    node = start_pool_node(cp)
    tenant, token = new_tenant(admin, cp.address)
    load = _load(cp, token, tenant, seed, scale, node_selector={"pool": node})
    c = Client(cp.address, token, timeout_s=10)
    try:
        for _ in range(scale):
            time.sleep(1.0)
            inject(cp, node, {"fault": "cleanup_fail", "times": cp.cfg.release_attempts_max - 1})
            res.faults += cp.cfg.release_attempts_max - 1
            time.sleep(2.0)
        load.stop()
        # Past the limit: one allocation goes RELEASE_FAILED, its GPU is quarantined, the operator resolves it.
        rid = f"rf-{uuid.uuid4().hex[:6]}"
        a = load._retrying("place", c.place, rid, gpu_count=1, node_selector={"pool": node})
        load.sent.add(rid)
        load.acked[rid] = a.allocation_id
        c.wait_state(a.allocation_id, {pb.ALLOCATION_STATE_RUNNING}, 30)
        inject(cp, node, {"fault": "cleanup_fail", "times": cp.cfg.release_attempts_max + 5})
        res.faults += cp.cfg.release_attempts_max
        c.release(a.allocation_id)
        c.wait_state(a.allocation_id, {pb.ALLOCATION_STATE_RELEASE_FAILED}, 30)
        gpu = a.assignments[0].gpu_indices[0]
        wait_for(lambda: q(cp, "SELECT state FROM control.gpus WHERE node_id=%s AND gpu_index=%s", node, gpu)
                 == [("QUARANTINED",)], 10, "the GPU quarantined")
        inject(cp, node, {"fault": "cleanup_fail", "times": 0})
        admin.resolve(a.allocation_id, "checked by hand")
        c.wait_state(a.allocation_id, {pb.ALLOCATION_STATE_RELEASED}, 10)
        wait_for(lambda: q(cp, "SELECT state FROM control.gpus WHERE node_id=%s AND gpu_index=%s", node, gpu)
                 == [("READY",)], 10, "the GPU back in service")
        return _finish(cp, admin, res, load, tenant)
    finally:
        c.close()
        load.stop()
        stop_pool_node(cp, node)


def lease_bulk(cp, admin, seed: int, scale: int = 1) -> Result:
    """Every allocation has lease_s=1: they expire in bulk; billing stops at the lease's end exactly."""
    res = Result("expire leases in bulk", seed)
    tenant, token = new_tenant(admin, cp.address)
    load = _load(cp, token, tenant, seed, scale, lease_s=1, hold_max=10_000, release_p=0.0,
                 duration_s=3.0 * scale)
    for t in load._workers:
        t.join(load.duration_s + 120)
    wait_for(lambda: not q(cp, "SELECT 1 FROM control.allocations WHERE tenant_id=%s AND state IN"
                               " ('PLACED','RUNNING','RELEASING')", tenant), 30, "leases to expire")
    expired = q(cp, "SELECT count(*), count(*) FILTER (WHERE a.stopped_at <> a.lease_expires_at)"
                    " FROM control.allocations a WHERE a.tenant_id=%s AND EXISTS (SELECT 1 FROM"
                    " control.allocation_events e WHERE e.allocation_id = a.allocation_id"
                    " AND e.event = 'lease_expired')", tenant)[0]
    res.faults = expired[0]
    if expired[1]:
        res.violations.append(f"[seed {seed}] {expired[1]} expired allocations stopped billing off the lease end")
    return _finish(cp, admin, res, load, tenant)


def preemption_load(cp, admin, seed: int, scale: int = 1) -> Result:
    """Preemptible load (priority -1) fills a pool node; priority-10 wait=true requests for half or all of
    the node preempt it while the load keeps placing. Victims stop billing at the preemption; the capacity
    held for a preemptor is never given to the load; every preemptor runs."""
    res = Result("preemption under load", seed)
    rng = random.Random(seed)
    node = start_pool_node(cp)
    pool = {"pool": node}
    tenant, token = new_tenant(admin, cp.address)
    # release_placed=False: the load releases only what has finished preparing, so a preemptor's
    # Prepare meets no replica whose release overtook its own prepare on the node.
    load = _load(cp, token, tenant, seed, scale, node_selector=pool, priority=-1, hold_max=4, release_p=0.2,
                 duration_s=25.0 * scale, release_placed=False)
    c = Client(cp.address, token, timeout_s=10)
    preemptors, waits = [], []
    try:
        for i in range(3 * scale):
            time.sleep(rng.uniform(1.0, 2.0))
            prid = f"pre-{uuid.uuid4().hex[:8]}"
            load.sent.add(prid)
            gpus = 4 if i == 0 else rng.choice([2, 4])   # the whole node first: the load is on it, so it preempts
            a = load._retrying("place", c.place, prid, gpu_count=gpus, priority=10, wait=True,
                               queue_timeout_s=60, node_selector=pool)
            load.acked[prid] = a.allocation_id
            preemptors.append(a.allocation_id)
            t0 = time.monotonic()
            # From Postgres: it ran (running_since set), or it ended without running.
            ran = lambda: q(cp, "SELECT state, running_since IS NOT NULL, reason FROM control.allocations"  # noqa: E731
                                " WHERE allocation_id = %s", a.allocation_id)[0]
            wait_for(lambda: ran()[1] or ran()[0] in ("FAILED", "RELEASED", "CANCELLED"), 60,
                     f"preemptor {a.allocation_id} to run")
            waits.append(time.monotonic() - t0)
            state, running, reason = ran()
            if not running:
                res.violations.append(f"[seed {seed}] preemptor {a.allocation_id} ended {state} without running:"
                                      f" {reason}")
            time.sleep(rng.uniform(0.3, 1.0))
            load._retrying("release", c.release, a.allocation_id)
        ev = q(cp, "SELECT e.allocation_id, e.from_state, e.to_state, e.at, a.stopped_at, a.priority"
                   " FROM control.allocation_events e JOIN control.allocations a USING (allocation_id)"
                   " WHERE e.tenant_id = %s AND e.event = 'preempted'", tenant)
        res.faults = len(ev)
        for aid, src, dst, at, stopped, prio in ev:
            if (src, dst) != ("RUNNING", "RELEASING") or stopped != at or prio >= 10:
                res.violations.append(f"[seed {seed}] victim {aid}: {src}→{dst} at {at}, stopped_at {stopped}, "
                                      f"priority {prio}")
        try:
            ray.get(cp.placement.check_invariants.remote(), timeout=30)
        except Exception as exc:  # noqa: BLE001 - an AssertionError inside the actor: allocated + held + free ≠ capacity
            res.violations.append(f"[seed {seed}] the placement actor's capacity invariants fail: {exc}")
        import statistics
        res.notes.update(preemptors=len(preemptors), victims=len(ev),
                         preemptor_wait_s_median=round(statistics.median(waits), 2) if waits else 0.0,
                         preemptor_wait_s_max=round(max(waits, default=0.0), 2))
        return _finish(cp, admin, res, load, tenant)
    finally:
        c.close()
        load.stop()
        stop_pool_node(cp, node)


ALL = [placement_kill, shard_kill, postgres_restart, commit_answer_lost, commit_answer_lost_db_down, commit_stall,
       daemon_sigkill, daemon_freeze, cleanup_fails, lease_bulk, preemption_load]
