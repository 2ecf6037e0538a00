"""The placement engine: filter → score → select over the in-memory capacity view.

    place(req) ─► validate ─► [fast index] ─► gang planner ─► step(need):
                                                  filters (count rejections per Reason)
                                                  → score plugin (policy) → select (ties: node order)
                                                  → choose GPUs → reserve (take)
                               all replicas placed? ─ no ─► undo every reserve, explain
                                                     yes ─► record allocation, charge quota

Decisions are optimistic ("assume"): a placed decision has already reserved
its capacity in memory; ``release`` is the idempotent undo.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

from scheduler import explain as _explain
from scheduler import plugins as _plugins
from scheduler.cluster import Cluster
from scheduler.need import Need, combined_need, model_mask, replica_need
from scheduler.plugins import filter_gpu_fit, filter_nvlink_island
from scheduler.pending import PendingQueue
from scheduler.types import (DEFAULT_POLICY, MILLI, Assignment, Decision, NodeSpec, PolicyName, Reason, Request,
                             SchedulerError, Topology)

RACK_LABEL = "rack"
RACK_TRIES_MAX = 32           # racks tried for one same-rack gang
NODE_TRIES_MAX = 64           # nodes tried for one same-node gang
PREEMPT_CANDIDATES_MAX = 512  # lower-priority allocations considered as victims
REPLICAS_MAX = 4096
HOLD_PREFIX = "\x00hold:"


@dataclasses.dataclass(slots=True)
class _Alloc:
    req: Request
    assignments: tuple[Assignment, ...]
    nodes: tuple[int, ...]
    models: tuple[int, ...]     # model id per assignment (its first GPU)
    start_s: float
    gpu_milli_total: int


class _Ctx:
    """What plugins may read: the cluster, the engine's RNG and node order, quota, the frag model."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.cluster = engine.cluster
        self.rng = engine.rng
        self.gpu_hint = None
        self._mo: dict = {}

    def reset(self) -> None:
        self.gpu_hint = None
        self._mo.clear()

    def model_ok(self, a, need: Need, models=None):
        models = need.models if models is None else models
        key = models
        v = self._mo.get(key)
        if v is None:
            v = self._mo[key] = model_mask(a["gmodel"], models)
        return v

    def quota_models(self, need: Need):
        return self.engine._quota_models(need)

    def frag_model(self):
        return self.engine.frag_model()


