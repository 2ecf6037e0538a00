"""PlacementActor: the single writer of the capacity view.

It hosts the control plane's gRPC server (PlacementService, NodeRegistry,
AdminService) and the scheduler engine. Requests from gRPC threads are put on
one queue. The committer thread takes whatever has arrived (never waiting to
fill a batch) and decides it in memory, into an open batch. The writer thread
takes the whole open batch at each commit, writes it in one Postgres
transaction (group commit), and only then answers. While one batch commits, the
next is being decided: a two-stage pipeline, with commits strictly in order.
Nothing on the decision path crosses a process boundary per request.

        gRPC threads ──put──► queue ──► committer: decide (engine) ──► open batch
                                                                          │ taken whole
                                        writer: COPY / INSERT in 1 txn ◄──┘
                                                   │            │ fail
                                                   │            └─► undo reservations, UNAVAILABLE
                                                   └─► answer; PLACED rows ─► AllocationShard.adopt (prepare)

Ownership by state: QUEUED allocations belong to this actor (it places or
cancels them); from PLACED on, an allocation shard drives them and tells this
actor when capacity comes back (``capacity_freed``).

Preemption (see ``may_preempt`` for who may preempt whom): a queued (wait=true)
request that the queue pass cannot place asks the engine for victims among the
RUNNING allocations it may preempt, least lost GPU-time first. The engine holds
their capacity for it; each victim's shard moves it RUNNING → RELEASING
(event ``preempted``, billing stops at the decision time) and cleans up; every
``capacity_freed`` of a victim lands in the hold, not in the pool; once the
last victim is back the preemptor is placed on exactly that capacity, all
replicas or none.

        queue pass: place? ─ no ─► engine.place(preempt=True) ─► hold + victims
                                        │                            │ shard.release(v, "preempted", at)
                                        ▼                            ▼
        capacity_freed(v) ─► engine.release(v) ─► into the hold ─► hold complete ─► QUEUED → PLACED
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import datetime as dt
import logging
import pickle
import re
import threading
import time
import zlib

import psycopg

from actors import convert, metrics, runtime, store
from actors.store import AllocRow, utcnow
from gpuaas.config import ControlPlaneConfig
from gpuaas.errors import AlreadyExists, FailedPrecondition, GpuaasError, ResourceExhausted, Unavailable
from gpuaas.lifecycle import AllocEvent, AllocState, NodeState
from gpuaas.lifecycle.allocation import HOLDS_CAPACITY
from gpuaas.v1 import common_pb2
from ledger import db as dbmod

log = logging.getLogger("gpuaas.placement")

SCHEDULABLE_NODE_STATES = frozenset({NodeState.READY})
# Each statement that asks Postgres what became of a commit whose answer was lost (_outcome_connection).
OUTCOME_STATEMENT_TIMEOUT_MS = 2000

# Hand-offs to the allocation shards wait up to ControlPlaneConfig.dispatch_linger_s for company, then go
# as one actor call per shard; this many waiting go at once.
DISPATCH_FLUSH_ITEMS = 1024
QUEUE_REQUESTS_MAX = 200_000  # requests admitted but not yet decided; beyond this, UNAVAILABLE (back off)
# One tenant's share of that: past it, that tenant's new requests are refused (UNAVAILABLE, back off)
# while the others' are still admitted. Five full PlaceBatch calls (place_batch_items_max) fit.
TENANT_QUEUE_REQUESTS_MAX = QUEUE_REQUESTS_MAX // 4
# The committer takes at most this many requests of one tenant before the next tenant's turn.
INTAKE_SLICE = 256

# Preemption tuning.
PREEMPT_RETRY_S = 0.5           # a queued request asks for victims at most this often (each search: one
                                # indexed query + one plan per candidate tried; PLACED ones are not yet
                                # candidates, so under churn a search may need a few tries)
PREEMPTORS_PER_PASS = 8         # preemption attempts per queue pass (each plans over the cluster)
PREEMPT_HOLD_MAX_S = 300.0      # victims not all back by then: give the hold up, the preemptor queues again
_MASKED = "\x00not-a-victim"    # engine.victim_of marker: excluded from this victim search


def may_preempt(preemptor_tenant: str, preemptor_priority: int, victim_tenant: str, victim_priority: int) -> bool:
    """Who may preempt whom.

    * Only a strictly higher priority preempts: equal priorities never evict
      each other (no ping-pong between peers).
    * Within a tenant, any strictly higher priority preempts: the tenant
      orders its own work.
    * Across tenants, priority is chosen by the client, so a bigger number alone
      must not evict another customer's work. Negative priorities are the
      preemptible (spot) tier: a tenant that asks for priority < 0 accepts that
      its allocation may be reclaimed for any non-preemptible request
      (priority >= 0) of any tenant. Non-negative work of another tenant is
      never preempted, and spot work does not evict other tenants' spot work.
    """
    if victim_priority >= preemptor_priority:
        return False
    if victim_tenant == preemptor_tenant:
        return True
    return victim_priority < 0 <= preemptor_priority


def shard_of(key: str, n: int) -> int:
    return zlib.crc32(key.encode()) % n


@dataclasses.dataclass
class _Pending:
    tenant: str
    request: common_pb2.PlacementRequest
    future: cf.Future
    field_prefix: str = "request"


# The reason of a victim's ``preempted`` event names its preemptor (``_send_preemptions`` writes it,
# ``_rebuild_preemptions`` reads it back after a restart).
PREEMPTED_BY = "preempted by "
_PREEMPTED_BY = re.compile(re.escape(PREEMPTED_BY) +
                           r"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")


class _Intake:
    """Requests admitted and not yet decided: one FIFO per tenant, taken by the committer in turns.

    A tenant's large PlaceBatch no longer holds up everyone behind it: each take goes round the tenants
    with requests waiting, at most ``slice_items`` of one tenant per turn, until it has ``max_items``.
    A unary Place of another tenant that arrives behind 10,000 requests is decided in the next take,
    not after all of them. Within a tenant the order is kept (a batch's items are decided and answered
    in order). Admission is all or nothing per call: past ``total_max`` requests waiting, or past
    ``tenant_max`` of the caller's own, the call is refused (its caller backs off), so neither a burst
    nor one tenant can grow the queue without bound or fill it for the others."""

    def __init__(self, total_max: int, tenant_max: int, slice_items: int):
        self.total_max, self.tenant_max, self.slice_items = total_max, tenant_max, slice_items
        self._cv = threading.Condition()
        self._by_tenant: dict[str, collections.deque] = {}
        self._turns: collections.deque[str] = collections.deque()  # tenants with requests waiting, in turn
        self.waiting = 0
        self.refused = {"total": 0, "tenant": 0}  # calls refused, by the bound they hit

    def admit(self, tenant: str, items: list) -> str:
        """Queue ``items`` (one call's requests, all of ``tenant``); "" when admitted, else why not."""
        if not items:
            return ""
        with self._cv:
            mine = self._by_tenant.get(tenant)
            if self.waiting + len(items) > self.total_max:
                self.refused["total"] += 1
                return "placement queue is full; retry shortly"
            if (len(mine) if mine else 0) + len(items) > self.tenant_max:
                self.refused["tenant"] += 1
                return (f"tenant {tenant!r} has {len(mine) if mine else 0} placement requests waiting to be "
                        f"decided (at most {self.tenant_max}); retry when they are answered")
            if mine is None:
                mine = self._by_tenant[tenant] = collections.deque()
                self._turns.append(tenant)
            mine.extend(items)
            self.waiting += len(items)
            self._cv.notify()
            return ""

    def tenants_waiting(self) -> int:
        return len(self._turns)

    def take(self, max_items: int, timeout_s: float) -> list:
        """Up to ``max_items`` requests, tenants in turn; waits up to ``timeout_s`` for the first."""
        with self._cv:
            if not self.waiting and not self._cv.wait_for(lambda: self.waiting, timeout_s):
                return []
            out: list = []
            while self._turns and len(out) < max_items:
                tenant = self._turns.popleft()
                mine = self._by_tenant[tenant]
                k = min(self.slice_items, max_items - len(out), len(mine))
                out.extend(mine.popleft() for _ in range(k))
                if mine:
                    self._turns.append(tenant)
                else:
                    del self._by_tenant[tenant]
            self.waiting -= len(out)
            return out


@dataclasses.dataclass
class _Decided:
    """A batch decided in memory, waiting for its commit."""
    new: list = dataclasses.field(default_factory=list)        # (row, [(event, from)], _Pending)
    answers: list = dataclasses.field(default_factory=list)    # (_Pending, error | ("existing", id))
    queued_doms: list = dataclasses.field(default_factory=list)  # requests that wait in the queue
    keys: list = dataclasses.field(default_factory=list)       # (tenant, request_id) made in-flight
    decide_s: float = 0.0
    decide_cpu_s: float = 0.0

    def empty(self) -> bool:
        return not (self.new or self.answers)

    def merge(self, other: "_Decided") -> None:
        self.new += other.new
        self.answers += other.answers
        self.queued_doms += other.queued_doms
        self.keys += other.keys
        self.decide_s += other.decide_s
        self.decide_cpu_s += other.decide_cpu_s


def _connect_known(url: str, **kw) -> tuple[psycopg.Connection, tuple]:
    """A new connection and who it is on the server: (process id, backend start), to end that backend
    if a commit's answer is lost (_backend_gone); a process id alone may be reused after a restart. On
    a connection that is not autocommit the read's transaction is ended, so that the next
    ``transaction()`` is a real one and not a savepoint."""
    conn = psycopg.connect(url, **kw)
    try:
        ident = conn.execute("SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()").fetchone()
        if not conn.autocommit:
            conn.rollback()
    except BaseException:
        conn.close()
        raise
    return conn, ident


def _backend_gone(conn: psycopg.Connection, ident: tuple | None, wait_s: float = 2.0) -> bool:
    """End the backend ``ident`` (if it still runs) and wait until it is gone. A backend that lost its
    client mid-commit may still be running the commit: reading "not written" before it finishes would
    free capacity that a committed row then holds. False if it is still there after ``wait_s``."""
    if ident is None:
        return True
    conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = %s AND backend_start = %s",
                 ident)
    deadline = time.monotonic() + wait_s
    while conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s AND backend_start = %s", ident).fetchone():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _answer_lost(conn: psycopg.Connection | None, exc: BaseException) -> bool:
    """Whether a failed write may have taken effect. No: there was no connection (nothing was sent), or
    the server reported the error on a connection still alive (it rolled the transaction back). Yes:
    otherwise (the connection broke, and with it the answer)."""
    return conn is not None and not (isinstance(exc, psycopg.Error) and exc.sqlstate and not conn.broken)


