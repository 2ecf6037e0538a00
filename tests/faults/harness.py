"""Fault-injection harness: a workload generator and an auditor.

The workload drives the real gRPC API from threads (Place with unique request
ids, Release), retrying the *same* request id on UNAVAILABLE / DEADLINE_EXCEEDED
(outcome unknown), exactly what a well-behaved client does. It remembers every
acknowledgement. The auditor then checks Postgres against that model:

  1. no GPU double-booked: Σ gpu_milli per (node, GPU) over allocations that hold
     capacity (PLACED, RUNNING, RELEASING, FAILED, RELEASE_FAILED) ≤ 1000;
  2. every acknowledged allocation exists, under the acknowledged request id;
  3. no unacknowledged allocation is RUNNING (or holds capacity);
  4. billed GPU-milli-µs (usage entries net of reversals) = Σ gpu_milli × GPUs ×
     (stopped_at − running_since) for every allocation that stopped;
  5. no usage before running_since or after stopped_at (net of reversals: a stop
     that arrives after an interval past it was closed reverses that interval and
     re-issues the part up to the stop);
  6. the ledger's hash chains verify;
  7. no request goes unanswered: a client retrying the same request id gets an answer within its
     retry window (60 s) once the fault is over (scenarios.py, ``_finish``).

Everything random comes from one seed, printed in every failure message.
"""
from __future__ import annotations

import dataclasses
import random
import threading
import time
import uuid

import grpc
import psycopg
import ray

from gpuaas.client import Client
from gpuaas.v1 import common_pb2 as pb

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
TERMINAL = {pb.ALLOCATION_STATE_RELEASED, pb.ALLOCATION_STATE_CANCELLED, pb.ALLOCATION_STATE_FAILED,
            pb.ALLOCATION_STATE_RELEASE_FAILED}
HOLDS = ("PLACED", "RUNNING", "RELEASING", "FAILED", "RELEASE_FAILED")
# FAILED holds its GPUs only when it ran (node lost / GPU fault: cleanup deferred);
# a prepare that failed for good freed its reservation (DESIGN §5).
HOLDS_SQL = ("(al.state IN ('PLACED','RUNNING','RELEASING','RELEASE_FAILED')"
             " OR (al.state = 'FAILED' AND al.running_since IS NOT NULL))")


@dataclasses.dataclass
class Stats:
    attempts: int = 0
    acked: int = 0
    rejected: int = 0
    retries: int = 0
    released: int = 0
    unavailable: int = 0
    other_errors: int = 0
    slowest_call_s: float = 0.0
    gave_up: int = 0


