"""NodeShard: the control side of the nodes it owns.

Consumes each node daemon's telemetry stream (the stream *is* the heartbeat)
and applies health rules on a tick, never per frame:

    frames ──► last_frame_at, pending XIDs / ECC / lost-GPU flags ──► tick (every health_tick_s)
                                                                       ├─ silent > grace   → SUSPECT (no new placements)
                                                                       ├─ silent > offline → OFFLINE, RUNNING allocs → FAILED
                                                                       ├─ back             → READY
                                                                       └─ fatal XID / DBE  → GPU UNHEALTHY, its allocs → FAILED

Every change goes through the node/GPU transition tables (actors/store.py);
the placement actor is told at once so the capacity view stops offering it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import grpc
import ray

from actors import runtime, store
from actors.placement import shard_of
from actors.store import utcnow
from gpuaas import xid as xidmod
from gpuaas.config import ControlPlaneConfig
from gpuaas.errors import FailedPrecondition, NotFound
from gpuaas.lifecycle import GpuEvent, GpuState, IllegalTransition, NodeEvent, NodeState
from gpuaas.v1 import node_pb2

log = logging.getLogger("gpuaas.nodes")

FRAME_QUEUE_MAX = 1024  # per node: unprocessed health signals are bounded


@dataclasses.dataclass
class NodeWatch:
    node_id: str
    address: str
    state: NodeState
    last_frame_mono: float
    task: asyncio.Task | None = None
    frames: int = 0
    dropped: int = 0
    # (gpu_index, cause, detected_at) waiting for the next tick
    faults: list = dataclasses.field(default_factory=list)
    gpu_states: dict = dataclasses.field(default_factory=dict)
    last_ecc: dict = dataclasses.field(default_factory=dict)
    last_sample: dict = dataclasses.field(default_factory=dict)
    # Usage window per GPU: [util % sum, samples, first energy mJ, last energy mJ] since window_start_us
    window: dict = dataclasses.field(default_factory=dict)
    window_start_us: int = 0
    # A CORDONED/DRAINING node whose daemon went silent past the offline timeout: its
    # allocations were failed (once); cleared when the daemon registers again.
    lost: bool = False


# Hardware thermal slowdown bit of NVML's clocks-throttle reasons.
THROTTLE_HW_THERMAL = 0x40
ALL_GPUS = -1  # a fault that takes every GPU of the node out (XID catalog: drain the node)
USAGE_ITEMS_PER_CALL = 2000  # usage windows per call to the ledger
USAGE_CALL_GAP_S = 0.05
# The RUNNING allocations are read in parts, by allocation id range, a moment apart: in one query the
# read took Postgres ~80 ms at 44,000 RUNNING allocations, every window, and placements queued behind
# it on a small machine. In 16 parts each is a few ms.
USAGE_READ_RANGES = [(f"{i:x}0000000-0000-0000-0000-000000000000", f"{i:x}fffffff-ffff-ffff-ffff-ffffffffffff")
                     for i in range(16)]
USAGE_READ_GAP_S = 0.05
# Out of service by an operator's choice: a lost daemon fails their allocations without leaving the state.
OPERATOR_HELD = (NodeState.CORDONED, NodeState.DRAINING)


def _attribute(running: list, windows: dict) -> list[tuple]:
    """Rows (allocation id, node id, gpu milli, GPU index), those of one allocation together, with the
    nodes' closed windows → one (allocation id, mean utilization, energy share, start, end) each: the
    mean utilization of its GPUs and, of their energy, its milli share."""
    items = []
    cur, utils, energy, start, end = None, [], 0.0, None, None
    for aid, node_id, milli, g in running:
        if aid != cur:
            if utils:
                items.append((cur, sum(utils) / len(utils), energy, start, end))
            cur, utils, energy, start, end = aid, [], 0.0, None, None
        win = windows[node_id]
        start = win[0] if start is None else min(start, win[0])
        end = win[1] if end is None else max(end, win[1])
        ge = win[2].get(g)
        if ge is not None:
            utils.append(ge[0])
            energy += ge[1] * (milli or 1000) / 1000.0
    if utils:
        items.append((cur, sum(utils) / len(utils), energy, start, end))
    return items


class NodeShardCore:
    def __init__(self, *, index: int, count: int, app_url: str, config: ControlPlaneConfig):
        self.index, self.count, self.cfg = index, count, config
        self.db = runtime.DbThread(app_url, f"node{index}")
        self.agents = runtime.AgentStubs()
        self.nodes: dict[str, NodeWatch] = {}
        self.stats = {"frames": 0, "gpu_samples": 0, "transitions": 0, "faults": 0, "dropped_frames": 0,
                      "lag_s_max": 0.0}
        self.lags: list[float] = []
        self._placement = None

    def placement(self):
        if self._placement is None:
            self._placement = ray.get_actor(runtime.PLACEMENT, namespace=runtime.NAMESPACE)
        return self._placement

    def alloc_shards(self):
        return [ray.get_actor(runtime.alloc_shard_name(i), namespace=runtime.NAMESPACE)
                for i in range(self.cfg.allocation_shards)]

    # ------------------------------------------------------------ start

    async def start(self) -> dict:
        rows = await self.db.tx(lambda c: c.execute(
            "SELECT node_id, address, state FROM control.nodes WHERE state NOT IN ('DECOMMISSIONED')").fetchall())
        gpus = await self.db.tx(lambda c: c.execute("SELECT node_id, gpu_index, state FROM control.gpus").fetchall())
        now = time.monotonic()
        for node_id, address, state in rows:
            if shard_of(node_id, self.count) != self.index:
                continue
            w = NodeWatch(node_id, address, NodeState[state], now)
            w.gpu_states = {i: GpuState[s] for n, i, s in gpus if n == node_id}
            self.nodes[node_id] = w
            if w.state is not NodeState.OFFLINE:
                w.task = asyncio.get_running_loop().create_task(self._watch(w))
        asyncio.get_running_loop().create_task(self._tick_loop())
        log.info("node shard %d/%d watching %d nodes", self.index, self.count, len(self.nodes))
        return {"nodes": len(self.nodes)}

    # ------------------------------------------------------------ registry

    async def register(self, node_id: str, address: str, inventory_bytes: bytes):
        inv = node_pb2.NodeInventory.FromString(inventory_bytes)

        def tx(conn):
            src, dst = store.register_node(conn, node_id, address, inv, inventory_bytes)
            orphans = [str(r[0]) for r in conn.execute(
                "SELECT allocation_id FROM control.allocations WHERE state IN ('FAILED','RELEASING')"
                " AND assignments @> %s::jsonb", (f'[{{"node_id": "{node_id}"}}]',))]
            gstates = dict(conn.execute("SELECT gpu_index, state FROM control.gpus WHERE node_id=%s",
                                        (node_id,)).fetchall())
            return src, dst, orphans, gstates

        try:
            src, dst, orphans, gstates = await self.db.tx(tx)
        except IllegalTransition as exc:
            raise FailedPrecondition(str(exc)) from None
        w = self.nodes.get(node_id)
        was_lost = False
        if w is None:
            w = self.nodes[node_id] = NodeWatch(node_id, address, dst, time.monotonic())
        else:
            if w.address != address:
                await self.agents.drop(w.address)
            was_lost, w.lost = w.lost, False
            w.address, w.state, w.last_frame_mono = address, dst, time.monotonic()
        w.gpu_states = {i: GpuState[s] for i, s in gstates.items()}
        if w.task is not None:
            w.task.cancel()
        w.task = asyncio.get_running_loop().create_task(self._watch(w))
        if src in (NodeState.OFFLINE, NodeState.SUSPECT) or orphans or was_lost:
            for shard in self.alloc_shards():
                shard.node_ready.remote(node_id, address)
        return dst.name, orphans, {i: s for i, s in gstates.items()}

    async def deregister(self, node_id: str, reason: str) -> str:
        """A daemon going away on purpose: stop offering it now; the heartbeat
        rules then take it to OFFLINE if it does not come back."""
        w = self.nodes.get(node_id)
        if w is None:
            raise NotFound(f"node {node_id} not found")
        if w.state is NodeState.READY:
            await self._node_transition(w, NodeEvent.HEARTBEAT_MISSED, reason)
        return w.state.name

    # ------------------------------------------------------------ telemetry

    async def _watch(self, w: NodeWatch) -> None:
        attempt = 0
        while self.nodes.get(w.node_id) is w and w.state is not NodeState.DECOMMISSIONED:
            stub = self.agents.get(w.address)
            try:
                stream = stub.StreamTelemetry(node_pb2.StreamTelemetryRequest(
                    interval_ms=self.cfg.telemetry_interval_ms, buffer_frames_max=8, omit_processes=True))
                async for frame in stream:
                    attempt = 0
                    self._on_frame(w, frame)
            except asyncio.CancelledError:
                raise
            except grpc.RpcError as exc:
                log.debug("telemetry stream of %s broke: %s", w.node_id, exc.code())
            except Exception as exc:  # noqa: BLE001
                log.warning("telemetry stream of %s failed: %s", w.node_id, exc)
            attempt += 1
            await asyncio.sleep(runtime.backoff_s(attempt, 0.2, 2.0))

    def _on_frame(self, w: NodeWatch, frame) -> None:
        now_mono = time.monotonic()
        w.last_frame_mono = now_mono
        w.frames += 1
        w.dropped += frame.dropped_frames
        self.stats["frames"] += 1
        self.stats["gpu_samples"] += len(frame.samples)
        self.stats["dropped_frames"] += frame.dropped_frames
        if frame.HasField("at"):
            lag = time.time() - frame.at.ToMicroseconds() / 1e6
            if len(self.lags) < 100_000:
                self.lags.append(lag)
            self.stats["lag_s_max"] = max(self.stats["lag_s_max"], lag)
        detected = utcnow()
        if len(w.faults) >= FRAME_QUEUE_MAX:
            return
        for x in frame.xid_events:
            # The XID catalog decides: application errors never take a GPU out of service.
            if xidmod.affects_node(x.xid):
                w.faults.append((ALL_GPUS, f"XID {x.xid} (node-wide): {x.message}"[:200], detected))
            elif xidmod.takes_gpu_out_of_service(x.xid):
                w.faults.append((x.gpu_index, f"XID {x.xid}: {x.message}"[:200], detected))
        if not w.window_start_us:
            w.window_start_us = int(time.time() * 1_000_000)
        for s in frame.samples:
            w.last_sample[s.index] = (s.gpu_util_pct, s.energy_mj, s.power_mw)
            acc = w.window.get(s.index)
            if acc is None:
                w.window[s.index] = [s.gpu_util_pct, 1, s.energy_mj, s.energy_mj]
            else:
                acc[0] += s.gpu_util_pct
                acc[1] += 1
                acc[3] = s.energy_mj
            prev = w.last_ecc.get(s.index, s.ecc_volatile_uncorrected)
            w.last_ecc[s.index] = s.ecc_volatile_uncorrected
            if s.ecc_volatile_uncorrected > prev:
                w.faults.append((s.index, "uncorrectable ECC error", detected))
            if s.lost:
                w.faults.append((s.index, "GPU fell off the bus", detected))
            if s.temperature_c >= self.cfg.thermal_trip_c or s.throttle_reasons & THROTTLE_HW_THERMAL:
                w.faults.append((s.index, f"thermal trip ({s.temperature_c} °C)", detected))

    # ------------------------------------------------------------ health rules

    async def _tick_loop(self) -> None:
        last_usage = time.monotonic()
        usage: asyncio.Task | None = None
        while True:
            await asyncio.sleep(self.cfg.health_tick_s)
            for w in list(self.nodes.values()):
                try:
                    await self._apply_rules(w)
                except Exception as exc:  # noqa: BLE001
                    log.warning("health rules for %s failed: %s", w.node_id, exc)
            if time.monotonic() - last_usage >= self.cfg.usage_window_s and (usage is None or usage.done()):
                last_usage = time.monotonic()
                # On a task of its own: reading the RUNNING allocations and handing the windows to the
                # ledger in paced parts takes a while, and the health rules must not wait for it.
                usage = asyncio.get_running_loop().create_task(self._usage_windows_logged())

    async def _usage_windows_logged(self) -> None:
        try:
            await self._send_usage_windows()
        except Exception as exc:  # noqa: BLE001 - a lost window bills zeros, never a wrong amount
            log.warning("usage telemetry window failed: %s", exc)

    def _close_windows(self) -> dict[str, tuple[int, int, dict]]:
        """node → (start µs, end µs, {gpu: (util % avg, energy J)}) of the windows closed now."""
        end = int(time.time() * 1_000_000)
        out = {}
        for w in self.nodes.values():
            if w.window and w.window_start_us and end > w.window_start_us:
                out[w.node_id] = (w.window_start_us, end, {
                    g: (u / n, max(0, e1 - e0) / 1000.0) for g, (u, n, e0, e1) in w.window.items() if n})
            w.window, w.window_start_us = {}, end
        return out

    async def _send_usage_windows(self) -> int:
        """Per-allocation utilization and energy for the ledger's metering.

        GPU windows are attributed to the RUNNING allocations on those GPUs: each
        gets its GPUs' mean utilization and, of their energy, its milli share.
        """
        windows = self._close_windows()
        if not windows:
            return 0
        try:
            # Outside Ray (a shard core run on its own) get_actor would start a whole local
            # Ray cluster in this process just to find no ledger there: ask only inside Ray.
            if not ray.is_initialized():
                raise LookupError("not running inside Ray")
            ledger = ray.get_actor(runtime.LEDGER, namespace=runtime.NAMESPACE)
        except Exception:  # noqa: BLE001 - no ledger in this deployment (a shard run on its own): nothing to feed
            if not self.stats.get("usage_no_ledger"):
                log.info("no ledger actor: usage telemetry windows are not recorded")
            self.stats["usage_no_ledger"] = self.stats.get("usage_no_ledger", 0) + 1
            return 0
        nodes = list(windows)
        # One row per (allocation, node, GPU) of the RUNNING allocations on these nodes, in scalar
        # columns: decoding every allocation's JSON assignments in Python was most of this pass. Read
        # in parts (USAGE_READ_RANGES); each part holds whole allocations, ordered, so the rows of one
        # allocation stay together.
        def read(c, lo: str, hi: str) -> list:
            c.execute("SET LOCAL max_parallel_workers_per_gather = 0")  # a background read: one core
            return c.execute(
                "SELECT al.allocation_id::text, a->>'node_id', coalesce((a->>'gpu_milli')::int, 1000), g::int"
                " FROM control.allocations al, jsonb_array_elements(al.assignments) a,"
                " jsonb_array_elements_text(a->'gpu_indices') g"
                " WHERE al.state = 'RUNNING' AND al.allocation_id BETWEEN %s::uuid AND %s::uuid"
                " AND a->>'node_id' = ANY(%s) ORDER BY 1", (lo, hi, nodes)).fetchall()

        # Part by part: read, attribute, and hand to the ledger (its calls of at most
        # USAGE_ITEMS_PER_CALL windows, a moment apart: one call of tens of thousands of windows is a
        # burst that the placement path would feel).
        gap = min(USAGE_READ_GAP_S, self.cfg.usage_window_s / (4 * len(USAGE_READ_RANGES)))
        items: list = []
        sent = 0
        for i, (lo, hi) in enumerate(USAGE_READ_RANGES):
            if i:
                await asyncio.sleep(gap)
            items += _attribute(await self.db.tx(read, lo, hi), windows)
            last = i == len(USAGE_READ_RANGES) - 1
            while len(items) - sent >= USAGE_ITEMS_PER_CALL or (last and sent < len(items)):
                if sent:
                    await asyncio.sleep(USAGE_CALL_GAP_S)
                part = items[sent:sent + USAGE_ITEMS_PER_CALL]
                ledger.record_telemetry_many.remote(part)
                sent += len(part)
        self.stats["usage_windows"] = self.stats.get("usage_windows", 0) + len(items)
        return len(items)

    async def _apply_rules(self, w: NodeWatch) -> None:
        silent_s = time.monotonic() - w.last_frame_mono
        if w.state is NodeState.READY and silent_s > self.cfg.heartbeat_grace_s:
            await self._node_transition(w, NodeEvent.HEARTBEAT_MISSED, f"no telemetry for {silent_s:.1f}s")
        elif w.state is NodeState.SUSPECT and silent_s <= self.cfg.heartbeat_grace_s:
            await self._node_transition(w, NodeEvent.HEARTBEAT_BACK, "telemetry resumed")
        elif (w.state is NodeState.SUSPECT or (w.state in OPERATOR_HELD and not w.lost)) \
                and silent_s > self.cfg.heartbeat_offline_s:
            # SUSPECT → OFFLINE; a cordoned or draining node stays so (its own table rows)
            at = utcnow()
            await self._node_transition(w, NodeEvent.HEARTBEAT_TIMEOUT, f"no telemetry for {silent_s:.1f}s", at)
            w.lost = True
            for shard in self.alloc_shards():
                shard.fail_on_node.remote(w.node_id, None, "node_lost", at.isoformat())
            if w.task is not None:
                w.task.cancel()
                w.task = None
        faults, w.faults = w.faults, []
        faults = [(g, cause, at) for gi, cause, at in faults
                  for g in (sorted(w.gpu_states) if gi == ALL_GPUS else [gi])]
        for gpu_index, cause, detected in faults:
            if w.gpu_states.get(gpu_index) is not GpuState.READY:
                continue
            self.stats["faults"] += 1
            await self.db.tx(store.transition_gpu, w.node_id, gpu_index, GpuEvent.FATAL_FAULT, reason=cause,
                             at=detected)
            w.gpu_states[gpu_index] = GpuState.UNHEALTHY
            self.placement().set_gpu_healthy.remote(w.node_id, gpu_index, False)
            for shard in self.alloc_shards():
                shard.fail_on_node.remote(w.node_id, gpu_index, "gpu_fault", detected.isoformat())
            log.warning("GPU %s/%d UNHEALTHY: %s", w.node_id, gpu_index, cause)

    async def _node_transition(self, w: NodeWatch, event: NodeEvent, reason: str, at=None) -> None:
        src, dst = await self.db.tx(store.transition_node, w.node_id, event, reason=reason, at=at)
        w.state = dst
        self.stats["transitions"] += 1
        # Never block the health tick on the placement actor (it may be restarting);
        # a restarted placement actor rebuilds node states from Postgres anyway.
        self.placement().set_node_state.remote(w.node_id, dst.name)
        log.info("node %s %s → %s (%s: %s)", w.node_id, src.name, dst.name, event.value, reason)

    # ------------------------------------------------------------ operator

    async def operator(self, node_id: str, action: str, reason: str) -> str:
        w = self.nodes.get(node_id)
        if w is None:
            raise NotFound(f"node {node_id} not found")
        event = {"cordon": NodeEvent.CORDON, "uncordon": NodeEvent.UNCORDON, "drain": NodeEvent.DRAIN,
                 "clear": NodeEvent.CLEARED, "decommission": NodeEvent.DECOMMISSION}[action]
        try:
            await self._node_transition(w, event, reason)
        except IllegalTransition as exc:
            raise FailedPrecondition(str(exc)) from None
        return w.state.name

    async def clear_gpu(self, node_id: str, gpu_index: int, reason: str) -> str:
        w = self.nodes.get(node_id)
        if w is None:
            raise NotFound(f"node {node_id} not found")
        try:
            _, dst = await self.db.tx(store.transition_gpu, node_id, gpu_index, GpuEvent.CLEARED, reason=reason)
        except IllegalTransition as exc:
            raise FailedPrecondition(str(exc)) from None
        w.gpu_states[gpu_index] = dst
        await self.placement().set_gpu_healthy.remote(node_id, gpu_index, True)
        return dst.name

    async def quarantine(self, node_id: str, gpu_indices: list[int], on: bool, reason: str) -> None:
        w = self.nodes.get(node_id)
        event = GpuEvent.QUARANTINE if on else GpuEvent.RELEASE_RESOLVED
        for i in gpu_indices:
            try:
                _, dst = await self.db.tx(store.transition_gpu, node_id, i, event, reason=reason)
            except IllegalTransition:
                continue
            if w is not None:
                w.gpu_states[i] = dst
            await self.placement().set_gpu_healthy.remote(node_id, i, dst is GpuState.READY)

    async def telemetry_stats(self) -> dict:
        lags = sorted(self.lags)
        p99 = lags[int(0.99 * (len(lags) - 1))] if lags else 0.0
        return {**self.stats, "lag_p99_s": p99, "nodes": len(self.nodes),
                "states": {n: w.state.name for n, w in self.nodes.items()}}

    async def usage_window(self, node_id: str) -> dict:
        w = self.nodes.get(node_id)
        return dict(w.last_sample) if w else {}
