"""gRPC servicers of the control plane, hosted by the placement actor.

Handlers authenticate, convert contract messages at the edge, and submit
intents to the core or to a shard. They never change state themselves.
"""
from __future__ import annotations

import base64
import concurrent.futures as cf
import logging
import queue
import threading
import time
import uuid

import ray

from actors import convert, metrics, runtime, store
from actors.placement import PlacementCore, allocation_pb, shard_of
from actors.store import AllocRow
from gpuaas import auth
import functools

import psycopg

from gpuaas import errors as _errors
from gpuaas.errors import FailedPrecondition, GpuaasError, InvalidArgument, NotFound, Unavailable
from gpuaas.lifecycle import AllocState, IllegalTransition
from gpuaas.tail import GapGuard
from gpuaas.v1 import admin_pb2, admin_pb2_grpc, node_pb2, node_pb2_grpc, placement_pb2, placement_pb2_grpc

log = logging.getLogger("gpuaas.api")

PAGE_SIZE_DEFAULT = 100
PAGE_SIZE_MAX = 1000
WATCH_QUEUE_MAX = 10_000


def _db_errors_unavailable(fn):
    """A lost database connection is UNAVAILABLE (retryable), not INTERNAL."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise Unavailable(f"database unavailable ({exc.__class__.__name__}); retry") from None

    return wrapper


def _db_errors_unavailable_stream(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            yield from fn(*args, **kwargs)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise Unavailable(f"database unavailable ({exc.__class__.__name__}); retry") from None

    return wrapper


def grpc_handler(fn):
    inner = _errors.grpc_handler(_db_errors_unavailable(fn))
    method = fn.__name__

    @functools.wraps(fn)
    def wrapper(self, request, context):
        t0 = time.perf_counter()
        try:
            return inner(self, request, context)
        finally:
            metrics.observe_rpc(method, context, time.perf_counter() - t0)

    return wrapper


def grpc_stream_handler(fn):
    inner = _errors.grpc_stream_handler(_db_errors_unavailable_stream(fn))
    method = fn.__name__

    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            yield from inner(self, request, context)
        finally:
            metrics.observe_rpc(method, context, None)

    return wrapper


def _uuid_or_404(allocation_id: str, field: str = "allocation_id") -> str:
    if not allocation_id:
        raise InvalidArgument(f"{field} is required", violations=[(field, "required")])
    try:
        return str(uuid.UUID(allocation_id))
    except ValueError:
        raise InvalidArgument(f"{field} is not a valid id", violations=[(field, "a UUID")]) from None


def _ray_get(ref, timeout_s: float):
    try:
        return ray.get(ref, timeout=timeout_s)
    except GpuaasError:
        raise
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if hasattr(exc, "cause") else None
        if isinstance(cause, GpuaasError):
            raise cause from None
        if isinstance(cause, IllegalTransition):
            raise FailedPrecondition(str(cause)) from None
        raise
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as exc:
        raise Unavailable(f"control-plane component busy or restarting ({exc.__class__.__name__}); retry") from None


class WatchHub:
    """Tails control.allocation_events and fans committed transitions out to streams."""

    def __init__(self, core: PlacementCore, poll_s: float = 0.05):
        self.core = core
        self.poll_s = poll_s
        self._subs: dict[int, tuple[str, set[str], queue.Queue]] = {}
        self._lock = threading.Lock()
        self._next = 0
        self._watermark = None
        self._gaps = GapGuard("allocation event")
        self._stop = threading.Event()
        threading.Thread(target=self._loop, name="watch-hub", daemon=True).start()

    def subscribe(self, tenant: str, ids: set[str], after_event_id: int) -> tuple[int, queue.Queue, list]:
        q: queue.Queue = queue.Queue(maxsize=WATCH_QUEUE_MAX)
        with self._lock:
            self._next += 1
            sid = self._next
            self._subs[sid] = (tenant, ids, q)
            backlog = []
            if after_event_id > 0:
                backlog = self._events_after(after_event_id, self._watermark, tenant)
        return sid, q, backlog

    def unsubscribe(self, sid: int) -> None:
        with self._lock:
            self._subs.pop(sid, None)

    def _events_after(self, after: int, upto, tenant: str | None = None) -> list:
        sql = ("SELECT e.event_id, e.allocation_id, e.from_state, e.to_state, e.reason, e.at, e.tenant_id"
               " FROM control.allocation_events e WHERE e.event_id > %s")
        params: list = [after]
        if upto is not None:
            sql += " AND e.event_id <= %s"
            params.append(upto)
        if tenant is not None:
            sql += " AND e.tenant_id = %s"
            params.append(tenant)
        sql += " ORDER BY e.event_id LIMIT 5000"
        return list(self.core.reader().execute(sql, params))

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                conn = self.core.reader()
                if self._watermark is None:
                    self._watermark = conn.execute(
                        "SELECT coalesce(max(event_id), 0) FROM control.allocation_events").fetchone()[0]
                    continue
                with self._lock:
                    if not self._subs:
                        # Nobody to tell, but the mark still stops before a gap that may fill: a stream
                        # that subscribes next must not start past an event still committing. Without a
                        # gap (the usual case) one row says so; the ids are read only when there is one.
                        n, top = conn.execute("SELECT count(*), max(event_id) FROM control.allocation_events"
                                              " WHERE event_id > %s", (self._watermark,)).fetchone()
                        if n and top - self._watermark == n:
                            self._watermark = top
                        elif n:
                            ids = self._gaps.cut(conn, self._watermark, conn.execute(
                                "SELECT event_id FROM control.allocation_events WHERE event_id > %s"
                                " ORDER BY event_id LIMIT 5000", (self._watermark,)).fetchall())
                            if ids:
                                self._watermark = ids[-1][0]
                        continue
                # Never past an event id whose transaction may still commit: a stream would miss it.
                rows = self._gaps.cut(conn, self._watermark, self._events_after(self._watermark, None))
                if not rows:
                    continue
                with self._lock:
                    subs = list(self._subs.items())
                    self._watermark = rows[-1][0]
                for row in rows:
                    for sid, (tenant, ids, q) in subs:
                        if row[6] == tenant and (not ids or str(row[1]) in ids):
                            try:
                                q.put_nowait(row)
                            except queue.Full:
                                q.put(None)  # tell the stream it fell behind
                                self.unsubscribe(sid)
            except Exception as exc:  # noqa: BLE001
                log.warning("watch poll failed: %s", exc)
                time.sleep(0.5)

    def to_event(self, row) -> placement_pb2.AllocationEvent:
        event_id, aid, src, dst, reason, at, _ = row
        ev = placement_pb2.AllocationEvent(
            event_id=event_id, allocation_id=str(aid),
            from_state=AllocState[src].value if src else 0, to_state=AllocState[dst].value, reason=reason)
        ev.at.FromDatetime(at)
        snap = store.load_allocation(self.core.reader(), str(aid))
        if snap is not None:
            ev.allocation.CopyFrom(allocation_pb(snap, self.core.address_of))
        return ev


class PlacementServicer(placement_pb2_grpc.PlacementServiceServicer):
    def __init__(self, core: PlacementCore, authn: auth.Authenticator, hub: WatchHub):
        self.core, self.authn, self.hub = core, authn, hub
        # Release calls to each allocation shard: one actor call in flight per shard, the releases that
        # arrive meanwhile go together in the next (runtime.Combiner).
        self.release_calls = [runtime.Combiner(functools.partial(self._release_owned_many, shard),
                                               name=f"release-calls-{i}") for i, shard in enumerate(core.alloc_shards)]
        # Releases that overtook their hand-off are the placement actor's own, settled in one commit each
        # group (PlacementCore.release_before_handoff).
        self.release_before_handoff = runtime.Combiner(core.release_before_handoff, name="release-before-handoff")

    def _release_owned_many(self, shard, items: list[tuple[str, str]]) -> list:
        return _ray_get(shard.release_owned_many.remote(items),
                        self.core.cfg.rpc_timeout_s * 2 + len(items) * 0.002)

    def _principal(self, context) -> auth.Principal:
        p = self.authn.authenticate(context.invocation_metadata())
        p.require("placement")
        return p

    def _answer(self, fut, request, into, timeout_s: float = 30.0) -> bool:
        """Fill ``into`` with the allocation ``fut`` settles on; True when it already existed."""
        kind, value = fut.result(timeout=timeout_s)
        if kind == "new":
            allocation_pb(value, self.core.address_of, request=request, into=into)
            return False
        row = store.load_allocation(self.core.reader(), value)
        if row is None:
            raise Unavailable("allocation is being committed; retry")
        allocation_pb(row, self.core.address_of, into=into)
        return True

    @grpc_handler
    def Place(self, request, context):
        t0 = time.perf_counter()
        p = self._principal(context)
        [fut] = self.core.submit(p.tenant_id, [request.request])
        out = placement_pb2.PlaceResponse()
        out.existing = self._answer(fut, request.request, out.allocation)
        self.core.place_latency.append(time.perf_counter() - t0)
        return out

    @grpc_handler
    def PlaceBatch(self, request, context):
        p = self._principal(context)
        n = len(request.requests)
        if n == 0 or n > self.core.cfg.place_batch_items_max:
            raise InvalidArgument("bad batch size", violations=[
                ("requests", f"1..{self.core.cfg.place_batch_items_max} items; got {n}")])
        reqs = list(request.requests)
        futs = self.core.submit(p.tenant_id, reqs)
        out = placement_pb2.PlaceBatchResponse()
        for fut, req in zip(futs, reqs):
            item = out.results.add()
            try:
                item.existing = self._answer(fut, req, item.allocation)
            except GpuaasError as err:
                item.ClearField("allocation")
                item.error.CopyFrom(err.to_status())
        return out

    def _owned(self, tenant: str, allocation_id: str):
        aid = _uuid_or_404(allocation_id)
        row = store.load_allocation(self.core.reader(), aid)
        if row is None or row.tenant_id != tenant:
            # Another tenant's allocation is indistinguishable from a missing one.
            raise NotFound(f"allocation {allocation_id} not found")
        return row

    @grpc_handler
    def Release(self, request, context):
        p = self._principal(context)
        aid = _uuid_or_404(request.allocation_id)
        shards = self.core.alloc_shards
        if self.core.owner_tenant.get(aid) == p.tenant_id:
            row = None
            if self.core.handoff_waits(aid):
                # Released before its hand-off went out: this actor settles it, no shard involved
                # (PlacementCore.release_before_handoff); releases arriving together share a commit.
                try:
                    row = self.release_before_handoff.submit((aid, p.tenant_id)).result(
                        self.core.cfg.rpc_timeout_s * 3)
                except cf.TimeoutError:
                    raise Unavailable("placement actor busy; retry") from None
            if row is None:
                # The caller's own and in the capacity view: its shard releases it (from its live row,
                # or, when the release overtakes the hand-off, from one read of its own) and answers
                # with the row after the release, with no read of Postgres on this side.
                fut = self.release_calls[shard_of(aid, len(shards))].submit((aid, p.tenant_id))
                try:
                    row = fut.result(self.core.cfg.rpc_timeout_s * 3)
                except cf.TimeoutError:
                    raise Unavailable("allocation shard busy; retry") from None
            if row is not None:
                return placement_pb2.ReleaseResponse(allocation=allocation_pb(row, self.core.address_of))
        row = self._owned(p.tenant_id, aid)
        if row.state is AllocState.QUEUED:
            new = self.core.cancel_queued(row.allocation_id)
            if new is not None:
                return placement_pb2.ReleaseResponse(allocation=allocation_pb(new, self.core.address_of))
            row = self._owned(p.tenant_id, aid)
        if row.state in (AllocState.PLACED, AllocState.RUNNING):
            _ray_get(shards[shard_of(aid, len(shards))].release.remote(aid, "release_requested"),
                     self.core.cfg.rpc_timeout_s * 2)
            row = self._owned(p.tenant_id, aid)
            if row.state is AllocState.QUEUED:
                # Its prepare failed meanwhile and it went back to the queue: cancel it there (if it
                # is not in the queue yet, it is answered QUEUED and a second Release cancels it).
                row = self.core.cancel_queued(row.allocation_id) or row
        # Already releasing, released, failed or cancelled: the release is answered as is (idempotent).
        return placement_pb2.ReleaseResponse(allocation=allocation_pb(row, self.core.address_of))

    @grpc_handler
    def ReleaseBatch(self, request, context):
        p = self._principal(context)
        n = len(request.allocation_ids)
        limit = self.core.cfg.place_batch_items_max  # the same bound as PlaceBatch: one batch placed, one released
        if n == 0 or n > limit:
            raise InvalidArgument("bad batch size", violations=[("allocation_ids", f"1..{limit} items; got {n}")])
        ids: list[str | None] = []
        refused: dict[int, GpuaasError] = {}
        for i, raw in enumerate(request.allocation_ids):
            try:
                ids.append(_uuid_or_404(raw, f"allocation_ids[{i}]"))
            except GpuaasError as err:
                ids.append(None)
                refused[i] = err
        # Released before their hand-off went out: settled by this actor in one commit, with no read.
        mine = [a for a in dict.fromkeys(ids) if a and self.core.owner_tenant.get(a) == p.tenant_id]
        rows = {a: r for a, r in zip(mine, self.core.release_before_handoff([(a, p.tenant_id) for a in mine]))
                if r is not None}
        rows.update(self._owned_many(p.tenant_id, {a for a in ids if a and a not in rows}))
        # QUEUED → CANCELLED here; one that left the queue meanwhile is read again and released below.
        moved = []
        for aid in [a for a, row in rows.items() if row.state is AllocState.QUEUED]:
            new = self.core.cancel_queued(aid)
            if new is None:
                moved.append(aid)
            else:
                rows[aid] = new
        rows.update(self._owned_many(p.tenant_id, moved))
        shards = self.core.alloc_shards
        groups: dict[int, list[str]] = {}
        for aid, row in rows.items():
            if row.state in (AllocState.PLACED, AllocState.RUNNING):
                groups.setdefault(shard_of(aid, len(shards)), []).append(aid)
        # Every shard releases its group at once, all with billing stopped at the same instant.
        at = store.utcnow().isoformat()
        refs = {k: shards[k].release_many.remote(aids, "release_requested", at) for k, aids in groups.items()}
        item_error: dict[str, bytes | GpuaasError] = {}
        reread: list[str] = []
        timeout_s = self.core.cfg.rpc_timeout_s * 2 + n * 0.002
        for k, ref in refs.items():
            try:
                answers = _ray_get(ref, timeout_s)
            except GpuaasError as err:
                answers = [err] * len(groups[k])
            for aid, ans in zip(groups[k], answers):
                if isinstance(ans, AllocRow):
                    rows[aid] = ans
                elif ans is None:
                    reread.append(aid)  # moved concurrently: as Postgres has it now
                else:
                    item_error[aid] = ans
        rows.update(self._owned_many(p.tenant_id, reread))
        for aid in [a for g in groups.values() for a in g if a in rows and rows[a].state is AllocState.QUEUED]:
            rows[aid] = self.core.cancel_queued(aid) or rows[aid]  # its prepare failed meanwhile, as in Release
        out = placement_pb2.ReleaseBatchResponse()
        for i, aid in enumerate(ids):
            item = out.results.add()
            err = refused.get(i) or item_error.get(aid)
            if err is None and aid not in rows:
                err = NotFound(f"allocation {request.allocation_ids[i]} not found")
            if err is None:
                allocation_pb(rows[aid], self.core.address_of, into=item.allocation)
            elif isinstance(err, bytes):
                item.error.ParseFromString(err)
            else:
                item.error.CopyFrom(err.to_status())
        return out

    def _owned_many(self, tenant: str, ids) -> dict:
        """The caller's allocations among ``ids``, by id, in one query (others' are simply absent)."""
        ids = list(ids)
        if not ids:
            return {}
        rows = store.load_allocations(self.core.reader(), "allocation_id = ANY(%b::uuid[]) AND tenant_id = %s",
                                      (ids, tenant))
        return {r.allocation_id: r for r in rows}

    @grpc_handler
    def GetAllocation(self, request, context):
        p = self._principal(context)
        row = self._owned(p.tenant_id, request.allocation_id)
        explanation = ""
        if row.state is AllocState.QUEUED:
            # Why it waits: the engine's explanation, or the preemption it is waiting on.
            explanation = self.core.pending_explanation(row)
        return allocation_pb(row, self.core.address_of, explanation)

    @grpc_handler
    def ListAllocations(self, request, context):
        p = self._principal(context)
        size = request.page_size or PAGE_SIZE_DEFAULT
        if not 1 <= size <= PAGE_SIZE_MAX:
            raise InvalidArgument("bad page size", violations=[("page_size", f"1..{PAGE_SIZE_MAX} (0 means 100)")])
        states = []
        for s in request.states:
            if s not in AllocState._value2member_map_:
                raise InvalidArgument("bad state filter", violations=[("states", f"unknown state {s}")])
            states.append(AllocState(s).name)
        where, params = "tenant_id = %s", [p.tenant_id]
        if states:
            where += " AND state = ANY(%s)"
            params.append(states)
        if request.page_token:
            try:
                created, aid = base64.urlsafe_b64decode(request.page_token.encode()).decode().split("|")
                uuid.UUID(aid)
            except Exception:  # noqa: BLE001
                raise InvalidArgument("bad page token", violations=[("page_token", "use next_page_token")]) from None
            where += " AND (created_at, allocation_id) > (%s::timestamptz, %s::uuid)"
            params += [created, aid]
        rows = store.load_allocations(self.core.reader(), where + " ORDER BY created_at, allocation_id LIMIT %s",
                                      tuple(params + [size + 1]))
        out = placement_pb2.ListAllocationsResponse(
            allocations=[allocation_pb(r, self.core.address_of) for r in rows[:size]])
        if len(rows) > size:
            last = rows[size - 1]
            out.next_page_token = base64.urlsafe_b64encode(
                f"{last.created_at.isoformat()}|{last.allocation_id}".encode()).decode()
        return out

    @grpc_stream_handler
    def WatchAllocations(self, request, context):
        p = self._principal(context)
        ids = {_uuid_or_404(a, "allocation_ids") for a in request.allocation_ids}
        if request.after_event_id < 0:
            raise InvalidArgument("bad cursor", violations=[("after_event_id", "must not be negative")])
        sid, q, backlog = self.hub.subscribe(p.tenant_id, ids, request.after_event_id)
        try:
            for row in backlog:
                if not ids or str(row[1]) in ids:
                    yield self.hub.to_event(row)
            while context.is_active():
                try:
                    row = q.get(timeout=0.5)
                except queue.Empty:
                    continue
                if row is None:
                    from gpuaas.errors import ResourceExhausted
                    raise ResourceExhausted("watch stream fell behind; resume with after_event_id")
                yield self.hub.to_event(row)
        finally:
            self.hub.unsubscribe(sid)


class NodeRegistryServicer(node_pb2_grpc.NodeRegistryServicer):
    def __init__(self, core: PlacementCore, authn: auth.Authenticator):
        self.core, self.authn = core, authn

    @grpc_handler
    def Register(self, request, context):
        self.authn.authenticate(context.invocation_metadata()).require("node")
        inv = request.inventory
        convert.validate_inventory(inv, request.agent_address)
        node_id = inv.node_name
        shard = self.core.node_shards[shard_of(node_id, len(self.core.node_shards))]
        state_name, orphans, gstates = _ray_get(shard.register.remote(node_id, request.agent_address,
                                                                      inv.SerializeToString()),
                                                self.core.cfg.rpc_timeout_s * 2)
        gpus = [(g.index, g.model, g.memory_mib, g.nvlink_island, gstates.get(g.index, "READY")) for g in inv.gpus]
        self.core.node_registered(node_id, request.agent_address, state_name, inv.cpu_milli, inv.memory_mib,
                                  dict(inv.labels), gpus)
        log.info("node %s registered at %s (%s, %d GPUs) → %s", node_id, request.agent_address, inv.backend,
                 len(inv.gpus), state_name)
        from gpuaas.lifecycle import NodeState
        return node_pb2.RegisterNodeResponse(node_id=node_id, state=NodeState[state_name].value,
                                             telemetry_interval_ms=self.core.cfg.telemetry_interval_ms,
                                             orphaned_allocation_ids=orphans)

    @grpc_handler
    def Deregister(self, request, context):
        self.authn.authenticate(context.invocation_metadata()).require("node")
        if request.node_id not in self.core.nodes:
            raise NotFound(f"node {request.node_id} not found")
        shard = self.core.node_shards[shard_of(request.node_id, len(self.core.node_shards))]
        state_name = _ray_get(shard.deregister.remote(request.node_id, request.reason or "deregistered"),
                              self.core.cfg.rpc_timeout_s * 2)
        from gpuaas.lifecycle import NodeState
        return node_pb2.DeregisterNodeResponse(state=NodeState[state_name].value)


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, core: PlacementCore, authn: auth.Authenticator, owner_url: str | None):
        self.core, self.authn, self.owner_url = core, authn, owner_url

    def _admin(self, context) -> auth.Principal:
        p = self.authn.authenticate(context.invocation_metadata())
        p.require("admin")
        return p

    def _node_shard(self, node_id: str):
        if node_id not in self.core.nodes:
            raise NotFound(f"node {node_id} not found")
        return self.core.node_shards[shard_of(node_id, len(self.core.node_shards))]

    def _status(self, node_id: str) -> admin_pb2.NodeStatus:
        conn = self.core.reader()
        r = conn.execute("SELECT node_id, state, address, simulated, last_seen_at FROM control.nodes"
                         " WHERE node_id = %s", (node_id,)).fetchone()
        if r is None:
            raise NotFound(f"node {node_id} not found")
        from gpuaas.lifecycle import GpuState, NodeState
        st = admin_pb2.NodeStatus(node_id=r[0], node_name=r[0], state=NodeState[r[1]].value, address=r[2],
                                  simulated=r[3])
        if r[4]:
            st.last_seen.FromDatetime(r[4])
        free = self.core.node_free().get(node_id, {})
        gfree = free.get("gpu_milli", []) if isinstance(free, dict) else []
        for idx, model, state in conn.execute("SELECT gpu_index, model, state FROM control.gpus WHERE node_id=%s"
                                              " ORDER BY gpu_index", (node_id,)):
            st.gpus.add(index=idx, model=model, state=GpuState[state].value,
                        free_milli=int(gfree[idx]) if idx < len(gfree) else 0)
        return st

    @grpc_handler
    def ListNodes(self, request, context):
        self._admin(context)
        ids = [r[0] for r in self.core.reader().execute("SELECT node_id FROM control.nodes ORDER BY node_id")]
        return admin_pb2.ListNodesResponse(nodes=[self._status(n) for n in ids])

    def _node_action(self, context, request, action: str):
        self._admin(context)
        shard = self._node_shard(request.node_id)
        _ray_get(getattr(shard, "operator").remote(request.node_id, action, request.reason or action),
                 self.core.cfg.rpc_timeout_s * 2)
        return self._status(request.node_id)

    @grpc_handler
    def CordonNode(self, request, context):
        return self._node_action(context, request, "cordon")

    @grpc_handler
    def UncordonNode(self, request, context):
        return self._node_action(context, request, "uncordon")

    @grpc_handler
    def DrainNode(self, request, context):
        return self._node_action(context, request, "drain")

    @grpc_handler
    def ClearNode(self, request, context):
        return self._node_action(context, request, "clear")

    @grpc_handler
    def ClearGpu(self, request, context):
        self._admin(context)
        if request.gpu_index < 0:
            raise InvalidArgument(f"gpu_index must be >= 0, got {request.gpu_index}")
        shard = self._node_shard(request.node_id)
        _ray_get(shard.clear_gpu.remote(request.node_id, request.gpu_index, request.reason or "operator cleared"),
                 self.core.cfg.rpc_timeout_s * 2)
        return self._status(request.node_id)

    @grpc_handler
    def ResolveAllocation(self, request, context):
        self._admin(context)
        aid = _uuid_or_404(request.allocation_id)
        row = store.load_allocation(self.core.reader(), aid)
        if row is None:
            raise NotFound(f"allocation {aid} not found")
        shard = self.core.alloc_shards[shard_of(aid, len(self.core.alloc_shards))]
        _ray_get(shard.resolve.remote(aid, request.note or "operator resolved"), self.core.cfg.rpc_timeout_s * 2)
        return allocation_pb(store.load_allocation(self.core.reader(), aid), self.core.address_of)

    @grpc_handler
    def CreateTenant(self, request, context):
        self._admin(context)
        with self.core.reader().transaction():
            auth.create_tenant(self.core.reader(), request.tenant_id, request.name)
        return admin_pb2.Tenant(tenant_id=request.tenant_id, name=request.name or request.tenant_id)

    @grpc_handler
    def CreateToken(self, request, context):
        self._admin(context)
        with self.core.reader().transaction():
            token_id, secret = auth.create_token(self.core.reader(), request.tenant_id, request.scopes,
                                                 request.ttl_s)
        return admin_pb2.CreateTokenResponse(token_id=token_id, secret=secret)

    @grpc_handler
    def RevokeToken(self, request, context):
        self._admin(context)
        auth.revoke_token(self.core.reader(), request.token_id)
        return admin_pb2.RevokeTokenResponse()

    @grpc_handler
    def SetQuota(self, request, context):
        self._admin(context)
        q = request.quota
        v = []
        if not q.tenant_id:
            v.append(("quota.tenant_id", "required"))
        if not q.gpu_model:
            v.append(("quota.gpu_model", "a model or '*'"))
        if q.gpu_milli_max < 0:
            v.append(("quota.gpu_milli_max", "must not be negative"))
        if v:
            raise InvalidArgument("invalid quota", violations=v)
        conn = self.core.reader()
        if conn.execute("SELECT 1 FROM iam.tenants WHERE tenant_id=%s", (q.tenant_id,)).fetchone() is None:
            raise NotFound(f"tenant {q.tenant_id} not found")
        conn.execute("INSERT INTO iam.quotas (tenant_id, gpu_model, gpu_milli_max) VALUES (%s,%s,%s)"
                     " ON CONFLICT (tenant_id, gpu_model) DO UPDATE SET gpu_milli_max = EXCLUDED.gpu_milli_max,"
                     " updated_at = now()", (q.tenant_id, q.gpu_model, q.gpu_milli_max))
        self.core.set_quota(q.tenant_id, q.gpu_model, q.gpu_milli_max)
        return q

    @grpc_handler
    def ListQuotas(self, request, context):
        self._admin(context)
        rows = self.core.reader().execute(
            "SELECT tenant_id, gpu_model, gpu_milli_max FROM iam.quotas WHERE (%s = '' OR tenant_id = %s)"
            " ORDER BY 1, 2", (request.tenant_id, request.tenant_id))
        return admin_pb2.ListQuotasResponse(quotas=[admin_pb2.Quota(tenant_id=t, gpu_model=m, gpu_milli_max=x)
                                                    for t, m, x in rows])

    @grpc_handler
    def VerifyLedger(self, request, context):
        self._admin(context)
        from ledger import verify
        res = verify.verify(self.owner_url or self.core.app_url)
        return admin_pb2.VerifyLedgerResponse(ok=res.ok, entries_checked=res.entries_checked,
                                              first_bad=str(res.first_bad or ""), message=res.message)