class Workload:
    """Threads placing and releasing through gRPC until stopped (or ``ops_max`` / ``duration_s``)."""

    def __init__(self, address: str, token: str, tenant: str, *, seed: int, threads: int = 3,
                 ops_max: int = 10_000, duration_s: float = 30.0, node_selector: dict | None = None,
                 lease_s: int = 0, call_timeout_s: float = 10.0, retry_window_s: float = 60.0,
                 hold_max: int = 3, release_p: float = 0.4, priority: int = 0, release_placed: bool = True,
                 wait_p: float = 0.0):
        self.address, self.token, self.tenant, self.seed = address, token, tenant, seed
        self.threads, self.ops_max, self.duration_s = threads, ops_max, duration_s
        self.node_selector, self.lease_s = node_selector or {}, lease_s
        self.call_timeout_s, self.retry_window_s, self.hold_max = call_timeout_s, retry_window_s, hold_max
        self.release_p = release_p
        self.priority = priority                 # e.g. < 0: preemptible (spot) load
        # False: release an allocation only once it is past PLACED (prepare done), so a scenario
        # exercises its own fault rather than release-during-prepare.
        self.release_placed = release_placed
        # The share of places that ask to wait in the queue when nothing fits (``wait``): acknowledged
        # QUEUED, placed later by the placement actor's queue, or cancelled by their release.
        self.wait_p = wait_p
        self.stats = Stats()
        self.acked: dict[str, str] = {}          # request id → allocation id
        self.sent: set[str] = set()              # every request id ever sent
        self.unacked: set[str] = set()           # sent, never acknowledged (gave up)
        self.release_acked: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ops = 0
        self._workers: list[threading.Thread] = []

    # ------------------------------------------------------------ run

    def start(self) -> "Workload":
        for i in range(self.threads):
            t = threading.Thread(target=self._run, args=(i,), name=f"load-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def stop(self, join_s: float = 120.0) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(join_s)

    def _call(self, fn, *args, **kw):
        t0 = time.monotonic()
        try:
            return fn(*args, **kw)
        finally:
            dt = time.monotonic() - t0
            with self._lock:
                self.stats.slowest_call_s = max(self.stats.slowest_call_s, dt)

    def _retrying(self, what, fn, *args, **kw):
        """Call until it answers something other than UNAVAILABLE/DEADLINE_EXCEEDED, within the retry window."""
        deadline = time.monotonic() + self.retry_window_s
        while True:
            try:
                return self._call(fn, *args, **kw)
            except grpc.RpcError as err:
                if err.code() not in RETRYABLE or time.monotonic() > deadline:
                    raise
                with self._lock:
                    self.stats.retries += 1
                    self.stats.unavailable += err.code() == grpc.StatusCode.UNAVAILABLE
                time.sleep(0.2)

    def _run(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        client = Client(self.address, self.token, timeout_s=self.call_timeout_s)
        held: list[str] = []
        t_end = time.monotonic() + self.duration_s
        n = 0
        try:
            while not self._stop.is_set() and time.monotonic() < t_end:
                with self._lock:
                    if self._ops >= self.ops_max:
                        break
                    self._ops += 1
                if held and (len(held) >= self.hold_max or rng.random() < self.release_p):
                    self._release(client, held.pop(rng.randrange(len(held))))
                    continue
                rid = f"s{self.seed}-w{index}-{n}-{uuid.uuid4().hex[:6]}"
                n += 1
                milli = rng.choice([250, 500, 1000])
                fields = dict(gpu_count=1) if milli == 1000 else dict(gpu_milli=milli)
                fields["node_selector"] = self.node_selector
                if self.lease_s:
                    fields["lease_s"] = self.lease_s
                if self.priority:
                    fields["priority"] = self.priority
                if self.wait_p and rng.random() < self.wait_p:
                    fields["wait"] = True
                with self._lock:
                    self.sent.add(rid)
                    self.stats.attempts += 1
                try:
                    a = self._retrying("place", client.place, rid, **fields)
                except grpc.RpcError as err:
                    with self._lock:
                        if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                            self.stats.rejected += 1
                        elif err.code() in RETRYABLE:
                            self.stats.gave_up += 1
                            self.unacked.add(rid)
                        else:
                            self.stats.other_errors += 1
                            self.unacked.add(rid)
                    if held:
                        self._release(client, held.pop(0))
                    time.sleep(rng.uniform(0.01, 0.05))
                    continue
                with self._lock:
                    self.acked[rid] = a.allocation_id
                    self.stats.acked += 1
                held.append(a.allocation_id)
                time.sleep(rng.uniform(0.0, 0.03))
            for aid in held if self.release_p > 0 else []:
                self._release(client, aid)
        finally:
            client.close()

    def _release(self, client: Client, aid: str) -> None:
        try:
            if not self.release_placed:
                deadline = time.monotonic() + self.call_timeout_s
                while (self._retrying("get", client.get, aid).state == pb.ALLOCATION_STATE_PLACED
                       and time.monotonic() < deadline):
                    time.sleep(0.02)
            self._retrying("release", client.release, aid)
            with self._lock:
                self.release_acked.add(aid)
                self.stats.released += 1
        except grpc.RpcError:
            with self._lock:
                self.stats.other_errors += 1

    # ------------------------------------------------------------ settle

    def settle(self, timeout_s: float = 60.0) -> list[str]:
        """Release whatever of this tenant still runs and wait until nothing is in flight; returns stragglers."""
        client = Client(self.address, self.token, timeout_s=self.call_timeout_s)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    live = list(client.list())
                except grpc.RpcError as err:
                    if err.code() in RETRYABLE and time.monotonic() < deadline:
                        time.sleep(0.3)
                        continue
                    raise
                busy = [a for a in live if a.state not in TERMINAL]
                if not busy:
                    return []
                for a in busy:
                    if a.state in (pb.ALLOCATION_STATE_QUEUED, pb.ALLOCATION_STATE_PLACED,
                                   pb.ALLOCATION_STATE_RUNNING):
                        try:
                            client.release(a.allocation_id)
                        except grpc.RpcError:
                            pass
                if time.monotonic() > deadline:
                    return [f"{a.allocation_id}:{pb.AllocationState.Name(a.state)}" for a in busy]
                time.sleep(0.3)
        finally:
            client.close()


def flush_ledger(ledger_actor, timeout_s: float = 60.0) -> None:
    """Deliver the whole outbox to the ledger and close every due interval."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(ledger_actor.flush.remote(timeout_s=30), timeout=40)
            ray.get(ledger_actor.close_intervals.remote(), timeout=40)
            ray.get(ledger_actor.flush.remote(timeout_s=30), timeout=40)
            return
        except Exception:  # noqa: BLE001 - the ledger actor may be reconnecting after a database restart
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def double_booked(conn) -> list[str]:
    """GPUs that allocations holding capacity in Postgres book past 1000 milli, cluster-wide (also checked
    while a scenario runs: a double booking that a later release undoes is one all the same)."""
    return [f"double-booked GPU {node}/{gpu}: {milli} milli ({states[:300]})"
            for node, gpu, milli, states in conn.execute(
                "SELECT a->>'node_id', g::int, sum((a->>'gpu_milli')::int),"
                " string_agg(al.state || ':' || al.reason, ', ') FROM control.allocations al,"
                " jsonb_array_elements(al.assignments) a, jsonb_array_elements_text(a->'gpu_indices') g"
                " WHERE " + HOLDS_SQL + " GROUP BY 1, 2 HAVING sum((a->>'gpu_milli')::int) > 1000")]


def audit(owner_url: str, tenant: str, load: Workload | None = None, *, seed: int = 0) -> list[str]:
    """Check the invariants for ``tenant`` (and the whole cluster for double booking). Returns violations."""
    from ledger import verify

    v: list[str] = []
    with psycopg.connect(owner_url, autocommit=True) as conn:
        # 1. no GPU double-booked (cluster-wide)
        v += double_booked(conn)
        rows = {rid: (str(aid), state if holds else state + " (holds nothing)")
                for rid, aid, state, holds in conn.execute(
                    "SELECT request_id, allocation_id, state, " + HOLDS_SQL.replace("al.", "")
                    + " FROM control.allocations WHERE tenant_id = %s", (tenant,))}
        if load is not None:
            # 2. every acknowledged allocation exists, under its request id
            for rid, aid in load.acked.items():
                got = rows.get(rid)
                if got is None or got[0] != aid:
                    v.append(f"acknowledged {rid} → {aid} not found (got {got})")
            # 3. nothing unacknowledged holds capacity or runs
            for rid, (aid, state) in rows.items():
                if rid not in load.acked and state in HOLDS:
                    v.append(f"unacknowledged request {rid} ({aid}) is {state}")
                if rid not in load.sent:
                    v.append(f"allocation {aid} for a request id never sent: {rid}")
        # 4 + 5. billing = Σ RUNNING intervals, exactly; nothing outside them
        for aid, expected, billed, first, last, start, stop in conn.execute(
                """
                WITH a AS (
                  SELECT allocation_id, running_since, stopped_at,
                         (SELECT sum((x->>'gpu_milli')::bigint * jsonb_array_length(x->'gpu_indices'))
                            FROM jsonb_array_elements(assignments) x) AS milli
                  FROM control.allocations
                  WHERE tenant_id = %s AND running_since IS NOT NULL AND stopped_at IS NOT NULL)
                SELECT a.allocation_id,
                       a.milli * (extract(epoch FROM a.stopped_at - a.running_since) * 1000000)::bigint,
                       coalesce((SELECT sum(u.gpu_milli_us) FROM ledger.usage_entries u
                                 WHERE u.allocation_id = a.allocation_id), 0),
                       (SELECT min(u.interval_start) FROM ledger.usage_entries u
                         WHERE u.allocation_id = a.allocation_id AND u.kind <> 1 AND NOT EXISTS (
                           SELECT 1 FROM ledger.usage_entries r WHERE r.reverses_id = u.id)),
                       (SELECT max(u.interval_end) FROM ledger.usage_entries u
                         WHERE u.allocation_id = a.allocation_id AND u.kind <> 1 AND NOT EXISTS (
                           SELECT 1 FROM ledger.usage_entries r WHERE r.reverses_id = u.id)),
                       a.running_since, a.stopped_at
                FROM a""", (tenant,)):
            if billed != expected:
                v.append(f"allocation {aid}: billed {billed} GPU-milli-µs, ran {expected}")
            if first is not None and first < start:
                v.append(f"allocation {aid}: usage from {first} before running_since {start}")
            if last is not None and last > stop:
                v.append(f"allocation {aid}: usage until {last} after stopped_at {stop}")
        # never billed without ever running
        for (aid,) in conn.execute(
                "SELECT DISTINCT u.allocation_id FROM ledger.usage_entries u JOIN control.allocations a"
                " USING (allocation_id) WHERE a.tenant_id = %s AND a.running_since IS NULL", (tenant,)):
            v.append(f"allocation {aid}: billed but never RUNNING")
    # 6. the ledger verifies
    res = verify.verify(owner_url)
    if not res.ok:
        v.append(f"ledger does not verify: {res.message} (first bad {res.first_bad})")
    return [f"[seed {seed}] {x}" for x in v]


def new_tenant(admin: Client, address: str, prefix: str = "crash") -> tuple[str, str]:
    tid = f"{prefix}-{uuid.uuid4().hex[:8]}"
    admin.create_tenant(tid)
    return tid, admin.create_token(tid)