class Engine:
    def __init__(self, *, policy: PolicyName = DEFAULT_POLICY, seed: int = 0, typical_shapes=None,
                 policy_options: dict | None = None):
        self.policy = PolicyName(policy)
        self.policy_options = dict(policy_options or {})   # per-policy knobs (see the score plugin)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self._order_rng = np.random.default_rng(seed)
        self.cluster = Cluster(live_arrays=self.policy is not PolicyName.FAST_BEST_FIT)
        self.scorer = _plugins.SCORERS[self.policy]
        self.ctx = _Ctx(self)
        self._rank: list[int] = []          # tie-break order per node slot (seeded shuffle)
        self._rank_np: np.ndarray | None = None
        self._racks: np.ndarray | None = None  # rack number per node slot (_rack_ids)
        self.allocs: dict[str, _Alloc] = {}
        self.quota: dict[tuple[str, str], int] = {}
        self.used: dict[tuple[str, int], int] = {}       # (tenant, model id) → milli
        self.used_total: dict[str, int] = {}
        self.weights: dict[str, float] = {}
        self.queue = PendingQueue()
        self.holds: dict[str, dict] = {}     # preemptor key → {"pending": set(victims), "held": [_Alloc]}
        self.victim_of: dict[str, str] = {}  # victim key → preemptor key
        self._typical_shapes = typical_shapes
        self._frag = None
        self.index = None
        if self.policy is PolicyName.FAST_BEST_FIT:
            from scheduler.index import FastIndex

            self.index = FastIndex(self)
            self.cluster.listeners.append(self.index)
        self.fragindex = None
        if hasattr(self.scorer, "fast"):
            from scheduler.fragindex import FragIndex

            self.fragindex = FragIndex(self)
            self.cluster.listeners.append(self.fragindex)

    # ------------------------------------------------------------ nodes

    def add_node(self, spec: NodeSpec) -> None:
        before = len(self.cluster.ids)
        n = self.cluster.add_node(spec)
        if n >= before:  # new slot: give it a place in the seeded node order
            self._rank.append(0)
        # seeded order: a random key per node; ties of score go to the lowest key
        self._rank[n] = int(self._order_rng.integers(0, 2**62))
        self._rank_np = None
        self._racks = None
        self._frag = None

    def set_node_order(self, node_ids: Iterable[str]) -> None:
        """Make ties go to nodes in this order (the replay's seeded first-fit order)."""
        for i, nid in enumerate(node_ids):
            self._rank[self.cluster.index[nid]] = i
        self._rank_np = None

    def remove_node(self, node_id: str) -> None:
        n = self._node(node_id)
        if not self.cluster.is_empty(n):
            raise SchedulerError(f"node {node_id!r} still holds allocations; drain it first")
        self.cluster.remove_node(node_id)
        self._rank_np = None
        self._racks = None

    def set_node_schedulable(self, node_id: str, schedulable: bool) -> None:
        self.cluster.set_schedulable(self._node(node_id), bool(schedulable))

    def set_gpu_healthy(self, node_id: str, gpu_index: int, healthy: bool) -> None:
        n = self._node(node_id)
        if not 0 <= gpu_index < len(self.cluster.gpu_free[n]):
            raise SchedulerError(f"node {node_id!r} has no GPU {gpu_index}")
        self.cluster.set_gpu_healthy(n, gpu_index, bool(healthy))

    def _node(self, node_id: str) -> int:
        n = self.cluster.index.get(node_id)
        if n is None:
            raise SchedulerError(f"unknown node {node_id!r}")
        return n

    # ------------------------------------------------------------ quota

    def set_quota(self, tenant: str, gpu_model: str, gpu_milli_max: int) -> None:
        if gpu_milli_max is None or gpu_milli_max < 0:
            self.quota.pop((tenant, gpu_model), None)
        else:
            self.quota[(tenant, gpu_model)] = int(gpu_milli_max)

    def set_tenant_weight(self, tenant: str, weight: float) -> None:
        """Weight of a tenant in the queue's fair share (default 1)."""
        self.weights[tenant] = max(1e-9, float(weight))

    def _has_quota(self, tenant: str) -> bool:
        if not self.quota:
            return False
        return any(t == tenant for t, _ in self.quota)

    def _quota_left(self, tenant: str, mid: int) -> float:
        left = float("inf")
        q = self.quota.get((tenant, "*"))
        if q is not None:
            left = q - self.used_total.get(tenant, 0)
        q = self.quota.get((tenant, self.cluster.models[mid]))
        if q is not None:
            left = min(left, q - self.used.get((tenant, mid), 0))
        return left

    def _quota_models(self, need: Need):
        if not self._has_quota(need.tenant):
            return need.models
        pool = need.models if need.models is not None else range(len(self.cluster.models))
        demand = need.gpu_total
        return frozenset(m for m in pool if self._quota_left(need.tenant, m) >= demand)

    # ------------------------------------------------------------ place

    def place(self, req: Request, *, preempt: bool = False, now_s: float | None = None) -> Decision:
        bad = self._invalid(req)
        if bad:
            return Decision(req.key, False, (), f"invalid request: {bad}", {Reason.INVALID_REQUEST: 1})
        if req.key in self.allocs:
            return Decision(req.key, False, (), f"allocation {req.key!r} already exists", {Reason.DUPLICATE_KEY: 1})
        if self.holds and req.key in self.holds:
            self._drop_hold(req.key)  # the preemptor consumes the capacity held for it
        if len(self.queue):
            self.queue.remove(req.key)
        if self.index is not None and req.replicas == 1:
            hit = self.index.place(req)
            if hit is not None:
                a, n = hit
                gi = a.gpu_indices
                asg = (a,)
                self.allocs[req.key] = _Alloc(req, asg, (n,), (self.index.model[n] if gi else -1,),
                                              0.0 if now_s is None else float(now_s), a.gpu_milli * len(gi))
                return Decision(req.key, True, asg, "", {})
        elif self.index is not None and req.topology is Topology.ANY:
            placed = self._index_gang(req)
            if placed is not None:
                return self._commit(req, placed, now_s)
        elif self.fragindex is not None and self.fragindex.eligible(req):
            hit = self.scorer.fast(self.fragindex, req, self._rank_array())
            if hit is not None:
                return self._commit(req, (hit,), now_s)
        placed, reasons, facts = self._plan(req)
        if placed is not None:
            return self._commit(req, placed, now_s)
        d = Decision(req.key, False, (), _explain.explain_failure(req, reasons, facts), reasons)
        if preempt and Reason.QUOTA_EXCEEDED not in reasons:
            return self._preempt(req, d, now_s)
        return d

    def _index_gang(self, req: Request) -> list[Assignment] | None:
        """A gang with no topology constraint, on the fast index: each replica placed as the same request
        with one replica would be (best fit), reserving as it goes, as _plan_each does; all or none.
        None when some replica is not found within the index's scan: what it took is given back and the
        pipeline decides (and explains a failure: "only i of r replicas fit")."""
        done: list[tuple[Assignment, int]] = []
        for _ in range(req.replicas):
            hit = self.index.place(req)
            if hit is None:
                for a, n in reversed(done):
                    self._give_raw(n, a, req.tenant)
                return None
            done.append(hit)
        return [a for a, _ in done]

    def place_batch(self, reqs: Iterable[Request], *, now_s: float | None = None) -> list[Decision]:
        return [self.place(r, now_s=now_s) for r in reqs]

    def explain(self, req: Request) -> Decision:
        """Dry run: the decision ``place`` would make now, reserving nothing."""
        bad = self._invalid(req)
        if bad:
            return Decision(req.key, False, (), f"invalid request: {bad}", {Reason.INVALID_REQUEST: 1})
        placed, reasons, facts = self._plan(req)
        if placed is None:
            return Decision(req.key, False, (), _explain.explain_failure(req, reasons, facts), reasons)
        for a in placed:
            n = self.cluster.index[a.node_id]
            self._give_raw(n, a, req.tenant)
        return Decision(req.key, True, tuple(placed), _placed_text(placed), {})

    def restore(self, key: str, req: Request, assignments: Iterable[Assignment], *,
                now_s: float | None = None) -> None:
        """Re-apply a known allocation (control-plane restart). Raises if it would over-commit."""
        if key in self.allocs:
            raise SchedulerError(f"allocation {key!r} already restored")
        assignments = tuple(assignments)
        if req.key != key:
            req = dataclasses.replace(req, key=key)
        done = []
        try:
            for a in assignments:
                n = self._node(a.node_id)
                self._take_raw(n, a, req.tenant)
                done.append(a)
        except Exception:
            for a in done:
                self._give_raw(self.cluster.index[a.node_id], a, req.tenant)
            raise
        self._record(req, assignments, now_s)

    def release(self, key: str) -> bool:
        """Return an allocation's capacity exactly. Unknown keys are a no-op (False)."""
        if key in self.holds and key not in self.allocs:
            self._drop_hold(key)
            return True
        al = self.allocs.pop(key, None)
        if al is None:
            return False
        tenant = al.req.tenant
        if not self.victim_of and len(al.nodes) == 1:  # the hot path: one replica, no preemption pending
            a = al.assignments[0]
            n = al.nodes[0]
            gi = a.gpu_indices
            if self.index is None or not self.index.give(n, gi, a.gpu_milli, a.cpu_milli, a.memory_mib):
                self.cluster.give(n, gi, a.gpu_milli, a.cpu_milli, a.memory_mib)
            d = a.gpu_milli * len(gi)
            if d:
                k = (tenant, al.models[0])
                self.used[k] -= d
                self.used_total[tenant] -= d
            return True
        preemptor = self.victim_of.pop(key, None)
        hold = self.holds.get(preemptor) if preemptor is not None else None
        if hold is not None:
            # the capacity stays reserved, now for the preemptor; only the victim's quota is freed
            hold["pending"].discard(key)
            hold["held"].append(al)
            for mid, a in zip(al.models, al.assignments):
                self._uncharge(tenant, mid, a)
            return True
        c = self.cluster
        for n, mid, a in zip(al.nodes, al.models, al.assignments):
            c.give(n, a.gpu_indices, a.gpu_milli, a.cpu_milli, a.memory_mib)
            self._uncharge(tenant, mid, a)
        return True

    # ------------------------------------------------------------ queue

    def enqueue(self, req: Request) -> None:
        self.queue.push(req)

    def dequeue(self, key: str) -> bool:
        had = self.queue.remove(key)
        if key in self.holds:
            self._drop_hold(key)
        return had

    def schedule_pending(self, *, now_s: float | None = None, attempts_max: int = 10_000) -> list[Decision]:
        """Try the queue: priority first, then the tenant furthest below its fair share, then FIFO."""
        out = []
        share = lambda t: self.used_total.get(t, 0) / self.weights.get(t, 1.0)  # noqa: E731
        for seq, req in self.queue.ordered(share, attempts_max):
            d = self.place(req, now_s=now_s)
            if not d.placed:
                self.queue.push(req, seq=seq)
            out.append(d)
        return out

    def pending(self) -> list[str]:
        return self.queue.keys()

    # ------------------------------------------------------------ views

    def snapshot_free(self) -> dict:
        c = self.cluster
        return {c.ids[n]: {"cpu_milli": c.cpu_free[n], "memory_mib": c.mem_free[n],
                           "gpu_milli": list(c.gpu_free[n]), "schedulable": c.schedulable[n],
                           "gpu_healthy": list(c.gpu_healthy[n])}
                for n in range(len(c.ids)) if c.alive[n]}

    def allocation(self, key: str):
        al = self.allocs.get(key)
        return None if al is None else al.assignments

    def check_invariants(self) -> None:
        c = self.cluster
        c.check()
        used_cpu = [0] * len(c.ids)
        used_mem = [0] * len(c.ids)
        used_gpu = [[0] * len(r) for r in c.gpu_free]
        everything = list(self.allocs.values()) + [al for h in self.holds.values() for al in h["held"]]
        for al in everything:
            for n, a in zip(al.nodes, al.assignments):
                assert c.alive[n] and c.ids[n] == a.node_id, f"allocation on a removed node {a.node_id}"
                used_cpu[n] += a.cpu_milli
                used_mem[n] += a.memory_mib
                for g in a.gpu_indices:
                    used_gpu[n][g] += a.gpu_milli
        for n in range(len(c.ids)):
            if not c.alive[n]:
                continue
            assert used_cpu[n] + c.cpu_free[n] == c.cpu_cap[n], f"CPU allocated+free != capacity on {c.ids[n]}"
            assert used_mem[n] + c.mem_free[n] == c.mem_cap[n], f"memory allocated+free != capacity on {c.ids[n]}"
            for g, f in enumerate(c.gpu_free[n]):
                assert used_gpu[n][g] + f == MILLI, f"GPU {g} allocated+free != capacity on {c.ids[n]}"
        for (t, mid), v in self.used.items():
            assert v >= 0, "negative quota usage"
            q = self.quota.get((t, c.models[mid]))
            assert q is None or v <= q, f"quota exceeded for {t}/{c.models[mid]}"
        for t, v in self.used_total.items():
            q = self.quota.get((t, "*"))
            assert q is None or v <= q, f"quota exceeded for {t}/*"
        if self.index is not None:
            self.index.check()

    # ------------------------------------------------------------ internals: validation, records

    def _invalid(self, req: Request) -> str:
        if not req.key:
            return "key is required"
        if req.replicas < 1 or req.replicas > REPLICAS_MAX:
            return f"replicas must be 1..{REPLICAS_MAX}"
        if req.num_gpu < 0 or req.gpu_milli < 0 or req.cpu_milli < 0 or req.memory_mib < 0:
            return "amounts must not be negative"
        if 0 < req.gpu_milli < MILLI and req.num_gpu > 1:
            return "a GPU share (gpu_milli < 1000) is a share of one GPU: num_gpu must be 1"
        if req.gpu_milli > MILLI:
            return "gpu_milli is per GPU: at most 1000"
        if req.num_gpu == 0 and req.gpu_milli == 0 and req.cpu_milli == 0 and req.memory_mib == 0:
            return "asks for nothing"
        return ""

    def _models_of(self, req: Request):
        if not req.gpu_models:
            return None
        return frozenset(self.cluster.model_id[m] for m in req.gpu_models if m in self.cluster.model_id)

    def _take_raw(self, n: int, a: Assignment, tenant: str) -> None:
        c = self.cluster
        c.take(n, a.gpu_indices, a.gpu_milli, a.cpu_milli, a.memory_mib)
        if a.gpu_indices:
            self._charge(tenant, c.gpu_model[n][a.gpu_indices[0]], a)

    def _give_raw(self, n: int, a: Assignment, tenant: str) -> None:
        c = self.cluster
        c.give(n, a.gpu_indices, a.gpu_milli, a.cpu_milli, a.memory_mib)
        if a.gpu_indices:
            self._uncharge(tenant, c.gpu_model[n][a.gpu_indices[0]], a)

    def _charge(self, tenant: str, mid: int, a: Assignment) -> None:
        d = a.gpu_milli * len(a.gpu_indices)
        if d:
            k = (tenant, mid)
            self.used[k] = self.used.get(k, 0) + d
            self.used_total[tenant] = self.used_total.get(tenant, 0) + d

    def _uncharge(self, tenant: str, mid: int, a: Assignment) -> None:
        if mid < 0:
            return
        d = a.gpu_milli * len(a.gpu_indices)
        if d:
            k = (tenant, mid)
            self.used[k] -= d
            self.used_total[tenant] -= d

    def _record(self, req: Request, assignments: tuple[Assignment, ...], now_s) -> _Alloc:
        c = self.cluster
        if len(assignments) == 1:  # the hot path: one replica
            a = assignments[0]
            n = c.index[a.node_id]
            gi = a.gpu_indices
            al = _Alloc(req, assignments, (n,), (c.gpu_model[n][gi[0]] if gi else -1,),
                        0.0 if now_s is None else float(now_s), a.gpu_milli * len(gi))
            self.allocs[req.key] = al
            return al
        nodes = tuple(c.index[a.node_id] for a in assignments)
        models = tuple(c.gpu_model[n][a.gpu_indices[0]] if a.gpu_indices else -1 for n, a in zip(nodes, assignments))
        al = _Alloc(req, assignments, nodes, models, 0.0 if now_s is None else float(now_s),
                    sum(a.gpu_milli * len(a.gpu_indices) for a in assignments))
        self.allocs[req.key] = al
        return al

    def _commit(self, req: Request, assignments, now_s) -> Decision:
        assignments = tuple(assignments)
        self._record(req, assignments, now_s)
        return Decision(req.key, True, assignments, "", {})

    # ------------------------------------------------------------ internals: planning

    def _rank_array(self) -> np.ndarray:
        if self._rank_np is None or len(self._rank_np) != len(self._rank):
            self._rank_np = np.array(self._rank, dtype=np.int64)
        return self._rank_np

    def _plan(self, req: Request):
        """Place every replica (reserving as it goes) or none. → (assignments | None, reasons, facts)."""
        models = self._models_of(req)
        if req.gpu_models and not models:
            return None, {Reason.GPU_MODEL: sum(self.cluster.alive)}, [
                f"no node has a GPU of model {' or '.join(req.gpu_models)}"]
        if not any(self.cluster.alive):
            return None, {Reason.NO_NODES: 1}, ["the cluster has no nodes"]
        r = req.replicas
        topo = req.topology
        if r == 1 or topo is Topology.ANY or topo is Topology.SPREAD:
            return self._plan_each(req, replica_need(req, models), spread=(topo is Topology.SPREAD))
        if topo in (Topology.SAME_NODE, Topology.SAME_NVLINK_ISLAND):
            return self._plan_same_node(req, models)
        return self._plan_same_rack(req, models)

    def _plan_each(self, req: Request, need: Need, *, spread: bool = False, restrict=None):
        done: list[Assignment] = []
        used_nodes = np.zeros(len(self.cluster.ids), dtype=bool) if spread else None
        for i in range(req.replicas):
            got, reasons = self._step(need, restrict=restrict, exclude=used_nodes)
            if got is None:
                self._undo(done, req.tenant)
                facts = self._facts(need)
                if req.replicas > 1:
                    facts.insert(0, f"only {i} of {req.replicas} replicas fit")
                    reasons[Reason.GANG_INCOMPLETE] = 1
                return None, reasons, facts
            done.append(got)
            if used_nodes is not None:
                used_nodes[self.cluster.index[got.node_id]] = True
        return done, {}, []

    def _plan_same_node(self, req: Request, models):
        whole = req.per_gpu_milli() >= MILLI
        big = combined_need(req, models)
        tried = 0
        excluded = np.zeros(len(self.cluster.ids), dtype=bool)
        first_reasons = None
        while tried < NODE_TRIES_MAX:
            got, reasons = self._step(big, exclude=excluded, reserve=False)
            if first_reasons is None:
                first_reasons = reasons
            if got is None:
                break
            n = self.cluster.index[got.node_id]
            tried += 1
            if whole:
                per = req.gpus_per_replica()
                gpus = got.gpu_indices
                parts = [Assignment(got.node_id, gpus[i * per:(i + 1) * per], got.gpu_milli, req.cpu_milli,
                                    req.memory_mib) for i in range(req.replicas)]
                for a in parts:
                    self._take_raw(n, a, req.tenant)
                return parts, {}, []
            only = np.zeros(len(self.cluster.ids), dtype=bool)
            only[n] = True
            placed, _, _ = self._plan_each(req, replica_need(req, models), restrict=only)
            if placed is not None:
                return placed, {}, []
            excluded[n] = True
        reasons = dict(first_reasons or {})
        return None, reasons, self._facts(big)

    def _rack_ids(self) -> np.ndarray:
        """Per node slot, its rack's number (racks numbered in the order of their names), or -1 for a
        node without a rack label. Labels change only with membership, which drops it."""
        if self._racks is None:
            labels = self.cluster.labels
            names = sorted({lb[RACK_LABEL] for lb in labels if RACK_LABEL in lb})
            number = {rk: i for i, rk in enumerate(names)}
            self._racks = np.array([number.get(lb.get(RACK_LABEL), -1) for lb in labels], dtype=np.int64)
        return self._racks

    def _plan_same_rack(self, req: Request, models):
        c = self.cluster
        need = replica_need(req, models)
        a = c.arrays()
        m, reasons = self._feasible(a, need)
        cand = np.flatnonzero(m)
        rack = self._rack_ids()[cand]
        no_rack = int(np.count_nonzero(rack < 0))
        if no_rack:
            reasons[Reason.TOPOLOGY] = reasons.get(Reason.TOPOLOGY, 0) + no_rack
            cand, rack = cand[rack >= 0], rack[rack >= 0]
        # Smallest racks (by free GPU milli of their feasible nodes) first, ties by rack name: keep big
        # racks whole for big gangs. Vectorised: at 10,000 nodes a loop over nodes cost milliseconds.
        free = np.bincount(rack, weights=a["gfree"][cand].sum(axis=1), minlength=int(rack.max(initial=-1)) + 1)
        present = np.unique(rack)
        order = present[np.lexsort((present, free[present]))]
        for rk in order[:RACK_TRIES_MAX]:
            only = np.zeros(len(c.ids), dtype=bool)
            only[cand[rack == rk]] = True
            placed, _, _ = self._plan_each(req, need, restrict=only)
            if placed is not None:
                return placed, {}, []
        if len(cand):
            reasons[Reason.TOPOLOGY] = reasons.get(Reason.TOPOLOGY, 0) + len(cand)
        reasons[Reason.GANG_INCOMPLETE] = 1
        return None, reasons, [f"no rack fits all {req.replicas} replicas"] + self._facts(need)

    def _undo(self, done: list[Assignment], tenant: str) -> None:
        for a in reversed(done):
            self._give_raw(self.cluster.index[a.node_id], a, tenant)
        done.clear()

    def _feasible(self, a, need: Need, restrict=None, exclude=None):
        """Run the filters; → (mask of feasible nodes, rejections per Reason)."""
        ctx = self.ctx
        ctx.reset()
        m = a["sched"] | ~a["sched"]
        alive = np.array(self.cluster.alive, dtype=bool) if len(self.cluster.free_slots) else None
        if alive is not None:
            m = m & alive
        if restrict is not None:
            m = m & restrict
        reasons: dict = {}
        for f in _plugins.FILTERS:
            if not f.applies(need):
                continue
            fm = f.mask(a, need, ctx)
            rej = int(np.count_nonzero(m & ~fm))
            if rej:
                r = f.reason(need) if hasattr(f, "reason") else f.REASON
                reasons[r] = reasons.get(r, 0) + rej
                m = m & fm
                if not m.any():
                    return m, reasons
        if exclude is not None:
            rej = int(np.count_nonzero(m & exclude))
            if rej:
                reasons[Reason.TOPOLOGY] = reasons.get(Reason.TOPOLOGY, 0) + rej
                m = m & ~exclude
        return m, reasons

    def _step(self, need: Need, *, restrict=None, exclude=None, reserve: bool = True):
        """One placement step: filter, score, select one node, choose GPUs, reserve."""
        c = self.cluster
        a = c.arrays()
        m, reasons = self._feasible(a, need, restrict, exclude)
        cand = np.flatnonzero(m)
        if len(cand) == 0:
            return None, reasons
        ctx = self.ctx
        ctx.gpu_hint = None
        scores = self.scorer.score(a, need, cand, ctx)
        best = scores.max()
        tie = np.flatnonzero(scores == best)
        rank = self._rank_array()
        j = tie[int(np.argmin(rank[cand[tie]]))] if len(tie) > 1 else tie[0]
        n = int(cand[j])
        hint = None if ctx.gpu_hint is None else int(ctx.gpu_hint[j])
        gpus = self._choose_gpus(n, need, hint)
        asg = Assignment(c.ids[n], gpus, need.milli if gpus else 0, need.cpu, need.mem)
        if reserve:
            self._take_raw(n, asg, need.tenant)
        return asg, reasons

    def _choose_gpus(self, n: int, need: Need, hint: int | None = None) -> tuple[int, ...]:
        c = self.cluster
        if need.milli <= 0:
            return ()
        allowed = self._quota_models(need)
        free, models, healthy = c.gpu_free[n], c.gpu_model[n], c.gpu_healthy[n]
        ok = [g for g in range(len(free)) if healthy[g] and (allowed is None or models[g] in allowed)]
        if need.milli < MILLI:
            if hint is not None:
                return (hint,)
            fits = [g for g in ok if free[g] >= need.milli]
            return (min(fits, key=lambda g: (free[g], g)),)
        full = [g for g in ok if free[g] == MILLI]
        by_model: dict[int, list[int]] = {}
        for g in full:
            by_model.setdefault(models[g], []).append(g)
        for gs in by_model.values():
            if len(gs) >= need.num:
                return pick_islands(gs, c.gpu_island[n], need.num, need.island)
        raise SchedulerError("filters let through a node without the GPUs; this is a bug")

    def _facts(self, need: Need) -> list[str]:
        """One line on the best the cluster offers now, e.g. 'largest free island has 6'."""
        if need.milli <= 0:
            return []
        a = self.cluster.arrays()
        self.ctx.reset()
        sched = a["sched"]
        if need.milli >= MILLI:
            if need.island and need.num > 1:
                best = filter_nvlink_island.largest_free_island(a, need, self.ctx)
                v = int(best[sched].max()) if sched.any() else 0
                return [f"largest free NVLink island has {v}"]
            ok = self.ctx.model_ok(a, need) & a["gusable"] & (a["gfree"] == MILLI)
            v = int(ok.sum(axis=1)[sched].max()) if sched.any() else 0
            return [f"most free whole GPUs on one node: {v}"]
        ok = self.ctx.model_ok(a, need) & a["gusable"]
        v = int(np.where(ok, a["gfree"], 0)[sched].max()) if sched.any() else 0
        return [f"largest free share on one GPU: {v}/1000"]

    # ------------------------------------------------------------ preemption

    def _preempt(self, req: Request, failed: Decision, now_s) -> Decision:
        now = 0.0 if now_s is None else float(now_s)
        cands = [(al.gpu_milli_total * max(0.0, now - al.start_s), al.gpu_milli_total, k)
                 for k, al in self.allocs.items()
                 if al.req.priority < req.priority and k not in self.victim_of]
        cands.sort()
        cands = cands[:PREEMPT_CANDIDATES_MAX]
        removed: list[str] = []
        saved: dict[str, _Alloc] = {}
        fits = False
        for _, _, k in cands:
            saved[k] = self.allocs[k]
            self.release(k)
            removed.append(k)
            if self._fits(req):
                fits = True
                break
        if fits:
            # drop victims that turned out unnecessary, most expensive first
            for k in sorted(removed, key=lambda k: -saved[k].gpu_milli_total):
                self._reapply(saved[k])
                if self._fits(req):
                    removed.remove(k)
                else:
                    self.release(k)
        for k in removed:
            self._reapply(saved[k])
        if not fits:
            reasons = dict(failed.reasons)
            reasons[Reason.PREEMPTION_IMPOSSIBLE] = 1
            return Decision(req.key, False, (), failed.explanation + "; preempting every lower-priority "
                            "allocation would not make room", reasons)
        victims = tuple(removed)
        self._hold(req, victims, saved)
        reasons = dict(failed.reasons)
        reasons[Reason.PREEMPTION_NEEDED] = len(victims)
        lost = sum(saved[k].gpu_milli_total * max(0.0, now - saved[k].start_s) for k in victims) / MILLI
        return Decision(req.key, False, (), f"{failed.explanation}; preempt {len(victims)} lower-priority "
                        f"allocation(s), losing {lost:.0f} GPU·s; their capacity is held for {req.key}",
                        reasons, victims)

    def rehold(self, req: Request, victims: Iterable[str]) -> bool:
        """Rebuild a preemption hold after a restart: ``victims`` (restored, still holding capacity,
        already told to go) are linked to the preemptor ``req`` again, so their capacity joins its hold
        as each is released, and the free part of its plan is held again at once, exactly as when the
        victims were chosen. False when there is nothing to hold (no such victim, or a hold exists)."""
        victims = tuple(v for v in victims if v in self.allocs and v not in self.victim_of and v != req.key)
        if not victims or req.key in self.holds or req.key in self.allocs:
            return False
        self._hold(req, victims, {k: self.allocs[k] for k in victims})
        return True

    def _hold(self, req: Request, victims: tuple[str, ...], saved: dict) -> None:
        """Link the victims to the preemptor and hold the free part of its plan now."""
        self.holds[req.key] = {"pending": set(victims), "held": self._reserve_rest(req, victims, saved)}
        for k in victims:
            self.victim_of[k] = req.key

    def _reserve_rest(self, req: Request, victims: tuple[str, ...], saved: dict) -> list[_Alloc]:
        """Hold now the free capacity that the preemptor's plan needs besides its victims' (the victims'
        own capacity joins the hold as each is released). Otherwise a placement made while the victims
        are cleaned up could take that free part, and the preemptor would not fit when they are back."""
        for k in victims:
            self.release(k)
        placed, _, _ = self._plan(req)
        if placed is not None:
            self._undo(list(placed), req.tenant)
        for k in victims:
            self._reapply(saved[k])
        if placed is None:
            return []
        c = self.cluster
        from_victims: dict[tuple[int, int], int] = {}
        cpu_v: dict[int, int] = {}
        mem_v: dict[int, int] = {}
        for k in victims:
            al = saved[k]
            for n, a in zip(al.nodes, al.assignments):
                cpu_v[n] = cpu_v.get(n, 0) + a.cpu_milli
                mem_v[n] = mem_v.get(n, 0) + a.memory_mib
                for g in a.gpu_indices:
                    from_victims[(n, g)] = from_victims.get((n, g), 0) + a.gpu_milli
        need_gpu: dict[tuple[int, int], int] = {}
        need_cpu: dict[int, int] = {}
        need_mem: dict[int, int] = {}
        for a in placed:
            n = c.index[a.node_id]
            need_cpu[n] = need_cpu.get(n, 0) + a.cpu_milli
            need_mem[n] = need_mem.get(n, 0) + a.memory_mib
            for g in a.gpu_indices:
                need_gpu[(n, g)] = need_gpu.get((n, g), 0) + a.gpu_milli
        held = []
        for n in need_cpu:
            parts = []
            cpu = max(0, need_cpu[n] - cpu_v.get(n, 0))
            mem = max(0, need_mem[n] - mem_v.get(n, 0))
            if cpu or mem:
                parts.append(Assignment(c.ids[n], (), 0, cpu, mem))
            for (m, g), milli in need_gpu.items():
                rest = milli - from_victims.get((m, g), 0)
                if m == n and rest > 0:
                    parts.append(Assignment(c.ids[n], (g,), rest, 0, 0))
            for a in parts:
                c.take(n, a.gpu_indices, a.gpu_milli, a.cpu_milli, a.memory_mib)
            if parts:
                held.append(_Alloc(req, tuple(parts), (n,) * len(parts), (-1,) * len(parts), 0.0, 0))
        return held

    def _fits(self, req: Request) -> bool:
        placed, _, _ = self._plan(req)
        if placed is None:
            return False
        self._undo(list(placed), req.tenant)
        return True

    def _reapply(self, al: _Alloc) -> None:
        for n, a in zip(al.nodes, al.assignments):
            self._take_raw(n, a, al.req.tenant)
        self.allocs[al.req.key] = al

    def _drop_hold(self, key: str) -> None:
        hold = self.holds.pop(key, None)
        if hold is None:
            return
        for v in hold["pending"]:
            self.victim_of.pop(v, None)
        c = self.cluster
        for al in hold["held"]:
            for n, a in zip(al.nodes, al.assignments):
                c.give(n, a.gpu_indices, a.gpu_milli, a.cpu_milli, a.memory_mib)

    # ------------------------------------------------------------ FGD support

    def frag_model(self, weighting: str = "count"):
        """The fragmentation model; ``weighting='demand'`` weighs typical tasks by their GPU demand."""
        if weighting == "demand":
            if getattr(self, "_frag_demand", None) is None:
                from scheduler.frag import FragModel, demand_weighted

                self._frag_demand = FragModel(demand_weighted(self.frag_model().typical_all),
                                              self.cluster.model_id, self.cluster.gpus_max)
            return self._frag_demand
        if self._frag is None:
            from scheduler.frag import FragModel, TaskShape, typical_shapes

            shapes = self._typical_shapes
            if shapes is None:
                # without a workload sample: each whole-GPU count and common shares, equally likely
                shapes = [(TaskShape(0, k, MILLI), 1.0) for k in (1, 2, 4, 8)] + [
                    (TaskShape(0, 1, m), 1.0) for m in (250, 500)]
                tot = sum(p for _, p in shapes)
                shapes = [(s, p / tot) for s, p in shapes]
            elif shapes and not isinstance(shapes[0], tuple):
                shapes = typical_shapes(list(shapes))
            self._frag = FragModel(shapes, self.cluster.model_id, self.cluster.gpus_max)
            self._frag_demand = None
        return self._frag

    def set_workload(self, shapes) -> None:
        """Give fragmentation-aware policies a sample of the workload (TaskShape list or (shape, p) pairs)."""
        self._typical_shapes = list(shapes)
        self._frag = None
        self._frag_demand = None


def pick_islands(gpus: list[int], island: list[int], k: int, same_island: bool) -> tuple[int, ...]:
    """k GPUs from ``gpus``: the smallest island that holds all k, else the largest islands first."""
    groups: dict[int, list[int]] = {}
    for g in gpus:
        groups.setdefault(island[g], []).append(g)
    if len(groups) == 1:
        return tuple(gpus[:k])
    fitting = [gs for gs in groups.values() if len(gs) >= k]
    if fitting:
        return tuple(min(fitting, key=lambda gs: (len(gs), gs[0]))[:k])
    if same_island:
        raise SchedulerError("no island holds the GPUs; the island filter should have said so")
    out: list[int] = []
    for gs in sorted(groups.values(), key=lambda gs: (-len(gs), gs[0])):
        out.extend(gs[: k - len(out)])
        if len(out) == k:
            break
    return tuple(sorted(out))


def _placed_text(assignments) -> str:
    return "; ".join(f"{a.node_id} GPUs {list(a.gpu_indices)}" for a in assignments)