@dataclasses.dataclass
class _Preemption:
    """A preemptor waiting for its victims' capacity (held for it by the engine)."""
    row: AllocRow
    victims: tuple[str, ...]              # everything whose capacity the hold waits for
    preempted: tuple[str, ...]            # of those, the RUNNING ones evicted (the rest was releasing already)
    at: dt.datetime                       # the decision: victims' billing stops here
    started: float                        # time.monotonic() of the decision
    refs: list = dataclasses.field(default_factory=list)   # shard.release calls in flight


@dataclasses.dataclass
class NodeInfo:
    node_id: str
    address: str
    models: dict[int, str]
    state: NodeState
    spec: object = None


class PlacementCore:
    """Everything the actor does, as a plain object (testable without Ray)."""

    def __init__(self, *, app_url: str, config: ControlPlaneConfig, alloc_shards: list, node_shards: list):
        from scheduler import Engine, PolicyName

        self.cfg = config
        self.app_url = app_url
        self.alloc_shards = alloc_shards
        self.node_shards = node_shards
        policy = config.policy.upper()
        self.engine = Engine() if policy == "DEFAULT" else Engine(policy=PolicyName[policy])
        self.lock = threading.RLock()
        self.nodes: dict[str, NodeInfo] = {}
        self._models_cache: tuple[int, set[str], int] = (-1, set(), 0)  # (node count, models, GPUs/node max)
        # Seconds from a unary Place's arrival in its handler to its answer (the last 100,000):
        # the server's share of a client's latency.
        self.place_latency: collections.deque[float] = collections.deque(maxlen=100_000)
        # (time.time() at its end, seconds, rows) of each group commit of new allocations (the last
        # 100,000): whether slow answers waited for the database.
        self.commit_log: collections.deque[tuple[float, float, int]] = collections.deque(maxlen=100_000)
        # (tenant, request_id) → (request hash, allocation id): the idempotency index.
        self.idem: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.queued: dict[str, AllocRow] = {}
        # allocation id → tenant, for every allocation this actor queued or placed and has not seen finish
        # (dropped when its capacity comes back or it is cancelled): the API's ownership check for a
        # release without a read of Postgres. A tenant never changes, so an entry is never wrong.
        self.owner_tenant: dict[str, str] = {}
        # Requests as they arrive, per tenant; the committer decides them, tenants in turn, into the open
        # batch, which the writer takes whole at each commit (the next batch is decided while one commits).
        self.intake = _Intake(QUEUE_REQUESTS_MAX, TENANT_QUEUE_REQUESTS_MAX, INTAKE_SLICE)
        self._open = _Decided()                 # decided, waiting for the writer (under _open_cv)
        self._open_cv = threading.Condition()
        self._inflight: dict[tuple[str, str], tuple[bytes, str]] = {}  # decided, commit not yet finished
        self._pipe_conn: psycopg.Connection | None = None  # the writer stage's own connection
        self._pipe_ident: tuple | None = None  # its backend on the server: (pid, backend_start)
        self._conn_ident: tuple | None = None  # the same for _writer's connection
        # Queued requests whose QUEUED → PLACED commit lost its answer while Postgres could not be asked:
        # id → (row before, backend ident). Their capacity stays reserved until the tick settles them.
        self._queued_in_doubt: dict[str, tuple[AllocRow, tuple | None]] = {}
        # Group commits whose answer was lost and whose outcome Postgres could not tell yet: (batch,
        # backend ident). Their capacity stays reserved until the tick settles them (_resolve_in_doubt).
        self._in_doubt: list[tuple["_Decided", tuple | None]] = []
        self._stop = threading.Event()
        self._conn: psycopg.Connection | None = None
        self._read_local = threading.local()
        self.stats = {"placed": 0, "queued": 0, "rejected": 0, "batches": 0, "commit_failures": 0,
                      "preemptions": 0, "victims": 0, "preemptions_given_up": 0,
                      # Committer time by phase (seconds, summed): where a placement's latency goes.
                      "decide_s": 0.0, "commit_s": 0.0, "answer_s": 0.0, "decide_cpu_s": 0.0,
                      "commit_cpu_s": 0.0,
                      # Releases that overtook their hand-off, settled here (release_before_handoff).
                      "released_before_handoff": 0,
                      # Group commits whose answer was lost with the connection and whose outcome
                      # Postgres could not tell at once (held until it can: _hold_in_doubt).
                      "commits_in_doubt": 0}
        self.preempting: dict[str, _Preemption] = {}   # preemptor id → its victims (engine holds the capacity)
        self._preempt_tried: dict[str, float] = {}     # queued id → monotonic time of its last victim search
        self._preempt_note: dict[str, str] = {}        # queued id → why its last victim search found none
        self._requeue_pending: set[str] = set()        # back to QUEUED, row not read yet
        self._dispatch_cv = threading.Condition()
        # Hand-offs waiting for their window, by allocation id, in commit order: (id, addresses, committed
        # row). A release that overtakes its hand-off withdraws it and is settled here (release_before_handoff).
        self._dispatch_pending: dict[str, tuple] = {}
        # Hand-offs sent again after a rebuild: the previous incarnation may have sent them already, so
        # a shard may be preparing them, and their releases are the shard's (release_before_handoff).
        self._handoff_resent: set[str] = set()
        self._group_lock = threading.Lock()  # the release-before-hand-off connection (_group_writer)
        self._group_conn: psycopg.Connection | None = None
        self._group_ident: tuple | None = None  # its backend on the server (_connect_known)
        # When the window of the hand-offs now waiting opened: when a hand-off found none waiting. A
        # window whose hand-offs were all withdrawn (released first) closes with them, so the next
        # hand-off opens its own full window rather than joining one about to close.
        self._dispatch_opened = 0.0
        # Full collections over the capacity view stalled every request in flight (~0.1 s at 50k allocations).
        self.gc = runtime.GcPacer()
        # Moments the whole process stopped (every request waits, even those not in a handler yet).
        self.pauses = runtime.PauseProbe(name="placement-pause-probe")
        self._recon_lock = threading.Lock()  # reconcile_released: the tick's pass and an operator's
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="placement-dispatch", daemon=True)
        self._dispatcher.start()
        self.rebuild_info = self.rebuild()
        # PLACED allocations whose hand-off to a shard may have died with the
        # previous incarnation: adopt is idempotent, so hand them over again.
        self._dispatch(self._placed_after_rebuild, resent=True)
        self._placed_after_rebuild = []
        self._committer = threading.Thread(target=self._commit_loop, name="placement-committer", daemon=True)
        self._committer.start()
        self._write_thread = threading.Thread(target=self._write_loop, name="placement-writer", daemon=True)
        self._write_thread.start()
        self._ticker = threading.Thread(target=self._tick_loop, name="placement-tick", daemon=True)
        self._ticker.start()

    # ------------------------------------------------------------ database

    def _writer(self) -> psycopg.Connection:
        if not dbmod.usable(self._conn):  # also one the server has closed while it was idle
            conn, self._conn = self._conn, None  # None while connecting: a failure here sent nothing
            runtime.close_quietly(conn)
            self._conn, self._conn_ident = _connect_known(self.app_url, connect_timeout=5)
        return self._conn

    def _drop_writer(self) -> None:
        conn, self._conn = self._conn, None
        runtime.close_quietly(conn)

    def _pipe_writer(self) -> psycopg.Connection:
        """The writer stage's connection (new allocations); other writers hold self.lock and use _writer.

        Autocommit: a group of new allocations is one statement, its own transaction (one round trip),
        or, past store.SMALL_INSERT_MAX, BEGIN … COPY … COMMIT (store.insert_new_allocations). It runs
        nothing else, so its statements keep one plan (store.GROUP_WRITER_OPTIONS)."""
        if not dbmod.usable(self._pipe_conn):
            conn, self._pipe_conn = self._pipe_conn, None
            runtime.close_quietly(conn)
            self._pipe_conn, self._pipe_ident = _connect_known(self.app_url, autocommit=True, connect_timeout=5,
                                                               options=store.GROUP_WRITER_OPTIONS)
        return self._pipe_conn

    @property
    def commits_held_in_doubt(self) -> int:
        """Commits held now whose outcome Postgres could not tell yet: groups of new allocations
        (_hold_in_doubt) and queued requests' placements (_commit_queued)."""
        return len(self._in_doubt) + len(self._queued_in_doubt)

    def _drop_pipe_writer(self) -> None:
        conn, self._pipe_conn = self._pipe_conn, None
        runtime.close_quietly(conn)

    def _outcome_connection(self) -> psycopg.Connection:
        """A short-lived connection to ask Postgres what became of a commit whose answer was lost. Its
        waits are bounded (connecting, and each statement): the asker may be the writer, or hold the
        capacity view's lock, and a database that accepts connections but does not answer must leave
        the commit in doubt rather than stall them."""
        return psycopg.connect(self.app_url, autocommit=True, connect_timeout=2,
                               options=f"-c statement_timeout={OUTCOME_STATEMENT_TIMEOUT_MS}")

    def _commit_outcome(self, ids: list[str], ident: tuple | None) -> bool | None:
        """Whether a group commit whose answer was lost took effect: True (its rows are there), False
        (none is), or None (not known yet: the database is unreachable, or the backend that ran the
        commit still lives and could yet finish it).

        A group is one transaction (one statement, or BEGIN … COPY … COMMIT), so its rows are all there
        or none. They are read once the backend that ran it (``ident``) is gone (_backend_gone)."""
        try:
            with self._outcome_connection() as conn:
                if not _backend_gone(conn, ident):
                    return None
                n = conn.execute("SELECT count(*) FROM control.allocations WHERE allocation_id = ANY(%s::uuid[])",
                                 (ids,)).fetchone()[0]
        except psycopg.Error as exc:
            log.warning("outcome of a group commit of %d placements not known yet: %s", len(ids), exc)
            return None
        if n not in (0, len(ids)):  # one transaction: cannot be; leave it to a rebuild rather than guess
            log.error("group commit of %d placements found %d of its rows; left in doubt", len(ids), n)
            return None
        return n == len(ids)

    def reader(self) -> psycopg.Connection:
        """A per-thread autocommit connection (gRPC handler threads, the release combiner): reads, and
        writes that are one statement, so their own transaction (release_before_handoff)."""
        c = getattr(self._read_local, "conn", None)
        if not dbmod.usable(c):
            self._read_local.conn = None
            runtime.close_quietly(c)
            try:
                c = psycopg.connect(self.app_url, autocommit=True, connect_timeout=5)
            except psycopg.OperationalError as exc:
                raise Unavailable(f"database unavailable: {exc.__class__.__name__}") from exc
            self._read_local.conn = c
        return c

    def _group_writer(self) -> psycopg.Connection:
        """The autocommit connection of releases settled here (release_before_handoff), used under
        ``_group_lock``; its statement keeps one plan (store.GROUP_WRITER_OPTIONS). One connection for
        every thread, not one per thread: ReleaseBatch handlers call it too, and a connection per
        handler thread could take up to grpc_workers more of the server's connections. Reads stay on
        ``reader``, where a plan made without the values could be a poor one."""
        c = self._group_conn
        if not dbmod.usable(c):
            self._group_conn = None
            runtime.close_quietly(c)
            try:
                c, self._group_ident = _connect_known(self.app_url, autocommit=True, connect_timeout=5,
                                                      options=store.GROUP_WRITER_OPTIONS)
            except psycopg.OperationalError as exc:
                raise Unavailable(f"database unavailable: {exc.__class__.__name__}") from exc
            self._group_conn = c
        return c

    # ------------------------------------------------------------ rebuild

    def rebuild(self) -> dict:
        """Rebuild the capacity view from Postgres (never from memory)."""
        from scheduler import Assignment

        t0 = time.perf_counter()
        self._placed_after_rebuild: list[AllocRow] = []
        with psycopg.connect(self.app_url, autocommit=True, connect_timeout=5) as conn:
            # reconcile_released: its first pass checks everything held; later ones read the event log
            # from here on.
            self._recon_full = True
            self._recon_from = self._recon_prev = conn.execute(
                "SELECT coalesce(max(event_id), 0) FROM control.allocation_events").fetchone()[0]
            gpus: dict[str, list] = {}
            for node_id, idx, model, mem, island, state in conn.execute(
                    "SELECT node_id, gpu_index, model, memory_mib, nvlink_island, state FROM control.gpus"
                    " ORDER BY node_id, gpu_index"):
                gpus.setdefault(node_id, []).append((idx, model, mem, island, state))
            for node_id, address, state, cpu, mem, labels in conn.execute(
                    "SELECT node_id, address, state, cpu_milli, memory_mib, labels FROM control.nodes"
                    " WHERE state <> 'DECOMMISSIONED'"):
                self._add_node_locked(node_id, address, NodeState[state], cpu, mem, labels, gpus.get(node_id, []))
            n = 0
            leaving: list[str] = []  # RELEASING / RELEASE_FAILED: maybe preemption victims
            for rec in conn.execute(
                    f"SELECT {', '.join(store.ALLOC_COLUMNS)} FROM control.allocations WHERE state IN"
                    " ('QUEUED','PLACED','RUNNING','RELEASING','FAILED','RELEASE_FAILED')"):
                row = AllocRow.from_db(rec)
                if row.state in (AllocState.RELEASING, AllocState.RELEASE_FAILED):
                    leaving.append(row.allocation_id)
                req = common_pb2.PlacementRequest.FromString(row.request)
                dom = convert.to_domain(req, key=row.allocation_id, tenant=row.tenant_id)
                self.owner_tenant[row.allocation_id] = row.tenant_id
                if row.state is AllocState.QUEUED:
                    self.queued[row.allocation_id] = row
                    self.engine.enqueue(dom)
                elif row.state in HOLDS_CAPACITY and row.assignments and not (
                        row.state is AllocState.FAILED and row.running_since is None):
                    # (A prepare that failed for good freed its reservation: FAILED without
                    # ever RUNNING holds nothing, exactly as capacity_freed left it.)
                    if row.state is AllocState.PLACED:
                        self._placed_after_rebuild.append(row)
                    self.engine.restore(row.allocation_id, dom, tuple(
                        Assignment(node_id=a["node_id"], gpu_indices=tuple(a["gpu_indices"]), gpu_milli=a["gpu_milli"],
                                   cpu_milli=a.get("cpu_milli", 0), memory_mib=a.get("memory_mib", 0))
                        for a in row.assignments))
                n += 1
            for tenant, rid, h, aid in conn.execute(
                    "SELECT tenant_id, request_id, request_hash, allocation_id FROM control.allocations"):
                self.idem[(tenant, rid)] = (bytes(h), str(aid))
            for tenant, model, milli in conn.execute("SELECT tenant_id, gpu_model, gpu_milli_max FROM iam.quotas"):
                self.engine.set_quota(tenant, model, milli)
            held = self._rebuild_preemptions(conn, leaving)
        took = time.perf_counter() - t0
        log.info("capacity view rebuilt: %d nodes, %d active allocations, %d preemption hold(s) in %.2fs",
                 len(self.nodes), n, held, took)
        return {"nodes": len(self.nodes), "allocations": n, "preemption_holds": held, "seconds": took}

    def _rebuild_preemptions(self, conn, leaving: list[str]) -> int:
        """Preemptions in flight when the previous incarnation died: victims already told to go (their
        ``preempted`` event names the preemptor) that still hold capacity, for a preemptor still QUEUED.
        Their hold is rebuilt, free part included, so the capacity freed for the preemptor goes to no
        one else after a restart either."""
        if not leaving:
            return 0
        by_pre: dict[str, list[tuple[str, dt.datetime]]] = {}
        for aid, reason, at in conn.execute(
                "SELECT allocation_id, reason, at FROM control.allocation_events"
                " WHERE allocation_id = ANY(%b::uuid[]) AND event = %s", (leaving, AllocEvent.PREEMPTED.value)):
            m = _PREEMPTED_BY.match(reason or "")
            if m and m.group(1) in self.queued:
                by_pre.setdefault(m.group(1), []).append((str(aid), at))
        n = 0
        for pid, victims in by_pre.items():
            row = self.queued[pid]
            ids = tuple(v for v, _ in victims)
            if self.engine.rehold(self._domain(row), ids):
                self.preempting[pid] = _Preemption(row=row, victims=ids, preempted=ids,
                                                   at=min(at for _, at in victims), started=time.monotonic())
                n += 1
        return n

    def _add_node_locked(self, node_id, address, state, cpu, mem, labels, gpus) -> None:
        from scheduler import GpuSpec, NodeSpec

        spec = NodeSpec(node_id=node_id, cpu_milli=cpu, memory_mib=mem,
                        gpus=tuple(GpuSpec(model=m, memory_mib=gm, nvlink_island=isl) for _, m, gm, isl, _ in gpus),
                        labels=dict(labels or {}))
        self.engine.add_node(spec)
        self.nodes[node_id] = NodeInfo(node_id, address, {i: m for i, m, _, _, _ in gpus}, state, spec)
        self.engine.set_node_schedulable(node_id, state in SCHEDULABLE_NODE_STATES)
        for i, _, _, _, gstate in gpus:
            self.engine.set_gpu_healthy(node_id, i, gstate == "READY")

    # ------------------------------------------------------------ capacity facts

    def known_models(self) -> set[str]:
        # Nodes are only ever added (line above), so the node count keys the cache.
        if self._models_cache[0] != len(self.nodes):
            self._models_cache = (len(self.nodes), {m for n in self.nodes.values() for m in n.models.values()},
                                  max((len(n.models) for n in self.nodes.values()), default=0))
        return self._models_cache[1]

    def gpus_per_node_max(self) -> int:
        self.known_models()
        return self._models_cache[2]

    def model_of(self, node_id: str, gpu_index: int) -> str:
        info = self.nodes.get(node_id)
        return info.models.get(gpu_index, "") if info else ""

    def address_of(self, node_id: str) -> str:
        info = self.nodes.get(node_id)
        return info.address if info else ""

    # ------------------------------------------------------------ place

    def submit(self, tenant: str, requests: list[common_pb2.PlacementRequest]) -> list[cf.Future]:
        n = len(requests)
        if n == 1:
            items = [_Pending(tenant, requests[0], cf.Future())]
        else:
            items = [_Pending(tenant, r, cf.Future(), f"requests[{i}]") for i, r in enumerate(requests)]
        refused = self.intake.admit(tenant, items)
        if refused:
            for p in items:
                p.future.set_exception(Unavailable(refused))
        return [p.future for p in items]

    def _commit_loop(self) -> None:
        """Stage 1 of the committer: decide requests as they arrive, into the open batch."""
        while not self._stop.is_set():
            batch = self.intake.take(self.cfg.batch_size_max, 0.2)
            if not batch:
                continue
            try:
                decided = self._decide(batch)
            except Exception as exc:  # noqa: BLE001 - a bug must not kill the committer
                log.exception("placement batch failed: %s", exc)
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(Unavailable("placement batch failed; retry"))
                continue
            with self._open_cv:
                # Bounded: past two full batches decided ahead, wait for the writer to take them.
                while len(self._open.new) >= 2 * self.cfg.batch_size_max and not self._stop.is_set():
                    self._open_cv.wait(0.2)
                self._open.merge(decided)
                self._open_cv.notify_all()

    def _write_loop(self) -> None:
        """Stage 2: commit everything decided so far in one transaction (group commit), batches strictly
        in the order decided. While one commits, the committer keeps deciding into the next: under a
        stream of single requests every commit takes all that arrived meanwhile."""
        while not self._stop.is_set():
            with self._open_cv:
                while self._open.empty() and not self._stop.is_set():
                    self._open_cv.wait(0.2)
                decided, self._open = self._open, _Decided()
                self._open_cv.notify_all()
            if decided.empty():
                continue
            try:
                self._write(decided)
            except Exception as exc:  # noqa: BLE001 - a bug must not kill the writer
                log.exception("placement commit failed: %s", exc)
                with self.lock:  # its ids must not stay "in flight" for good
                    for key in decided.keys:
                        self._inflight.pop(key, None)
                for p in [p for _, _, p in decided.new] + [p for p, _ in decided.answers]:
                    if not p.future.done():
                        p.future.set_exception(Unavailable("placement batch failed; retry"))

    def _decide(self, batch: list[_Pending]) -> "_Decided":
        """Validate and place every request in memory (capacity reserved in the engine); no I/O.

        The committer decides the next batch while the writer commits one, so a decision may rest on
        reservations not yet committed: if that commit fails its reservations are undone, which only
        frees capacity the later decision did not use (never an over-commit). A request whose
        request_id is in an uncommitted batch is answered as that batch's, after it commits."""
        t_start, c_start = time.perf_counter(), time.thread_time()
        now = utcnow()
        d = _Decided()
        batch_keys: dict = {}
        ids = store.new_allocation_ids(len(batch))
        with self.lock:
            models, gmax = self.known_models(), self.gpus_per_node_max()
            for p in batch:
                reserved = None  # an allocation id the engine holds capacity for, while its row is built
                try:
                    convert.validate_request(p.request, known_models=models, gpus_per_node_max=gmax,
                                             lease_s_max=self.cfg.lease_s_max, prefix=p.field_prefix)
                    raw, h = convert.serialized_and_hash(p.request)
                    key = (p.tenant, p.request.request_id)
                    seen = self.idem.get(key) or self._inflight.get(key) or batch_keys.get(key)
                    if seen is not None:
                        if seen[0] != h:
                            raise AlreadyExists(f"request_id {p.request.request_id!r} was used before with a "
                                                "different body")
                        d.answers.append((p, ("existing", seen[1])))
                        continue
                    aid = ids.pop()
                    dom = convert.to_domain(p.request, key=aid, tenant=p.tenant)
                    decision = self.engine.place(dom)
                    row = AllocRow(allocation_id=aid, tenant_id=p.tenant, request_id=p.request.request_id,
                                   request_hash=h, request=raw, state=AllocState.QUEUED,
                                   priority=p.request.priority, created_at=now, updated_at=now,
                                   gpu_model=",".join(p.request.gpu_models))
                    if decision.placed:
                        reserved = aid
                        row.assignments = convert.assignments_to_json(decision.assignments, self.model_of)
                        row.gpu_model = row.assignments[0]["gpu_model"] if row.assignments else row.gpu_model
                        row.gpu_milli_total = convert.gpu_milli_total(row.assignments)
                        row.state, row.version, row.reason = AllocState.PLACED, 2, AllocEvent.PLACED.value
                        events = [(AllocEvent.ACCEPTED, None), (AllocEvent.PLACED, AllocState.QUEUED)]
                    elif p.request.wait and not _is_quota(decision):
                        timeout_s = p.request.queue_timeout_s or self.cfg.queue_timeout_default_s
                        row.queue_deadline = now + dt.timedelta(seconds=timeout_s)
                        row.reason = AllocEvent.ACCEPTED.value
                        events = [(AllocEvent.ACCEPTED, None)]
                        # Joins the engine's queue once committed (_write): the queue pass must not
                        # place a request whose row is not in Postgres yet.
                        d.queued_doms.append(dom)
                    else:
                        raise ResourceExhausted(f"cannot place now: {decision.explanation}")
                    batch_keys[key] = (h, aid)
                    d.new.append((row, events, p))
                except GpuaasError as err:
                    d.answers.append((p, err))
                except Exception as exc:  # noqa: BLE001 - a bug on one request must not strand the others
                    log.exception("placement of %s failed: %s", p.request.request_id, exc)
                    if reserved is not None:
                        self.engine.release(reserved)
                    d.answers.append((p, Unavailable("placement failed; retry")))
            self._inflight.update(batch_keys)
            d.keys = list(batch_keys)
        d.decide_s, d.decide_cpu_s = time.perf_counter() - t_start, time.thread_time() - c_start
        return d

    def _write(self, d: "_Decided") -> None:
        """Commit a decided batch (group commit), then answer and hand PLACED rows to the shards."""
        t_start, c_start = time.perf_counter(), time.thread_time()
        new = d.new
        ok: bool | None = True
        if new:
            conn = None
            try:
                conn = self._pipe_writer()
                store.insert_new_allocations(conn, [(r, e) for r, e, _ in new])
            except Exception as exc:  # noqa: BLE001 - find out whether it took effect before answering
                ident, self._pipe_ident = self._pipe_ident, None
                lost = _answer_lost(conn, exc)
                self._drop_pipe_writer()
                ok = self._commit_outcome([r.allocation_id for r, _, _ in new], ident) if lost else False
                log.error("group commit of %d placements failed: %s (%s)", len(new), exc,
                          {True: "it took effect after all", False: "nothing was written",
                           None: "outcome not known yet; held until it is"}[ok])
                if ok is None:
                    self._hold_in_doubt(d, ident)
                    return
        t_committed, c_committed = time.perf_counter(), time.thread_time()
        if new and ok:
            self.commit_log.append((time.time(), t_committed - t_start, len(new)))
            metrics.COMMIT_SECONDS.observe(t_committed - t_start)
        self._settle(d, ok)
        st = self.stats
        st["decide_s"] += d.decide_s
        st["decide_cpu_s"] += d.decide_cpu_s
        st["commit_s"] += t_committed - t_start
        st["commit_cpu_s"] += c_committed - c_start
        st["answer_s"] += time.perf_counter() - t_committed

    def _hold_in_doubt(self, d: "_Decided", ident: tuple | None) -> None:
        """A group commit whose outcome is not known (its answer was lost and the database cannot say
        yet): its capacity stays reserved and its request ids in flight, so nothing can take its GPUs
        or make a second allocation for one of its requests, and its clients are told to retry with
        the same request_id. A retry meanwhile is answered from Postgres (the "existing" path). The
        tick settles it once Postgres answers (_resolve_in_doubt)."""
        err = Unavailable("the database connection was lost during the commit and its outcome is not known "
                          "yet; retry with the same request_id")
        for _, _, p in d.new:
            if not p.future.done():
                p.future.set_exception(err)
        self._answer_the_rest(d)  # they need not wait for the outcome
        with self.lock:
            self._in_doubt.append((d, ident))
            self.stats["commits_in_doubt"] += 1

    def _resolve_in_doubt(self) -> None:
        """Settle the group commits held in doubt whose outcome Postgres can now tell (from the tick)."""
        with self.lock:
            held, self._in_doubt = self._in_doubt, []
        for d, ident in held:
            ok = self._commit_outcome([r.allocation_id for r, _, _ in d.new], ident)
            if ok is None:
                with self.lock:
                    self._in_doubt.append((d, ident))
                continue
            log.warning("group commit of %d placements held in doubt: %s", len(d.new),
                        "it took effect; its placements stand" if ok else "nothing was written; capacity returned")
            self._settle(d, ok)

    def _settle(self, d: "_Decided", ok: bool) -> None:
        """After a batch's commit (``ok``) or its failure: the capacity view, the answers, the hand-offs."""
        new = d.new
        placed = [row for row, _, _ in new if row.state is AllocState.PLACED]
        with self.lock:
            for key in d.keys:
                self._inflight.pop(key, None)
            if ok:
                for row, _, _ in new:
                    self.idem[(row.tenant_id, row.request_id)] = (row.request_hash, row.allocation_id)
                    self.owner_tenant[row.allocation_id] = row.tenant_id
                    if row.state is AllocState.QUEUED:
                        self.queued[row.allocation_id] = row
                for dom in d.queued_doms:
                    self.engine.enqueue(dom)
                self.stats["placed"] += len(placed)
                self.stats["queued"] += len(d.queued_doms)
            else:
                self.stats["commit_failures"] += 1
                for row in placed:
                    self.engine.release(row.allocation_id)
            self.stats["batches"] += 1
        # A batch held in doubt has answered its requests already (UNAVAILABLE, retry): done futures
        # are left as they are.
        if ok:
            for row, _, p in new:
                if not p.future.done():
                    p.future.set_result(("new", row))
        else:
            err = Unavailable("could not commit the placement; nothing was booked, retry with the same request_id")
            for _, _, p in new:
                if not p.future.done():
                    p.future.set_exception(err)
            placed = []
        self._answer_the_rest(d)
        self._dispatch(placed)

    def _answer_the_rest(self, d: "_Decided") -> None:
        """The batch's answers that are not its new allocations: refusals, and "existing" answers. After
        the batch's commit (or once it is held in doubt) an "existing" answer naming an allocation of
        this or an earlier batch is final: the servicer reads it from Postgres, and reports one that is
        not there (its commit failed, or is in doubt) as retryable."""
        for p, ans in d.answers:
            if p.future.done():
                continue
            if isinstance(ans, GpuaasError):
                self.stats["rejected"] += 1
                p.future.set_exception(ans)
            else:
                p.future.set_result(ans)

    def _dispatch(self, rows: list[AllocRow], resent: bool = False) -> None:
        """Hand PLACED allocations to their shard, which prepares them on the nodes.

        Hand-offs wait up to ``dispatch_linger_s`` for company (or until DISPATCH_FLUSH_ITEMS wait),
        then one dispatcher thread sends each shard its share in one actor call. Every stage
        downstream (the shard's adopt, one PrepareBatch per node, the PLACED → RUNNING commit) pays a
        fixed cost per batch, so under unary traffic this window sets their batch sizes, and with them
        the CPU each placement costs the whole machine. The client's answer never waits for it; only
        the start of the prepare does.
        """
        if not rows:
            return
        # The committed row travels with its id: the shard need not read back what was just written.
        items = [(r.allocation_id, {n: self.address_of(n) for n in r.node_ids()}, r) for r in rows]
        with self._dispatch_cv:
            if not self._dispatch_pending:
                self._dispatch_opened = time.monotonic()
            if resent:
                self._handoff_resent.update(item[0] for item in items)
            self._dispatch_pending.update((item[0], item) for item in items)
            n = len(self._dispatch_pending)
            # Wake the dispatcher when a window opens, and when it is full; not on every commit.
            if n == len(items) or n >= DISPATCH_FLUSH_ITEMS:
                self._dispatch_cv.notify()

    def handoff_waits(self, allocation_id: str) -> bool:
        """Whether the allocation's hand-off has not gone to its shard yet (release_before_handoff)."""
        with self._dispatch_cv:
            return allocation_id in self._dispatch_pending and allocation_id not in self._handoff_resent

    def release_before_handoff(self, items: list[tuple[str, str]]) -> list[AllocRow | None]:
        """Releases that overtook their allocation's hand-off, settled here.

        Until its hand-off goes out, a placed allocation is this actor's alone: no shard holds it and
        no Prepare for it has gone to a node (only its shard sends those, after the hand-off). So its
        release needs no shard and no cleanup: the hand-off is withdrawn, the row goes PLACED →
        RELEASING → RELEASED in one commit (an event per edge, billing never started), and the
        capacity comes back at once. Before, the shard took the release, committed RELEASING, then
        RELEASED, and sent the capacity back with a second actor call.

        ``items``: (allocation id, tenant). Per item, in order: the RELEASED row, or None when the
        allocation's hand-off is not waiting here (gone to its shard, another tenant's, not placed
        by this actor, or sent again after a rebuild: the previous incarnation may have sent it, and
        a shard may be preparing it) or its row moved since it was committed (a shard resumed it):
        the shard's release path answers those. A commit whose answer was lost is settled by what
        Postgres holds (_released_outcome): taken effect, it stands and is answered. Any other failure
        puts the hand-offs back and raises Unavailable; a retry of the release is safe either way."""
        taken: dict[str, tuple] = {}
        with self._dispatch_cv:
            for aid, tenant in items:
                item = self._dispatch_pending.get(aid)
                if item is not None and item[2].tenant_id == tenant and aid not in self._handoff_resent:
                    taken[aid] = self._dispatch_pending.pop(aid)
        if not taken:
            return [None] * len(items)
        chain = (AllocEvent.RELEASE_REQUESTED, AllocEvent.CLEANUP_OK)
        at = utcnow()
        try:
            with self._group_lock:
                conn = None
                try:
                    conn = self._group_writer()
                    results = store.transition_allocations(conn, [(it[2], chain, {"at": at})
                                                                  for it in taken.values()])
                except Exception as exc:
                    lost, ident = _answer_lost(conn, exc), self._group_ident
                    self._group_conn = None
                    runtime.close_quietly(conn)
                    # One statement: every row released, or none. With the answer lost, ask Postgres.
                    stored = self._released_outcome(taken, len(chain), ident) if lost else None
                    if stored is None:
                        raise
                    log.warning("release of %d allocations before their hand-off: the commit took effect"
                                " although its answer was lost (%s)", len(taken), exc)
                    results = [stored[aid] for aid in taken]
        except Exception as exc:  # noqa: BLE001 - not committed, or not known
            with self._dispatch_cv:
                if not self._dispatch_pending:
                    self._dispatch_opened = time.monotonic()
                for aid, item in taken.items():
                    self._dispatch_pending.setdefault(aid, item)
                self._dispatch_cv.notify()
            log.warning("release of %d allocations before their hand-off failed: %s", len(taken), exc)
            # Not known: the hand-offs go out; a shard takes a row that is no longer PLACED for nothing,
            # and reconcile_released returns capacity still held for a finished one.
            raise Unavailable("could not commit the release; retry") from None
        done = {}
        for aid, res in zip(taken, results):
            if isinstance(res, AllocRow):
                done[aid] = res
            else:  # moved since its commit: whoever moved it holds it now; not handed off again
                log.info("release of %s before its hand-off: %s", aid, res)
        if done:
            self.stats["released_before_handoff"] += len(done)
            self.capacity_freed(list(done))
        return [done.get(aid) for aid, _ in items]

    def _released_outcome(self, taken: dict, edges: int, ident: tuple | None) -> dict[str, AllocRow] | None:
        """The rows of a release-before-hand-off commit whose answer was lost, as committed, if it took
        effect (every row RELEASED at the version its ``edges`` lead to); else None: not taken effect,
        not known yet, or anything else. The hand-offs then go out, and the shards and
        reconcile_released sort out a row that is no longer PLACED."""
        rows = {aid: it[2] for aid, it in taken.items()}
        try:
            with self._outcome_connection() as conn:
                if not _backend_gone(conn, ident):
                    return None
                now = {r.allocation_id: r for r in store.load_allocations(
                    conn, "allocation_id = ANY(%s::uuid[])", (list(rows),))}
        except psycopg.Error as exc:
            log.warning("outcome of a release of %d allocations before their hand-off not known yet: %s",
                        len(rows), exc)
            return None
        if all(a in now and now[a].state is AllocState.RELEASED and now[a].version == r.version + edges
               for a, r in rows.items()):
            return now
        return None

    def handoffs_waiting(self) -> int:
        """Committed PLACED allocations waiting for their hand-off window."""
        with self._dispatch_cv:
            return len(self._dispatch_pending)

    def _dispatch_loop(self) -> None:
        linger = self.cfg.dispatch_linger_s
        while not self._stop.is_set():
            with self._dispatch_cv:
                if not self._dispatch_pending:
                    self._dispatch_cv.wait(0.2)
                    continue
                while len(self._dispatch_pending) < DISPATCH_FLUSH_ITEMS and not self._stop.is_set():
                    # The window opened when a hand-off found none waiting. Read again after every
                    # wait: releases may have withdrawn every hand-off of the window, and a later one
                    # opened a new window. (Before, a window kept its first deadline, and a hand-off
                    # that came just before it went out after a few ms: a client releasing right after
                    # its answer, as in waves, found it gone to its shard.)
                    left = self._dispatch_opened + linger - time.monotonic()
                    if left <= 0 or not self._dispatch_pending:
                        break
                    self._dispatch_cv.wait(left)
                if self._stop.is_set():
                    return  # stopping: the shards resume whatever is PLACED from Postgres
                if not self._dispatch_pending:
                    continue
                items, self._dispatch_pending = list(self._dispatch_pending.values()), {}
                if self._handoff_resent:
                    self._handoff_resent.difference_update(item[0] for item in items)
            if not self.alloc_shards:  # none configured (a core run on its own): the rows stay PLACED
                continue
            by_shard: dict[int, list] = {}
            for item in items:
                by_shard.setdefault(shard_of(item[0], len(self.alloc_shards)), []).append(item)
            for i, part in by_shard.items():
                try:
                    # Fire and forget: a shard that dies before adopting resumes its PLACED rows from Postgres.
                    # One bytes argument, pickled here by the interpreter's own pickler: Ray's pickler for
                    # arguments calls back into Python for every object, twice the CPU per row (3.1 against
                    # 6.3 µs per hand-off of a committed row, measured on this code's rows).
                    self.alloc_shards[i].adopt.remote(pickle.dumps(part, protocol=pickle.HIGHEST_PROTOCOL))
                except Exception as exc:  # noqa: BLE001 - the shard's own resume covers a lost hand-off
                    log.warning("hand-off of %d allocations to shard %d failed: %s", len(part), i, exc)

    # ------------------------------------------------------------ queue

    def capacity_freed(self, allocation_ids: list[str], requeue: bool = False) -> None:
        """An allocation shard returned capacity (RELEASED, prepare failed, …).

        A preemption victim's capacity goes into its preemptor's hold (the
        engine keeps it reserved), not back to the pool. ``requeue``: the
        allocations went back to QUEUED (prepare failed); they join the queue
        once their rows are read, retried by the tick if the database is away."""
        with self.lock:
            for aid in allocation_ids:
                self.engine.release(aid)
                if not requeue:
                    self.owner_tenant.pop(aid, None)  # finished: the API reads its row from Postgres
            if requeue:
                self._requeue_pending.update(allocation_ids)
        if requeue:
            self._requeue()
        self.schedule_pending()

    def _requeue(self) -> None:
        # Read under the lock: a row read here cannot be placed (and so go stale) before it is queued.
        with self.lock:
            ids = list(self._requeue_pending)
            if not ids:
                return
            try:
                rows = self._read(lambda c: store.load_allocations(
                    c, "allocation_id = ANY(%b::uuid[]) AND state = 'QUEUED'", (list(ids),)))
            except (psycopg.Error, Unavailable) as exc:
                log.warning("requeue of %d allocation(s) deferred: %s", len(ids), exc)
                return
            for row in rows:
                cur = self.queued.get(row.allocation_id)
                if cur is None or cur.version < row.version:
                    self.engine.enqueue(self._domain(row))
                    self.queued[row.allocation_id] = row
            self._requeue_pending.difference_update(ids)

    def _read(self, fn):
        """Run ``fn(reader connection)``; once more on a fresh connection if this thread's was broken
        (a database restart leaves every thread's idle connection dead)."""
        try:
            return fn(self.reader())
        except psycopg.OperationalError:
            runtime.close_quietly(getattr(self._read_local, "conn", None))
            self._read_local.conn = None
            return fn(self.reader())

    def schedule_pending(self) -> int:
        """Place what the queue can place now; each placement is its own transition.

        Order: preemptors whose held capacity is complete, then the queue
        (priority, fair share, FIFO), then a victim search for the queued
        requests that still do not fit."""
        placed_rows = []
        releases: list[tuple[str, str, str]] = []
        with self.lock:
            if not self.queued:
                return 0
            now = utcnow()
            for pid in [p for p, pe in self.preempting.items() if self._hold_complete(p)]:
                pe = self.preempting.pop(pid)
                d = self.engine.place(self._domain(pe.row), now_s=now.timestamp())
                if not d.placed:
                    # The held capacity no longer fits (a node or GPU went away meanwhile): back in line.
                    log.warning("preemptor %s does not fit its held capacity: %s", pid, d.explanation)
                    self.engine.enqueue(self._domain(pe.row))
                    continue
                others = [v for v in pe.victims if v not in pe.preempted]
                why = f"placed on capacity preempted from {', '.join(pe.preempted) or 'none'}" + (
                    f"; and released by {', '.join(others)}" if others else "")
                new = self._commit_queued(pe.row, d, reason=why[:1000])
                if new is not None:
                    placed_rows.append(new)
            decisions = self.engine.schedule_pending(now_s=now.timestamp())
            unplaced = []
            for d in decisions:
                if d.key not in self.queued:
                    continue
                if not d.placed:
                    unplaced.append(d.key)
                    continue
                new = self._commit_queued(self.queued[d.key], d)
                if new is not None:
                    placed_rows.append(new)
            if unplaced:
                try:
                    placed_rows += self._preempt_for(unplaced, releases)
                except (psycopg.Error, Unavailable) as exc:  # the placements above still go out
                    log.warning("victim search skipped: %s", exc)
        self._dispatch(placed_rows)
        self._send_preemptions(releases)
        return len(placed_rows)

    def _domain(self, row: AllocRow):
        return convert.to_domain(common_pb2.PlacementRequest.FromString(row.request), key=row.allocation_id,
                                 tenant=row.tenant_id)

    def _commit_queued(self, row: AllocRow, d, reason: str | None = None) -> AllocRow | None:
        """QUEUED → PLACED for a decision the engine has already reserved (lock held). On a failed
        commit the reservation is undone and the request goes back in line."""
        assignments = convert.assignments_to_json(d.assignments, self.model_of)
        try:
            conn = self._writer()
            with conn.transaction():
                new = store.transition_allocation(conn, row, AllocEvent.PLACED, assignments=assignments,
                                                  queue_deadline=None, reason=reason)
                conn.execute("UPDATE control.allocations SET gpu_milli_total=%s, gpu_model=%s"
                             " WHERE allocation_id=%s",
                             (convert.gpu_milli_total(assignments),
                              assignments[0]["gpu_model"] if assignments else "", row.allocation_id))
        except Exception as exc:  # noqa: BLE001
            # Inside the transaction block anything but a database error (a version that moved, say) rolls
            # it back on the way out; a COMMIT whose answer is lost raises a database error.
            if isinstance(exc, FailedPrecondition):  # the row moved behind the queue (version checked)
                self.engine.release(d.key)
                self._queued_row_moved(row)
                return None
            ident = self._conn_ident
            lost = isinstance(exc, psycopg.Error) and _answer_lost(self._conn, exc)
            self._drop_writer()
            now = self._queued_outcome(row, ident) if lost else None
            if not lost or (now is not None and now.state is AllocState.QUEUED and now.version == row.version):
                log.warning("could not commit queued placement %s: %s", d.key, exc)
                self.engine.release(d.key)
                self.engine.enqueue(self._domain(row))
                return None
            if now is None or not (now.state is AllocState.PLACED and now.version == row.version + 1):
                # Not known yet: the reservation stays and the request leaves the line until the tick
                # can ask Postgres (_resolve_queued_in_doubt). Placing it again could give it a second
                # set of GPUs while its committed row holds the first.
                log.warning("queued placement %s: commit outcome not known (%s); capacity held until it is",
                            d.key, exc)
                self.queued.pop(d.key, None)
                self._queued_in_doubt[d.key] = (row, ident)
                self.stats["commits_in_doubt"] += 1
                return None
            log.warning("queued placement %s: the commit took effect although its answer was lost (%s)", d.key, exc)
            new = now
        self.queued.pop(d.key, None)
        self._preempt_tried.pop(d.key, None)
        self._preempt_note.pop(d.key, None)
        return new

    def _queued_row_moved(self, row: AllocRow) -> AllocRow | None:
        """A queued request's row is not at the version the queue holds (lock held; the request is out
        of the engine's line): read it, and follow it. Still QUEUED: back in line with the row as it is.
        Finished (a cancel whose answer was lost, then retried; a queue timeout): out of the queue for
        good. Returns the row read (None: unreadable, and the request goes back in line as it was)."""
        aid = row.allocation_id
        try:
            now = self._read(lambda c: store.load_allocation(c, aid))
        except Exception as exc:  # noqa: BLE001 - the next pass tries again
            log.warning("queued request %s: its row could not be read: %s", aid, exc)
            now = None
        if now is None or now.state is AllocState.QUEUED:
            self.queued[aid] = now or row
            self.engine.enqueue(self._domain(now or row))
            return now
        log.warning("queued request %s moved on to %s behind the queue; it leaves the queue", aid, now.state.name)
        if now.state in HOLDS_CAPACITY:  # only this actor places a queued row: a rebuild sets this right
            log.error("queued request %s is %s in Postgres but not held here", aid, now.state.name)
        self.engine.dequeue(aid)
        self.queued.pop(aid, None)
        self.preempting.pop(aid, None)
        self._preempt_tried.pop(aid, None)
        self._preempt_note.pop(aid, None)
        return now

    def _queued_outcome(self, row: AllocRow, ident: tuple | None) -> AllocRow | None:
        """The row of a queued request whose QUEUED → PLACED commit lost its answer, as Postgres holds it
        once the backend that ran the commit is gone (PLACED one version on: it took effect; QUEUED at
        the version it had: it did not). None: not known yet (unreachable, or the backend lives on)."""
        try:
            with self._outcome_connection() as conn:
                if not _backend_gone(conn, ident):
                    return None
                return store.load_allocation(conn, row.allocation_id)
        except psycopg.Error as exc:
            log.warning("outcome of the commit of queued placement %s not known yet: %s", row.allocation_id, exc)
            return None

    def _resolve_queued_in_doubt(self) -> None:
        """Settle queued placements whose commit outcome was not known (from the tick): taken effect →
        placed and handed off; not → the reservation is undone and the request goes back in line. A row
        that has moved on since (a shard resumed the PLACED row and ran or ended it): the reservation
        stays while the row holds capacity, and goes when it no longer does."""
        with self.lock:
            held = list(self._queued_in_doubt.items())
        # Asked without the lock: Postgres may be slow to answer, and placements need the lock meanwhile.
        answers = [(aid, row, self._queued_outcome(row, ident)) for aid, (row, ident) in held]
        placed = []
        with self.lock:
            for aid, row, now in answers:
                if now is None or aid not in self._queued_in_doubt:
                    continue
                del self._queued_in_doubt[aid]
                if now.state is AllocState.PLACED and now.version == row.version + 1:
                    log.warning("queued placement %s held in doubt: it took effect; it stands", aid)
                    placed.append(now)
                elif now.state is AllocState.QUEUED and now.version == row.version:
                    log.warning("queued placement %s held in doubt: nothing was written; back in line", aid)
                    self.engine.release(aid)
                    self.queued[aid] = row
                    self.engine.enqueue(self._domain(row))
                else:
                    log.warning("queued placement %s held in doubt: it took effect and has moved on to %s",
                                aid, now.state.name)
                    if now.state not in HOLDS_CAPACITY and aid in self.engine.allocs:
                        self.engine.release(aid)
                    if now.state is AllocState.QUEUED:
                        self.queued[aid] = now
                        self.engine.enqueue(self._domain(now))
        self._dispatch(placed)

    # ------------------------------------------------------------ preemption

    def _hold_complete(self, pid: str) -> bool:
        hold = self.engine.holds.get(pid)
        return hold is not None and not hold["pending"]

    def _preempt_for(self, keys: list[str], releases: list) -> list[AllocRow]:
        """Search victims for queued requests that do not fit (lock held, service order).

        Returns rows placed outright (capacity appeared meanwhile); appends the
        (victim, shard release args) to send once the lock is released."""
        placed = []
        tried = 0
        mono = time.monotonic()
        floor = None
        for key in keys:
            row = self.queued.get(key)
            if row is None or key in self.preempting or tried >= PREEMPTORS_PER_PASS:
                continue
            if mono - self._preempt_tried.get(key, 0.0) < PREEMPT_RETRY_S:
                continue
            if floor is None:
                floor = self._lowest_running_priority()
            if floor is None or row.priority <= floor:
                continue  # nothing RUNNING has a lower priority: no one to preempt
            tried += 1
            self._preempt_tried[key] = mono
            allowed = self._victim_candidates(row)
            if not any(running for _, running in allowed.values()):
                self._preempt_note[key] = "no RUNNING allocation it may preempt"
                continue
            dom = self._domain(row)
            seq = self._queue_seq(key)
            # The decision time, taken after the candidates were read: every victim was
            # RUNNING before it, so its billing interval ends after it starts.
            at = utcnow()
            d = self._engine_preempt(dom, allowed, at)
            if d.placed:
                new = self._commit_queued(row, d)
                if new is not None:
                    placed.append(new)
                continue
            if not d.victims:
                self.engine.queue.push(dom, seq=seq)  # place() took it out of line: back in its place
                self._preempt_note[key] = ("preempting every lower-priority allocation it may preempt would not "
                                           "make room")
                continue
            self._preempt_note.pop(key, None)
            evict = tuple(v for v in d.victims if allowed[v][1])
            pe = _Preemption(row=row, victims=tuple(d.victims), preempted=evict, at=at, started=mono)
            self.preempting[key] = pe
            self.stats["preemptions"] += 1
            self.stats["victims"] += len(evict)
            log.info("preempting %d allocation(s) for %s (tenant %s, priority %d; %d more already releasing): %s",
                     len(evict), key, row.tenant_id, row.priority, len(d.victims) - len(evict), d.explanation)
            for v in evict:
                releases.append((key, v, at.isoformat()))
        return placed

    def _queue_seq(self, key: str) -> int | None:
        """Its place in line (FIFO sequence) in the engine's pending queue, to keep across a victim search."""
        item = getattr(self.engine.queue, "_items", {}).get(key)
        return item[0] if item else None

    def _lowest_running_priority(self) -> int | None:
        r = self._read(lambda c: c.execute(
            "SELECT min(priority) FROM control.allocations WHERE state = 'RUNNING'").fetchone())
        return None if r is None else r[0]

    def _victim_candidates(self, row: AllocRow) -> dict[str, tuple[float, bool]]:
        """What ``row`` may take capacity from → (running_since in epoch s, RUNNING?).

        RUNNING allocations it may preempt (``may_preempt``): the lifecycle preempts
        RUNNING → RELEASING; a PLACED one is a candidate once it runs. And
        lower-priority allocations already RELEASING: they are not evicted, they
        cost no GPU-time, and holding their capacity as it comes back keeps a big
        request from starving while small ones churn around it."""
        out = {}
        for aid, tenant, prio, since, state in self._read(lambda c: c.execute(
                "SELECT allocation_id, tenant_id, priority, running_since, state FROM control.allocations"
                " WHERE state IN ('RUNNING', 'RELEASING') AND priority < %s", (row.priority,)).fetchall()):
            if state == "RELEASING":
                out[str(aid)] = (float("inf"), False)
            elif may_preempt(row.tenant_id, row.priority, tenant, prio):
                out[str(aid)] = (since.timestamp() if since else 0.0, True)
        return out

    def _engine_preempt(self, dom, allowed: dict[str, tuple[float, bool]], now: dt.datetime):
        """engine.place(preempt=True), restricted to ``allowed`` victims, with their real start times.

        The engine considers every lower-priority allocation it holds; those this
        actor may not preempt are marked as taken (``victim_of``) for the call,
        and each candidate's start is its running_since, so "least lost GPU-time"
        is measured in billed time."""
        eng = self.engine
        masked = []
        for k, al in eng.allocs.items():
            if al.req.priority >= dom.priority or k in eng.victim_of:
                continue
            got = allowed.get(k)
            if got is None:
                eng.victim_of[k] = _MASKED
                masked.append(k)
            else:
                al.start_s = min(got[0], now.timestamp())   # already releasing: nothing lost
        try:
            return eng.place(dom, preempt=True, now_s=now.timestamp())
        finally:
            for k in masked:
                if eng.victim_of.get(k) == _MASKED:
                    del eng.victim_of[k]

    def _send_preemptions(self, releases: list[tuple[str, str, str]]) -> None:
        """Ask each victim's shard for RUNNING → RELEASING (event ``preempted``), outside the lock."""
        for pid, victim, at_iso in releases:
            shard = self.alloc_shards[shard_of(victim, len(self.alloc_shards))]
            pre = self.queued.get(pid)
            why = f"{PREEMPTED_BY}{pid}" + (f" (tenant {pre.tenant_id}, priority {pre.priority})" if pre else "")
            ref = shard.release.remote(victim, AllocEvent.PREEMPTED.value, at_iso, why)
            with self.lock:
                pe = self.preempting.get(pid)
                if pe is not None:
                    pe.refs.append((victim, ref))

    def _reap_preemptions(self) -> None:
        """Check the victims' release answers; give a preemption up when a victim will not come back."""
        import ray

        with self.lock:
            items = list(self.preempting.items())
        for pid, pe in items:
            bad = []
            done = []
            for item in list(pe.refs):
                victim, ref = item
                ready, _ = ray.wait([ref], timeout=0)
                if not ready:
                    continue
                done.append(item)
                try:
                    state = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - the shard refused or died: treat as not released
                    state = f"error {exc.__class__.__name__}"
                if state not in ("RELEASING", "RELEASED"):
                    bad.append(f"{victim}: {state}")
            with self.lock:  # _send_preemptions may append meanwhile
                gone = {id(x) for x in done}
                pe.refs = [x for x in pe.refs if id(x) not in gone]
            late = time.monotonic() - pe.started > PREEMPT_HOLD_MAX_S
            if bad or late:
                self._give_up_preemption(pid, "; ".join(bad) if bad else f"victims not back after "
                                         f"{PREEMPT_HOLD_MAX_S:.0f}s")

    def _give_up_preemption(self, pid: str, why: str) -> None:
        """Return the held capacity to the pool and put the preemptor back in line."""
        with self.lock:
            pe = self.preempting.pop(pid, None)
            if pe is None:
                return
            self.engine.dequeue(pid)  # drops the hold: held capacity back to the pool, pending victims unlinked
            if pid in self.queued:
                self.engine.enqueue(self._domain(pe.row))
            self.stats["preemptions_given_up"] += 1
        log.warning("preemption for %s given up (%s); it queues again", pid, why)

    def pending_explanation(self, row: AllocRow) -> str:
        """Why a QUEUED allocation is still waiting (GetAllocation)."""
        with self.lock:
            pe = self.preempting.get(row.allocation_id)
            if pe is not None:
                hold = self.engine.holds.get(row.allocation_id) or {"pending": ()}
                left = [v for v in pe.victims if v in hold["pending"]]
                return (f"preempting {len(pe.preempted)} lower-priority allocation(s) "
                        f"({', '.join(pe.preempted)}); their capacity is held for this request; waiting for "
                        f"{len(left)} allocation(s) to be cleaned up")
            text = self.engine.explain(convert.to_domain(
                common_pb2.PlacementRequest.FromString(row.request), key="explain-" + row.allocation_id,
                tenant=row.tenant_id)).explanation
            note = self._preempt_note.get(row.allocation_id)
            return f"{text}; {note}" if note else text

    def cancel_queued(self, allocation_id: str, event: AllocEvent = AllocEvent.CANCELLED) -> AllocRow | None:
        with self.lock:
            row = self.queued.get(allocation_id)
            if row is None:
                return None
            for attempt in (1, 2):
                conn = self._writer()
                try:
                    with conn.transaction():
                        new = store.transition_allocation(conn, row, event, queue_deadline=None)
                    break
                except FailedPrecondition:
                    # The row moved: most likely this very cancel, retried after its answer was lost. A
                    # finished row leaves the queue, and is the answer; one still QUEUED is cancelled anew.
                    self.engine.dequeue(allocation_id)
                    now = self._queued_row_moved(row)
                    if now is None or (now.state is AllocState.QUEUED and attempt == 2):
                        raise
                    if now.state is not AllocState.QUEUED:
                        self.owner_tenant.pop(allocation_id, None)
                        return now
                    row = now
            self.engine.dequeue(allocation_id)  # also returns capacity held for it as a preemptor
            self.queued.pop(allocation_id, None)
            self.owner_tenant.pop(allocation_id, None)
            self.preempting.pop(allocation_id, None)
            self._preempt_tried.pop(allocation_id, None)
            self._preempt_note.pop(allocation_id, None)
            return new

    def capacity_samples(self) -> list[tuple]:
        """Per GPU model: (model, total, healthy, allocated milli, free milli, stranded milli, queue depth).

        Stranded = free share left on partly used GPUs: capacity that only a
        sharing task can still use."""
        with self.lock:
            free = self.engine.snapshot_free()
            queue_depth = len(self.queued)
        per: dict[str, list[int]] = {}
        for node_id, f in free.items():
            info = self.nodes.get(node_id)
            if info is None:
                continue
            for i, milli in enumerate(f["gpu_milli"]):
                model = info.models.get(i, "")
                acc = per.setdefault(model, [0, 0, 0, 0, 0])
                acc[0] += 1
                if f["gpu_healthy"][i] and f["schedulable"]:
                    acc[1] += 1
                    acc[3] += milli
                    if 0 < milli < 1000:
                        acc[4] += milli
                acc[2] += 1000 - milli
        return [(m, t, h, a, fr, st, queue_depth) for m, (t, h, a, fr, st) in sorted(per.items())]

    def _record_capacity(self) -> None:
        from ledger import capacity

        samples = self.capacity_samples()
        if samples:
            capacity.record_samples(self.reader(), samples)

    def reconcile_released(self) -> int:
        """Anti-entropy for capacity_freed, a fire-and-forget call: one lost (sent while this actor was
        restarting, say) would keep an allocation's capacity reserved here for good. Allocations the
        capacity view still holds whose rows are RELEASED or CANCELLED, terminal states that hold
        nothing, are released here as capacity_freed would have done.

        The first pass after a rebuild checks every allocation the view holds. Later passes read only
        the transitions into RELEASED or CANCELLED committed since (the event log, by id), so a pass
        costs what changed, not what is held: checking 44,000 held allocations took ~65 ms, most of it
        holding the interpreter, and that stall, every 10 s, set the p99 of a paced run. Event ids
        commit out of order, so each pass reads from the highest id seen two passes back: an event is
        missed only if its transaction ran for longer than a whole interval between passes."""
        with self._recon_lock:
            done = self._finished_still_held()
        if done:
            # Lost (a shard or this actor restarted between the commit and the call), or still on its way:
            # a pass can read a release committed milliseconds before, whose call then finds nothing to do
            # (engine.release of an unknown key is a no-op). In the test suite's runs both showed: 9 ms and
            # 7 s after the commit, around the crash scenarios that kill the actors.
            log.warning("capacity of %d finished allocation(s) was still held (its capacity_freed lost, or still "
                        "on its way); returned now: %s", len(done), ", ".join(done[:5]))
            self.stats["reconciled"] = self.stats.get("reconciled", 0) + len(done)
            self.capacity_freed(done)
        return len(done)

    def _finished_still_held(self) -> list[str]:
        """One pass of reconcile_released: the allocations held here whose rows are finished."""
        top = self._read(lambda c: c.execute(
            "SELECT coalesce(max(event_id), 0) FROM control.allocation_events").fetchone()[0])
        if self._recon_full:
            with self.lock:
                held = list(self.engine.allocs)
            # One text array, which Postgres parses; a binary uuid[] is dumped in Python per element.
            ids = "{" + ",".join(held) + "}"
            done = [str(r[0]) for r in self._read(lambda c: c.execute(
                "SELECT allocation_id FROM control.allocations WHERE allocation_id = ANY(%s::uuid[])"
                " AND state IN ('RELEASED', 'CANCELLED')", (ids,)).fetchall())] if held else []
        else:
            # Bounded on both sides: the planner then takes the primary key's range even before the
            # table's statistics catch up with its growth (one-sided, it scanned all of it).
            done = [str(r[0]) for r in self._read(lambda c: c.execute(
                "SELECT DISTINCT allocation_id FROM control.allocation_events WHERE event_id > %s"
                " AND event_id <= %s AND to_state IN ('RELEASED', 'CANCELLED')",
                (self._recon_from, top)).fetchall())]
        self._recon_full = False
        self._recon_from, self._recon_prev = self._recon_prev, top
        with self.lock:
            return [a for a in done if a in self.engine.allocs and a not in self.engine.victim_of]

    def _tick_loop(self) -> None:
        last_sample = last_reconcile = 0.0
        while not self._stop.wait(1.0):
            self.gc.tick()
            try:
                if self._in_doubt:
                    self._resolve_in_doubt()
                if self._queued_in_doubt:
                    self._resolve_queued_in_doubt()
                if time.monotonic() - last_sample >= self.cfg.capacity_sample_s:
                    last_sample = time.monotonic()
                    self._record_capacity()
                # Supervisor: a restarted shard resumes its work from Postgres on start().
                for shard in list(self.alloc_shards) + list(self.node_shards):
                    shard.start.remote()
                now = utcnow()
                expired = [a for a, r in list(self.queued.items()) if r.queue_deadline and r.queue_deadline <= now]
                for aid in expired:
                    self.cancel_queued(aid, AllocEvent.QUEUE_TIMEOUT)
                if self._requeue_pending:
                    self._requeue()
                if self.preempting:
                    self._reap_preemptions()
                if self.queued:
                    self.schedule_pending()
                if self.cfg.reconcile_s and time.monotonic() - last_reconcile >= self.cfg.reconcile_s:
                    last_reconcile = time.monotonic()
                    self.reconcile_released()
            except Exception as exc:  # noqa: BLE001
                log.warning("placement tick failed: %s", exc)
                self._drop_writer()

    # ------------------------------------------------------------ nodes

    def node_registered(self, node_id: str, address: str, state_name: str, cpu: int, mem: int, labels: dict,
                        gpus: list[tuple]) -> None:
        with self.lock:
            info = self.nodes.get(node_id)
            if info is None:
                self._add_node_locked(node_id, address, NodeState[state_name], cpu, mem, labels, gpus)
            else:
                info.address = address
                info.state = NodeState[state_name]
                self.engine.set_node_schedulable(node_id, info.state in SCHEDULABLE_NODE_STATES)
        self.schedule_pending()

    def set_node_state(self, node_id: str, state_name: str) -> None:
        with self.lock:
            info = self.nodes.get(node_id)
            if info is None:
                return
            info.state = NodeState[state_name]
            self.engine.set_node_schedulable(node_id, info.state in SCHEDULABLE_NODE_STATES)
        if info.state in SCHEDULABLE_NODE_STATES:
            self.schedule_pending()

    def set_gpu_healthy(self, node_id: str, gpu_index: int, healthy: bool) -> None:
        with self.lock:
            if node_id in self.nodes:
                self.engine.set_gpu_healthy(node_id, gpu_index, healthy)
        if healthy:
            self.schedule_pending()

    def set_quota(self, tenant: str, model: str, milli: int) -> None:
        with self.lock:
            self.engine.set_quota(tenant, model, milli)

    def node_free(self) -> dict:
        with self.lock:
            return self.engine.snapshot_free()

    def shutdown(self) -> None:
        self._stop.set()
        with self._dispatch_cv:
            self._dispatch_cv.notify_all()
        self.pauses.stop()


