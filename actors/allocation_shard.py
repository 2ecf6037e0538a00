"""AllocationShard: drives allocations from PLACED to their end.

Each shard owns the allocations whose id hashes to it (virtual-actor style):
prepare on the nodes (PLACED → RUNNING, billing starts), release, lease
expiry, node loss / GPU fault (→ FAILED, billing stops at detection), cleanup
with exponential backoff + jitter (RELEASING → RELEASED or RELEASE_FAILED),
and the operator's resolve. Every change goes through store.transition_allocation.
On restart it resumes in-flight work from Postgres, backoff timers included.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import heapq
import logging
import time

import grpc
import ray

from actors import runtime, store
from actors.placement import shard_of
from actors.store import AllocRow, utcnow
from gpuaas.config import ControlPlaneConfig
from gpuaas.errors import FailedPrecondition, GpuaasError, Unavailable
from gpuaas.lifecycle import AllocEvent, AllocState, IllegalTransition
from gpuaas.v1 import common_pb2, node_pb2

log = logging.getLogger("gpuaas.allocations")

ACTIVE = ("PLACED", "RUNNING", "RELEASING", "FAILED", "RELEASE_FAILED")
PREPARE_BATCH_MAX = 4096  # the NodeAgent contract's bound on one PrepareBatch
CLEANUP_BATCH_MAX = 4096  # and on one CleanupBatch
SCAN_EVERY_S = 1.0  # supervisor and lease pass over the shard's rows


# What a Prepare can fail with that counts as the node refusing it (an attempt): anything else is a bug.
PREPARE_ERRORS = (grpc.RpcError, KeyError, RuntimeError, asyncio.TimeoutError)


class _Rows(dict):
    """allocation id → its cached row, with the two indexes the once-a-second pass needs, so that the
    pass costs what is due, not a walk over every RUNNING allocation of the shard:

    - ``waiting``: the rows that are not RUNNING (PLACED, RELEASING, FAILED, …: the supervisor's work);
    - ``leases``: a heap of (lease end, id) of RUNNING rows. An entry whose row has moved on (released,
      lease renewed) is dropped when it comes up. Rows are replaced, never changed in place, so every
      change passes through here."""

    def __init__(self):
        super().__init__()
        self.waiting: set[str] = set()
        self.leases: list[tuple] = []

    def __setitem__(self, aid: str, row: AllocRow) -> None:
        super().__setitem__(aid, row)
        if row.state is AllocState.RUNNING:
            self.waiting.discard(aid)
            if row.lease_expires_at is not None:
                heapq.heappush(self.leases, (row.lease_expires_at, aid))
        else:
            self.waiting.add(aid)

    def pop(self, aid: str, *default):
        self.waiting.discard(aid)
        return super().pop(aid, *default)

    def __delitem__(self, aid: str) -> None:
        self.waiting.discard(aid)
        super().__delitem__(aid)

    def due_leases(self, now) -> list[tuple[str, object]]:
        """(id, lease end) of the RUNNING rows whose lease has ended by ``now``; taken off the heap."""
        out, seen = [], set()
        while self.leases and self.leases[0][0] <= now:
            at, aid = heapq.heappop(self.leases)
            row = self.get(aid)
            if row is not None and row.state is AllocState.RUNNING and row.lease_expires_at == at \
                    and aid not in seen:  # the same row stored twice pushes its lease twice
                seen.add(aid)
                out.append((aid, at))
        return out

    def lease_again(self, aid: str, at) -> None:
        """Put a due lease back (its release did not go through; the next pass tries again)."""
        heapq.heappush(self.leases, (at, aid))


def _still_placed(conn, ids: list[str], versions: list[int]) -> set[str]:
    """Those of ``ids`` whose row is PLACED at exactly the paired version."""
    return {str(r[0]) for r in conn.execute(
        "SELECT a.allocation_id FROM unnest(%b::uuid[], %b::bigint[]) AS k(id, v)"
        " JOIN control.allocations a ON a.allocation_id = k.id AND a.version = k.v AND a.state = 'PLACED'",
        (ids, versions))}


def _refusal(aid: str, exc: BaseException) -> GpuaasError:
    """A failed release of one allocation of a group, as the error its caller answers with."""
    if isinstance(exc, GpuaasError):
        return exc
    if isinstance(exc, IllegalTransition):
        return FailedPrecondition(str(exc))
    log.error("release of %s failed: %r", aid, exc)
    return Unavailable(f"release of {aid} failed ({exc.__class__.__name__}); retry")


class AllocationShardCore:
    def __init__(self, *, index: int, count: int, app_url: str, config: ControlPlaneConfig):
        self.index, self.count, self.cfg = index, count, config
        # Every statement of this connection is by key, by arrays of keys, or has no parameters, so one
        # plan per statement serves every call (store.GROUP_WRITER_OPTIONS): its group transitions
        # (PLACED → RUNNING, releases) no longer pay for planning at each commit.
        self.db = runtime.DbThread(app_url, f"alloc{index}", options=store.GROUP_WRITER_OPTIONS)
        self.agents = runtime.AgentStubs()
        self.rows = _Rows()
        self.locks: dict[str, asyncio.Lock] = {}
        self.addresses: dict[str, str] = {}
        self.nodes_down: set[str] = set()
        self.tasks: dict[str, asyncio.Task] = {}
        self.uncertain: set[str] = set()  # rows whose last write may or may not have committed
        self.stats = {"prepared": 0, "prepare_failures": 0, "released": 0, "cleanup_failures": 0, "failed": 0,
                      "lease_expired": 0, "commits": 0, "cleanups_not_sent": 0, "cleanups_after_release_race": 0}
        self._tx_pending: list[tuple] = []
        # One PrepareBatch / CleanupBatch per node for what is queued together (runtime.NodeBatcher).
        self.prepares = runtime.NodeBatcher(self.agents, single="Prepare", batch="PrepareBatch",
                                            batch_request=node_pb2.PrepareBatchRequest, max_items=PREPARE_BATCH_MAX,
                                            timeout_s=config.rpc_timeout_s)
        self.cleanups = runtime.NodeBatcher(self.agents, single="Cleanup", batch="CleanupBatch",
                                            batch_request=node_pb2.CleanupBatchRequest, max_items=CLEANUP_BATCH_MAX,
                                            timeout_s=config.rpc_timeout_s)
        self._freed_pending: list[str] = []
        self._preparing: dict[str, asyncio.Task] = {}
        self._tx_flusher: asyncio.Task | None = None
        self._addr_read: asyncio.Task | None = None
        # Allocations a node may hold: every live one this shard found active when it started (an
        # earlier incarnation may have prepared it), and every one it has sent a Prepare for since;
        # an id leaves when its row leaves the shard. Any other allocation (with no failed attempt
        # counted) was never sent to a node: its cleanup needs no call to the nodes (_on_nodes).
        self._sent: set[str] = set()
        # Releases committing PLACED → RELEASED with no Prepare sent: none may start for them meanwhile.
        self._releasing_unsent: set[str] = set()
        self._placement = None
        self.gc = runtime.GcPacer()

    # ------------------------------------------------------------ plumbing

    def placement(self):
        if self._placement is None:
            self._placement = ray.get_actor(runtime.PLACEMENT, namespace=runtime.NAMESPACE)
        return self._placement

    def node_shard(self, node_id: str):
        n = self.cfg.node_shards
        return ray.get_actor(runtime.node_shard_name(shard_of(node_id, n)), namespace=runtime.NAMESPACE)

    def _lock(self, aid: str) -> asyncio.Lock:
        lk = self.locks.get(aid)
        if lk is None:
            lk = self.locks[aid] = asyncio.Lock()
        return lk

    def _spawn(self, aid: str, coro) -> None:
        old = self.tasks.get(aid)
        if old is not None and not old.done():
            if old is self._preparing.get(aid):
                # A prepare is never cut off: its replicas may be on the wire or queued for a
                # PrepareBatch. It finishes (and sees the new state), and the cleanup that
                # replaces it waits for it first, so a late Prepare cannot leave an orphan.
                pass
            else:
                old.cancel()
        t = asyncio.get_running_loop().create_task(coro)
        self.tasks[aid] = t
        t.add_done_callback(lambda _t, a=aid: self.tasks.pop(a, None) if self.tasks.get(a) is _t else None)

    async def _transition(self, aid: str, event: AllocEvent | tuple, **kw) -> AllocRow | None:
        """Apply one edge (or a chain of edges, see store.transition_allocations) to the cached row; on
        a version conflict reload and give up.

        Transitions requested while a commit is in flight are written together
        in the next one (group commit: one statement, its own transaction, updating
        the rows and writing their events and outbox messages), each still
        version-checked on its own.
        """
        row = self.rows.get(aid)
        if row is None:
            return None
        fut = self._queue_transition(aid, row, event, kw)
        await asyncio.wait([fut])
        return await self._settle(aid, fut)

    async def _transition_many(self, items: list[tuple[str, AllocEvent, dict]]) -> list:
        """_transition for several allocations at once: their edges join the same group commit. Per
        item: the new row, or None (not held; moved concurrently, and reloaded; the commit's outcome
        unknown, and reloaded on the next tick; or failed, and logged)."""
        futs = []
        for aid, event, kw in items:
            row = self.rows.get(aid)
            futs.append(None if row is None else self._queue_transition(aid, row, event, kw))
        pending = [f for f in futs if f is not None]
        if pending:
            await asyncio.wait(pending)
        out = []
        for (aid, event, _), fut in zip(items, futs):
            try:
                out.append(None if fut is None else await self._settle(aid, fut))
            except Exception as exc:  # noqa: BLE001 - this item alone
                if not isinstance(exc, Unavailable):
                    log.error("%s of %s failed: %r", event.value, aid, exc)
                out.append(None)
        return out

    def _queue_transition(self, aid: str, row: AllocRow, event: AllocEvent, kw: dict) -> asyncio.Future:
        """Queue an edge for the next group commit: a future of the new row."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._tx_pending.append((aid, row, event, kw, fut))
        if self._tx_flusher is None or self._tx_flusher.done():
            self._tx_flusher = loop.create_task(self._flush_transitions())
        return fut

    async def _settle(self, aid: str, fut: asyncio.Future) -> AllocRow | None:
        """The cached row after a committed edge: the new row, or None after a version conflict (the
        row is reloaded). Unavailable (the commit's outcome unknown) marks the row for a reload on the
        next tick and is raised, as is any other failure."""
        exc = fut.exception()
        if isinstance(exc, Unavailable):
            self.uncertain.add(aid)
            raise exc
        if isinstance(exc, FailedPrecondition):
            fresh = await self.db.tx(store.load_allocation, aid)
            self._keep(aid, fresh)
            log.warning("allocation %s moved concurrently; now %s", aid, fresh.state.name if fresh else "gone")
            return None
        if exc is not None:
            raise exc
        new = fut.result()
        self._keep(aid, new)
        return new

    def _keep(self, aid: str, row: AllocRow | None) -> None:
        """Hold ``row`` as the allocation's live row, or let it go when it is no longer the shard's:
        finished, or back in the placement actor's queue (after a version conflict too: a row read
        beforehand may have finished meanwhile)."""
        if row is not None and row.state not in (AllocState.RELEASED, AllocState.CANCELLED, AllocState.QUEUED):
            self.rows[aid] = row
            return
        if row is None and aid not in self.rows:
            return
        self.rows.pop(aid, None)
        self.locks.pop(aid, None)
        # Back in the queue after a failed Prepare, its row counts the attempt (_on_nodes).
        self._sent.discard(aid)

    def _free_soon(self, aid: str) -> None:
        """Tell the placement actor the capacity is back; releases finishing in one loop turn share one
        call. Fire and forget, and never queued behind a call in flight: a capacity_freed runs the
        placement actor's queue pass, so waiting for one call's answer before sending the next (tried)
        held freed capacity back for as long as that pass took. A lost call is the reconcile pass's."""
        self._freed_pending.append(aid)
        if len(self._freed_pending) == 1:
            asyncio.get_running_loop().call_soon(self._flush_freed)

    def _flush_freed(self) -> None:
        ids, self._freed_pending = self._freed_pending, []
        if ids:
            self.placement().capacity_freed.remote(ids, False)

    async def _flush_transitions(self) -> None:
        await asyncio.sleep(0)  # let the callers woken in this loop turn join the batch
        while self._tx_pending:
            batch, seen, later = [], set(), []
            for item in self._tx_pending:
                # One edge per allocation per commit: a second one waits for the first's new version.
                (later if item[0] in seen or len(batch) >= self.cfg.batch_size_max else batch).append(item)
                seen.add(item[0])
            self._tx_pending = later
            try:
                # One statement (state, events, outbox), its own transaction: one round trip.
                results = await self.db.statement(store.transition_allocations,
                                                  [(r, e, kw) for _, r, e, kw, _ in batch])
            except Exception as exc:  # noqa: BLE001 - every caller in the batch gets the commit's failure
                results = [exc] * len(batch)
            runtime.settle([item[4] for item in batch], results)
            self.stats["commits"] += 1

    async def _load_addresses(self, conn_fn=None) -> dict:
        """Node addresses and which nodes are down; returns {node_id: detected_at} of OFFLINE nodes."""
        rows = await self.db.tx(lambda c: c.execute(
            "SELECT node_id, address, state, updated_at FROM control.nodes").fetchall())
        offline = {}
        for node_id, address, state, updated_at in rows:
            self.addresses[node_id] = address
            if state == "OFFLINE":
                self.nodes_down.add(node_id)
                offline[node_id] = updated_at
        return offline

    async def _know_addresses(self, node_ids) -> None:
        """Learn the address of any of these nodes this shard has not heard of: a node registered
        after the shard loaded the addresses, whose node_ready is still on its way, is read from
        Postgres (one read, shared by the callers that miss at the same time). A node still unknown
        after it fails its caller's lookup (KeyError), as before."""
        if all(n in self.addresses for n in node_ids):
            return
        if self._addr_read is None or self._addr_read.done():
            self._addr_read = asyncio.get_running_loop().create_task(self.db.tx(lambda c: c.execute(
                "SELECT node_id, address FROM control.nodes").fetchall()))
        try:
            rows = await asyncio.shield(self._addr_read)
        except Exception as exc:  # noqa: BLE001 - the lookup that follows fails as it would have
            log.warning("reading node addresses failed: %s", exc)
            return
        for node_id, address in rows:
            self.addresses.setdefault(node_id, address)  # a known address changes only by node_ready

    # ------------------------------------------------------------ start / resume

    async def start(self) -> dict:
        offline = await self._load_addresses()
        bad_gpus = dict(((n, i), at) for n, i, at in await self.db.tx(lambda c: c.execute(
            "SELECT node_id, gpu_index, updated_at FROM control.gpus WHERE state = 'UNHEALTHY'").fetchall()))
        rows = await self.db.tx(store.load_allocations, "state = ANY(%s)", (list(ACTIVE),))
        mine = [r for r in rows if shard_of(r.allocation_id, self.count) == self.index]
        for r in mine:
            self.rows[r.allocation_id] = r
            self._sent.add(r.allocation_id)
        # A node lost or a GPU fault detected while this shard was down (its
        # fail_on_node call died with it): fail those RUNNING allocations now,
        # billing stopped at the persisted detection time.
        for r in mine:
            if r.state is not AllocState.RUNNING:
                continue
            lost = sorted(offline[n] for n in r.node_ids() if n in offline)
            faulty = sorted(bad_gpus[(a["node_id"], i)] for a in r.assignments for i in a["gpu_indices"]
                            if (a["node_id"], i) in bad_gpus)
            if lost or faulty:
                event = AllocEvent.NODE_LOST if lost else AllocEvent.GPU_FAULT
                at = max((lost or faulty)[0], r.running_since) if r.running_since else (lost or faulty)[0]
                new = await self._transition(r.allocation_id, event, at=at, reason=f"{event.value} (found on resume)")
                if new is not None:
                    self.stats["failed"] += 1
        placed = []
        for r in [self.rows[a] for a in list(self.rows)]:
            if r.state is AllocState.PLACED:
                placed.append(r.allocation_id)
            elif r.state is AllocState.RELEASING:
                self._spawn(r.allocation_id, self._cleanup(r.allocation_id))
            elif r.state is AllocState.FAILED and not (r.node_ids() & self.nodes_down):
                self._spawn(r.allocation_id, self._cleanup(r.allocation_id))
        self._spawn_prepares(placed)
        asyncio.get_running_loop().create_task(self._tick_loop())
        log.info("allocation shard %d/%d resumed %d allocations", self.index, self.count, len(mine))
        return {"resumed": len(mine)}

    async def adopt(self, items: list[tuple]) -> int:
        """Take PLACED allocations from the placement actor and prepare them.

        ``items``: (allocation id, {node id: daemon address}[, committed row]). The placement actor
        sends the row it has just committed; an item without one is read from Postgres. A sent row is
        used only while Postgres still holds that very version in PLACED: a hand-off can arrive late
        (queued for a shard that was restarting, which has since resumed, prepared or released it)."""
        sent, ids = [], []
        for item in items:
            self.addresses.update({k: v for k, v in item[1].items() if v})
            if len(item) > 2 and item[2] is not None:
                sent.append(item[2])
            else:
                ids.append(item[0])
        rows = []
        if sent:
            current = await self.db.tx(_still_placed, [r.allocation_id for r in sent], [r.version for r in sent])
            rows = [r for r in sent if r.allocation_id in current]
        if ids:
            rows += await self.db.tx(store.load_allocations, "allocation_id = ANY(%b::uuid[])", (ids,))
        group: dict[str, None] = {}  # ordered, each id once
        for r in rows:
            busy = self.tasks.get(r.allocation_id)
            if busy is not None and not busy.done():
                continue  # already being prepared (a re-sent hand-off after a placement restart)
            if r.allocation_id in self._releasing_unsent:
                continue  # its release, with no Prepare sent, is committing RELEASED (_release)
            if r.state is AllocState.PLACED:
                self.rows[r.allocation_id] = r
                group[r.allocation_id] = None
        self._spawn_prepares(list(group))
        return len(rows)

    # ------------------------------------------------------------ prepare

    def _spawn_prepares(self, aids: list[str]) -> None:
        """Prepare PLACED allocations (a hand-off, a resume, the supervisor's retries) as one group: one
        task for all of them, registered under each id as its prepare. A release waits for it and never
        cuts it off (_spawn, _cleanup). An id whose task still runs is left out: never two at once."""
        aids = [a for a in aids if (self.tasks.get(a) is None or self.tasks[a].done())
                and a not in self._releasing_unsent]
        if not aids:
            return
        t = asyncio.get_running_loop().create_task(self._prepare_group(aids))
        for aid in aids:
            self._preparing[aid] = t
            self.tasks[aid] = t

        def done(_t):
            for aid in aids:
                if self._preparing.get(aid) is _t:
                    self._preparing.pop(aid, None)
                if self.tasks.get(aid) is _t:
                    self.tasks.pop(aid, None)
        t.add_done_callback(done)

    async def _prepare_group(self, aids: list[str]) -> None:
        """Prepare allocations on their nodes, together: every replica's Prepare is queued for its
        node's PrepareBatch, the outcomes are awaited at once, and the allocations whose nodes took
        them go PLACED → RUNNING in one group commit (a refused or failed one: _prepare_failed). No
        task per allocation: a task, a gather and a lock wait each, for thousands of allocations a
        hand-off, were a quarter of the shard's time."""
        waits: dict[str, list[asyncio.Future]] = {}
        errors: dict[str, BaseException] = {}
        todo, unknown = aids, []
        for first_pass in (True, False):
            for aid in todo:
                row = self.rows.get(aid)
                if row is None or row.state is not AllocState.PLACED:
                    continue
                if row.node_ids() & self.nodes_down:
                    errors[aid] = RuntimeError("node offline")
                    continue
                addrs = [self.addresses.get(a["node_id"]) for a in row.assignments]
                if None in addrs:  # no replica goes out when one has no known address
                    if first_pass:
                        unknown.append(aid)
                    else:
                        errors[aid] = KeyError(row.assignments[addrs.index(None)]["node_id"])
                    continue
                self._sent.add(aid)
                waits[aid] = [self.prepares.queue(addr, node_pb2.PrepareRequest(
                    allocation_id=aid, gpu_indices=a["gpu_indices"], gpu_milli=a["gpu_milli"],
                    tenant_id=row.tenant_id)) for addr, a in zip(addrs, row.assignments)]
            if not unknown:
                break
            # Only on a miss: a node registered after this shard learned the addresses.
            await self._know_addresses({n for aid in unknown if aid in self.rows for n in self.rows[aid].node_ids()})
            todo, unknown = unknown, []
        if waits:
            await asyncio.wait([f for fs in waits.values() for f in fs])
        ok = []
        for aid, fs in waits.items():
            exc = next((f.exception() for f in fs if f.exception() is not None), None)
            if exc is None:
                ok.append(aid)
            elif isinstance(exc, PREPARE_ERRORS):
                errors[aid] = exc
            else:  # left PLACED: the supervisor prepares it again once this task is done
                log.error("prepare of %s failed unexpectedly: %r", aid, exc)
        await self._prepared(ok)
        for aid, exc in errors.items():
            await self._prepare_failed(aid, exc)

    async def _prepared(self, aids: list[str]) -> None:
        """PLACED → RUNNING for allocations whose Prepares all succeeded, in one group commit: each under
        its lock and only if still PLACED (a release may have come meanwhile)."""
        held: list[asyncio.Lock] = []
        gone: list[AllocRow] = []
        try:
            items, before = [], []
            at = utcnow()
            for aid in aids:
                lk = self._lock(aid)
                await lk.acquire()
                held.append(lk)
                row = self.rows.get(aid)
                if row is None or row.state is not AllocState.PLACED:
                    continue  # released meanwhile
                req = common_pb2.PlacementRequest.FromString(row.request)
                lease = at + dt.timedelta(seconds=req.lease_s) if req.lease_s else None
                items.append((aid, AllocEvent.PREPARE_OK, {"at": at, "lease_expires_at": lease}))
                before.append(row)
            done = await self._transition_many(items)
            self.stats["prepared"] += sum(1 for r in done if r is not None)
            # Moved in Postgres while its Prepare ran, and let go (finished elsewhere): its shares are on
            # the nodes now, and nobody else will clean them up.
            gone = [row for row, r in zip(before, done)
                    if r is None and row.allocation_id not in self.rows and row.allocation_id not in self.uncertain]
        finally:
            for lk in held:
                lk.release()
        if gone:
            await self._cleanup_finished_elsewhere(gone)

    async def _cleanup_finished_elsewhere(self, rows: list[AllocRow]) -> None:
        """Clean up the shares of allocations prepared here whose rows another writer finished while the
        Prepare ran. The one such writer: the placement actor settling a release before the hand-off
        (release_before_handoff) of a row this shard was already preparing, because the placement actor
        sent the hand-off again after its restart, or this shard resumed the row from Postgres while the
        hand-off still waited. Only rows RELEASED or CANCELLED for good are cleaned up: a row back in the
        queue may be placed again, and a cleanup by allocation id would remove its next share."""
        ids = [r.allocation_id for r in rows]
        states = dict(await self.db.statement(lambda c: c.execute(
            "SELECT allocation_id::text, state FROM control.allocations WHERE allocation_id = ANY(%b::uuid[])",
            (ids,)).fetchall()))
        for row in rows:
            if states.get(row.allocation_id) in ("RELEASED", "CANCELLED"):
                self.stats["cleanups_after_release_race"] += 1
                log.warning("allocation %s was %s elsewhere while its Prepare ran; cleaning up its shares",
                            row.allocation_id, states[row.allocation_id])
                err = await self._best_effort_cleanup(row, prepared=True)
                if err is not None:  # the node shard's orphan check on re-registration is the net
                    self.stats["cleanup_failures"] += 1
                    log.warning("cleanup of %s after the race failed: %s", row.allocation_id, err)

    async def _prepare_failed(self, aid: str, error: BaseException) -> None:
        """A refused or failed Prepare: back to QUEUED (attempt counted, capacity freed) or, past
        prepare_attempts_max, FAILED and cleaned up."""
        async with self._lock(aid):
            row = self.rows.get(aid)
            if row is None or row.state is not AllocState.PLACED:
                return  # released meanwhile
            self.stats["prepare_failures"] += 1
            attempts = row.prepare_attempts + 1
            detail = error.details() if isinstance(error, grpc.RpcError) else str(error)
            log.warning("prepare of %s failed (attempt %d/%d): %s", aid, attempts, self.cfg.prepare_attempts_max,
                        detail)
            if attempts < self.cfg.prepare_attempts_max:
                # The whole gang rolls back to QUEUED: one allocation holds all replicas.
                new = await self._transition(aid, AllocEvent.PREPARE_FAILED_RETRY, prepare_attempts=attempts,
                                             assignments=[], reason=f"prepare failed: {detail}"[:500])
                if new is not None:
                    await self._best_effort_cleanup(row)
                    self.placement().capacity_freed.remote([aid], True)
            else:
                new = await self._transition(aid, AllocEvent.PREPARE_FAILED_FINAL, prepare_attempts=attempts,
                                             reason=f"prepare failed: {detail}"[:500])
                if new is not None:
                    self.placement().capacity_freed.remote([aid], False)
                    self._spawn(aid, self._cleanup(aid))

    def _on_nodes(self, row: AllocRow) -> bool:
        """Whether a node may hold this allocation: False only when no Prepare for it was ever sent.
        This shard is the only sender of its allocations' Prepares. ``_sent`` holds the allocations
        it has sent one for, and those it found active on start (an earlier incarnation may have).
        An allocation that went back to the queue after a failed Prepare leaves ``_sent``. Its row
        counts the attempt (``prepare_attempts``, kept across requeues), and its best-effort
        cleanup may have failed, so it counts as sent when it is placed again."""
        return row.allocation_id in self._sent or row.prepare_attempts > 0

    async def _best_effort_cleanup(self, row: AllocRow, *, prepared: bool = False) -> BaseException | None:
        """Cleanup of ``row``'s shares on its nodes, not retried: the first failure, or None.
        ``prepared``: its Prepare is known to have gone out (the row may have left ``_sent``)."""
        if not prepared and not self._on_nodes(row):
            return None
        await self._know_addresses(row.node_ids())
        addrs = [self.addresses.get(n) for n in row.node_ids() if n not in self.nodes_down]
        return await self._cleanup_on_nodes(row.allocation_id, [a for a in addrs if a])

    async def _cleanup_on_nodes(self, aid: str, addresses: list[str]) -> BaseException | None:
        """Cleanup of ``aid`` on these nodes, each queued for its node's next CleanupBatch, all at once:
        the first failure, or None. NOT_FOUND is no failure: the node never saw (or already forgot)
        the allocation, so nothing is left behind."""
        outs = await asyncio.gather(*[self.cleanups.queue(addr, node_pb2.CleanupRequest(allocation_id=aid))
                                      for addr in addresses], return_exceptions=True)
        for out in outs:
            if isinstance(out, (grpc.RpcError, runtime.ItemRefused)):
                if out.code() != grpc.StatusCode.NOT_FOUND:
                    return out
            elif isinstance(out, BaseException):
                return out
        return None

    # ------------------------------------------------------------ release

    async def release(self, aid: str, event_name: str = "release_requested", at_iso: str | None = None,
                      reason: str | None = None) -> str:
        """RUNNING/PLACED → RELEASING (billing stops at ``at``), then clean up; answers the state now."""
        at = dt.datetime.fromisoformat(at_iso) if at_iso else utcnow()
        row = await self._release(aid, AllocEvent(event_name), at, reason, load=True)
        return row.state.name if row is not None else "UNKNOWN"

    async def release_owned(self, aid: str, tenant: str, read: dict | None = None) -> AllocRow | None:
        """The API's release of ``tenant``'s allocation of this shard: the row as it stands after the
        release. A row this shard holds live is answered without a read of Postgres; one it does not
        hold yet (placed, its hand-off on the way: the placement actor settles those still waiting) is
        read here, once.
        None when the row is queued, another tenant's or missing: the caller takes the general path."""
        try:
            after = await self._release(aid, AllocEvent.RELEASE_REQUESTED, utcnow(), None, load=True, tenant=tenant,
                                        read=read)
        except FailedPrecondition:  # not in Postgres: the general path answers NOT_FOUND
            return None
        # Back in the queue meanwhile (its prepare failed): the queue is the placement actor's to cancel.
        return None if after is None or after.state is AllocState.QUEUED else after

    async def release_owned_many(self, items: list[tuple[str, str]]) -> list:
        """``release_owned`` for several (allocation id, tenant) pairs: the API's Release calls that
        queued behind one another (``runtime.Combiner``), in one actor call, with the rows this shard
        does not hold read in one query. Per item, in order: what ``release_owned`` answers, or the
        refusal (an exception instance) for that item alone."""
        read = await self._read_missing([aid for aid, _ in items])
        done = await asyncio.gather(*[self.release_owned(aid, tenant, read) for aid, tenant in items],
                                    return_exceptions=True)
        return [_refusal(aid, r) if isinstance(r, BaseException) else r for (aid, _), r in zip(items, done)]

    async def _read_missing(self, aids: list[str]) -> dict:
        """The rows among ``aids`` this shard does not hold (placed, their hand-off on the way), by
        id, read in one query rather than one round trip each; {} when fewer than two."""
        missing = [a for a in dict.fromkeys(aids) if a not in self.rows and store.is_uuid(a)]
        if len(missing) < 2:
            return {}
        return {r.allocation_id: r for r in await self.db.tx(
            store.load_allocations, "allocation_id = ANY(%b::uuid[])", (missing,))}

    async def _release(self, aid: str, event: AllocEvent, at: dt.datetime, reason: str | None, *,
                       load: bool, tenant: str | None = None, read: dict | None = None) -> AllocRow | None:
        """The row after the release: RELEASING now, or as it was when it is not PLACED/RUNNING.
        None when the row moved concurrently, (``load`` false) is not held here, or (``tenant``
        given) belongs to another tenant: then nothing is changed. ``read``: rows a group release
        read together beforehand (by id), used in place of a read of its own for a row not held here;
        a row that moved since then fails its version check and is read again (``_transition``)."""
        async with self._lock(aid):
            row = self.rows.get(aid)
            if row is None:
                if not load:
                    return None
                row = read.get(aid) if read else None
                if row is None:
                    row = await self.db.tx(store.load_allocation, aid)
                if row is None:
                    raise FailedPrecondition(f"allocation {aid} not found")
                if row.state in (AllocState.PLACED, AllocState.RUNNING) and tenant in (None, row.tenant_id):
                    self.rows[aid] = row
            if tenant is not None and row.tenant_id != tenant:
                return None
            if row.state not in (AllocState.PLACED, AllocState.RUNNING):
                return row
            prep = self._preparing.get(aid)
            if (row.state is AllocState.PLACED and event is AllocEvent.RELEASE_REQUESTED and not self._on_nodes(row)
                    and (prep is None or prep.done())):
                # No Prepare was sent and none is on its way: nothing is on a node, so the cleanup is
                # done already. RELEASING → RELEASED goes in the same commit, and the capacity back.
                # While that commit is in flight no Prepare may start for it (a hand-off arriving
                # meanwhile, the supervisor's pass): it would reach a node that no Cleanup will visit.
                self._releasing_unsent.add(aid)
                try:
                    new = await self._transition(aid, (AllocEvent.RELEASE_REQUESTED, AllocEvent.CLEANUP_OK), at=at,
                                                 reason=(reason or event.value)[:500])
                finally:
                    self._releasing_unsent.discard(aid)
                if new is None:
                    return self.rows.get(aid)
                self.stats["cleanups_not_sent"] += 1
                self.stats["released"] += 1
                self._free_soon(aid)
                return new
            new = await self._transition(aid, event, at=at, reason=(reason or event.value)[:500])
            if new is None:
                return self.rows.get(aid)
            if event is AllocEvent.LEASE_EXPIRED:
                self.stats["lease_expired"] += 1
        self._spawn(aid, self._cleanup(aid))
        return new

    async def release_many(self, aids: list[str], event_name: str = "release_requested",
                           at_iso: str | None = None) -> list[AllocRow | bytes | None]:
        """Release a group: each id as ``release``, all with billing stopped at one instant (``at_iso``,
        which the caller picks once for a group spread over several shards; else now).

        The transitions join the shard's group commit, so a group costs a few commits, not one per
        id. Per id, in order: the row as it stands after the release (None when it moved concurrently:
        read it again), or the refusal as serialized ``google.rpc.Status`` bytes (a failure of one
        never stops the others)."""
        event = AllocEvent(event_name)
        at = dt.datetime.fromisoformat(at_iso) if at_iso else utcnow()
        read = await self._read_missing(aids)
        done = await asyncio.gather(*[self._release(a, event, at, None, load=True, read=read) for a in aids],
                                    return_exceptions=True)
        return [_refusal(aid, r).to_status().SerializeToString() if isinstance(r, BaseException) else r
                for aid, r in zip(aids, done)]

    # ------------------------------------------------------------ cleanup

    async def _cleanup(self, aid: str) -> None:
        prep = self._preparing.get(aid)
        if prep is not None and not prep.done():
            await asyncio.wait([prep])  # its Prepare lands (or fails) before our Cleanup goes out
        while True:
            row = self.rows.get(aid)
            if row is None or row.state not in (AllocState.RELEASING, AllocState.FAILED):
                return
            if row.node_ids() & self.nodes_down:
                return  # deferred until the node is back (node_ready)
            if row.next_attempt_at and row.state is AllocState.RELEASING:
                wait = (row.next_attempt_at - utcnow()).total_seconds()
                if wait > 0:
                    await asyncio.sleep(wait)
            if not self._on_nodes(row):
                # No Prepare went out after all (its prepare task ended before sending one): nothing is
                # on a node, so no Cleanup call. (A release with no Prepare sent or on its way is
                # RELEASED in the same commit as RELEASING: _release.)
                error = None
                self.stats["cleanups_not_sent"] += 1
            else:
                await self._know_addresses(row.node_ids())
                try:
                    addrs = [self.addresses[n] for n in sorted(row.node_ids())]
                except KeyError as exc:  # a node with no known address: nothing goes out
                    error = exc
                else:
                    error = await self._cleanup_on_nodes(aid, addrs)
            async with self._lock(aid):
                row = self.rows.get(aid)
                if row is None:
                    return
                if error is None:
                    if await self._transition(aid, AllocEvent.CLEANUP_OK, next_attempt_at=None):
                        self.stats["released"] += 1
                        self._free_soon(aid)
                    return
                self.stats["cleanup_failures"] += 1
                detail = error.details() if isinstance(error, grpc.RpcError) else str(error)
                if row.state is AllocState.FAILED:
                    log.warning("cleanup of failed allocation %s failed: %s; retrying", aid, detail)
                    await asyncio.sleep(runtime.backoff_s(1, self.cfg.cleanup_backoff_base_s,
                                                          self.cfg.cleanup_backoff_max_s))
                    continue
                attempts = row.release_attempts + 1
                if attempts < self.cfg.release_attempts_max:
                    delay = runtime.backoff_s(attempts, self.cfg.cleanup_backoff_base_s, self.cfg.cleanup_backoff_max_s)
                    await self._transition(aid, AllocEvent.CLEANUP_FAILED_RETRY, release_attempts=attempts,
                                           next_attempt_at=utcnow() + dt.timedelta(seconds=delay),
                                           reason=f"cleanup failed: {detail}"[:500])
                    continue
                new = await self._transition(aid, AllocEvent.CLEANUP_FAILED_FINAL, release_attempts=attempts,
                                             next_attempt_at=None, reason=f"cleanup failed: {detail}"[:500])
                if new is not None:
                    log.error("allocation %s RELEASE_FAILED after %d cleanup attempts; GPUs quarantined — "
                              "resolve with `gpuaas admin allocations resolve %s`", aid, attempts, aid)
                    for a in new.assignments:
                        self.node_shard(a["node_id"]).quarantine.remote(a["node_id"], a["gpu_indices"], True,
                                                                        f"release of {aid} failed")
                return

    # ------------------------------------------------------------ node events

    async def fail_on_node(self, node_id: str, gpu_index: int | None, event_name: str, at_iso: str) -> list[str]:
        """Node lost / GPU fault: RUNNING allocations there → FAILED, billing stopped at ``at``."""
        event = AllocEvent(event_name)
        at = dt.datetime.fromisoformat(at_iso)
        if event is AllocEvent.NODE_LOST:
            self.nodes_down.add(node_id)
        failed = []
        for aid, row in list(self.rows.items()):
            hit = any(a["node_id"] == node_id and (gpu_index is None or gpu_index in a["gpu_indices"])
                      for a in row.assignments)
            if not hit or row.state is not AllocState.RUNNING:
                continue
            async with self._lock(aid):
                new = await self._transition(aid, event, at=at,
                                             reason=f"{event.value} on {node_id}" +
                                             (f" GPU {gpu_index}" if gpu_index is not None else ""))
            if new is not None:
                failed.append(aid)
                self.stats["failed"] += 1
                if event is AllocEvent.GPU_FAULT:
                    self._spawn(aid, self._cleanup(aid))
        if failed:
            log.warning("%s on %s: %d allocation(s) FAILED, billing stopped at %s", event.value, node_id,
                        len(failed), at.isoformat())
        return failed

    async def node_ready(self, node_id: str, address: str) -> int:
        """The node is back: run the deferred cleanups of its FAILED allocations."""
        self.addresses[node_id] = address
        await self.agents.drop(address)
        self.nodes_down.discard(node_id)
        n = 0
        for aid, row in list(self.rows.items()):
            if node_id in row.node_ids() and row.state in (AllocState.FAILED, AllocState.RELEASING):
                self._spawn(aid, self._cleanup(aid))
                n += 1
        return n

    async def resolve(self, aid: str, note: str) -> str:
        async with self._lock(aid):
            row = self.rows.get(aid) or await self.db.tx(store.load_allocation, aid)
            if row is None:
                raise FailedPrecondition(f"allocation {aid} not found")
            self.rows[aid] = row
            try:
                new = await self._transition(aid, AllocEvent.OPERATOR_RESOLVED, reason=note[:500])
            except IllegalTransition as exc:
                self.rows.pop(aid, None) if row.state is not AllocState.RELEASE_FAILED else None
                raise FailedPrecondition(f"{exc}; only RELEASE_FAILED allocations are resolved") from None
        if new is not None:
            for a in new.assignments:
                self.node_shard(a["node_id"]).quarantine.remote(a["node_id"], a["gpu_indices"], False, note)
            self.placement().capacity_freed.remote([aid], False)
            return new.state.name
        return row.state.name

    # ------------------------------------------------------------ tick

    async def _tick_loop(self) -> None:
        last_scan = 0.0
        while True:
            await asyncio.sleep(self.cfg.allocation_tick_s)
            self.gc.tick()  # the rows of tens of thousands of allocations: keep full collections short
            try:
                now = utcnow()
                if self.uncertain:
                    ids, self.uncertain = list(self.uncertain), set()
                    try:
                        fresh = {r.allocation_id: r for r in await self.db.tx(
                            store.load_allocations, "allocation_id = ANY(%b::uuid[])", (ids,))}
                    except Unavailable:
                        self.uncertain.update(ids)
                        fresh = None
                    for aid in ids if fresh is not None else []:
                        r = fresh.get(aid)
                        if r is None or r.state in (AllocState.RELEASED, AllocState.CANCELLED, AllocState.QUEUED):
                            self.rows.pop(aid, None)
                            self._sent.discard(aid)
                            if r is not None and r.state is AllocState.RELEASED:
                                self.placement().capacity_freed.remote([aid], False)
                            elif r is not None and r.state is AllocState.QUEUED:
                                # A prepare-failed retry whose commit outcome was unknown: it did
                                # commit, so its reservation goes back and it waits in the queue again.
                                self.placement().capacity_freed.remote([aid], True)
                        else:
                            self.rows[aid] = r
                if time.monotonic() - last_scan < SCAN_EVERY_S:
                    continue
                last_scan = time.monotonic()
                # At most once a second, and only over what is due: the leases that ended and the
                # rows that are not RUNNING (a shard holds tens of thousands of RUNNING allocations).
                placed = []
                for aid in list(self.rows.waiting):
                    row = self.rows.get(aid)
                    if row is None:
                        continue
                    st = row.state
                    # Supervisor: work whose task died (database gone mid-transition) is started again.
                    busy = self.tasks.get(aid)
                    if busy is None or busy.done():
                        if st is AllocState.PLACED:
                            placed.append(aid)
                        elif st in (AllocState.RELEASING, AllocState.FAILED) and not (
                                row.node_ids() & self.nodes_down):
                            self._spawn(aid, self._cleanup(aid))
                self._spawn_prepares(placed)
                expired = self.rows.due_leases(now)
                for i, (aid, at) in enumerate(expired):
                    # Billing stops at the lease's end, not when this pass noticed it.
                    try:
                        await self.release(aid, AllocEvent.LEASE_EXPIRED.value, at.isoformat())
                    except Exception:
                        for later in expired[i:]:
                            self.rows.lease_again(*later)
                        raise
            except Exception as exc:  # noqa: BLE001
                log.warning("allocation tick failed: %s", exc)

    async def snapshot(self) -> dict:
        by_state: dict[str, int] = {}
        for r in self.rows.values():
            by_state[r.state.name] = by_state.get(r.state.name, 0) + 1
        # Calls to the daemons: one per node per batch (a daemon without the batch calls: one per item).
        calls = {"prepare_calls": self.prepares.calls, "cleanup_calls": self.cleanups.calls}
        return {"index": self.index, "by_state": by_state, "stats": {**self.stats, **calls}}