def _is_quota(decision) -> bool:
    return any(getattr(r, "name", "").upper().startswith("QUOTA") for r in (decision.reasons or {}))


def allocation_pb(row: AllocRow, address_of=lambda n: "", explanation: str = "", *,
                  request: common_pb2.PlacementRequest | None = None,
                  into: common_pb2.Allocation | None = None) -> common_pb2.Allocation:
    """The contract's view of ``row``. ``request``: the row's request already decoded (saves parsing
    ``row.request`` again); ``into``: fill this message (a repeated field's element) instead of a new one."""
    a = common_pb2.Allocation() if into is None else into
    a.allocation_id, a.tenant_id, a.request_id = row.allocation_id, row.tenant_id, row.request_id
    a.state, a.reason, a.prepare_attempts, a.version = row.state.value, row.reason, row.prepare_attempts, row.version
    if explanation:
        a.pending_explanation = explanation
    if request is not None:
        a.request.CopyFrom(request)
    else:
        a.request.ParseFromString(row.request)
    store.add_assignments(a.assignments, row.assignments, address_of)
    store.set_ts(a.created_at, row.created_at)
    if row.updated_at == row.created_at:
        a.updated_at.CopyFrom(a.created_at)
    else:
        store.set_ts(a.updated_at, row.updated_at)
    for name in ("running_since", "stopped_at", "lease_expires_at"):
        value = getattr(row, name)
        if value is not None:
            store.set_ts(getattr(a, name), value)
    return a
