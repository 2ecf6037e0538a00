"""The fast policy's index: buckets of nodes by free whole GPUs and of GPUs by free share.

    whole[model][k]   nodes with exactly k entirely free, healthy GPUs of that model
    share[model][b]   partly used healthy GPUs whose free milli lies in [b·50, b·50+50)

Best fit without scanning the cluster: a k-GPU request looks at buckets
k, k+1, …; a share looks at the share buckets from its size upwards and then
at a free GPU on the node with the fewest free GPUs. A k-GPU request on one
NVLink island takes the first node in that order with k free GPUs on one of its
islands. Each reservation and release moves a node or a GPU between buckets in
O(1). A gang with no topology constraint takes the index replica by replica,
each reserved before the next is looked for, and is given back whole when one
is not found (Engine._index_gang). The scan is bounded (``SCAN_MAX``); past it,
or when the request needs the general pipeline (a gang on one node, rack or
spread, CPU-only), the engine falls back to the exhaustive filter → score path,
which is also what explains a failure.
Nodes with GPUs of several models are left to that path.
"""
from __future__ import annotations

from scheduler.types import MILLI, Assignment, Topology

SHARE_BUCKET_MILLI = 50
SHARE_BUCKETS = MILLI // SHARE_BUCKET_MILLI
SCAN_MAX = 512
GPU_BITS = 8


class FastIndex:
    def __init__(self, engine):
        self.engine = engine
        self.c = engine.cluster
        self.whole: list[list[dict]] = []    # [model][k] → {node: None}
        self.share: list[list[dict]] = []    # [model][bucket] → {node<<8|gpu: None}
        self.full: dict[int, int] = {}       # node → its k (indexed nodes only)
        self.model: dict[int, int] = {}      # node → its single model
        self.sick: set[int] = set()          # indexed nodes with an unhealthy GPU (slow bucket moves)
        self.one_island: set[int] = set()    # indexed nodes whose GPUs all share one NVLink island

    # ------------------------------------------------------------ maintenance

    def _grow(self, mid: int) -> None:
        G = max(self.c.gpus_max, 1)
        while len(self.whole) <= mid:
            self.whole.append([{} for _ in range(G + 1)])
            self.share.append([{} for _ in range(SHARE_BUCKETS)])
        for lst in self.whole:
            while len(lst) <= G:
                lst.append({})

    def node_gone(self, n: int) -> None:
        m = self.model.pop(n, None)
        if m is None:
            return
        k = self.full.pop(n)
        self.sick.discard(n)
        self.one_island.discard(n)
        self.whole[m][k].pop(n, None)
        for g, f in enumerate(self.c.gpu_free[n]):
            if 0 < f < MILLI:
                self.share[m][f // SHARE_BUCKET_MILLI].pop(n << GPU_BITS | g, None)

    def node_changed(self, n: int) -> None:
        self.node_gone(n)
        c = self.c
        if not (c.alive[n] and c.schedulable[n]) or not c.gpu_free[n]:
            return
        models = set(c.gpu_model[n])
        if len(models) != 1:
            return
        (m,) = models
        self._grow(m)
        healthy = c.gpu_healthy[n]
        k = 0
        for g, f in enumerate(c.gpu_free[n]):
            if not healthy[g]:
                continue
            if f == MILLI:
                k += 1
            elif f > 0:
                self.share[m][f // SHARE_BUCKET_MILLI][n << GPU_BITS | g] = None
        self.model[n] = m
        self.full[n] = k
        if not all(healthy):
            self.sick.add(n)
        if len(set(c.gpu_island[n])) == 1:
            self.one_island.add(n)
        self.whole[m][k][n] = None

    def gpus_changed(self, n: int, gpus, delta: int) -> None:
        m = self.model.get(n)
        if m is None:
            return
        if (delta == MILLI or delta == -MILLI) and n not in self.sick:
            # whole GPUs: each went 1000 → 0 or 0 → 1000, no share bucket moves
            k0 = self.full[n]
            k = k0 + len(gpus) if delta > 0 else k0 - len(gpus)
            w = self.whole[m]
            del w[k0][n]
            w[k][n] = None
            self.full[n] = k
            return
        row = self.c.gpu_free[n]
        healthy = self.c.gpu_healthy[n]
        share = self.share[m]
        k = k0 = self.full[n]
        for g in gpus:
            if not healthy[g]:
                continue
            new = row[g]
            old = new - delta
            if old == MILLI:
                k -= 1
            elif old > 0:
                share[old // SHARE_BUCKET_MILLI].pop(n << GPU_BITS | g, None)
            if new == MILLI:
                k += 1
            elif new > 0:
                share[new // SHARE_BUCKET_MILLI][n << GPU_BITS | g] = None
        if k != k0:
            w = self.whole[m]
            del w[k0][n]
            w[k][n] = None
            self.full[n] = k

    def check(self) -> None:
        """Rebuild from scratch and compare (invariant check)."""
        shadow = FastIndex(self.engine)
        for n in range(len(self.c.ids)):
            shadow.node_changed(n)
        assert shadow.full == self.full, "fast index: whole-GPU buckets drifted"
        assert shadow.sick == self.sick and shadow.one_island == self.one_island, "fast index: node sets drifted"
        mine = [[set(b) for b in bs] for bs in self.share]
        theirs = [[set(b) for b in bs] for bs in shadow.share]
        assert mine[:len(theirs)] == theirs and all(not any(bs) for bs in mine[len(theirs):]), \
            "fast index: share buckets drifted"

    # ------------------------------------------------------------ placement

    def place(self, req) -> tuple[Assignment, int] | None:
        """Best fit through the buckets; reserves and returns (the assignment, its node slot), or None to
        fall back."""
        milli = req.gpu_milli
        if 0 < milli < MILLI:
            num = 1
        elif req.num_gpu > 0:
            num, milli = req.num_gpu, MILLI
        else:
            return None
        eng = self.engine
        if req.gpu_models:
            mids = [eng.cluster.model_id[x] for x in req.gpu_models if x in eng.cluster.model_id]
            mids = [m for m in mids if m < len(self.whole)]
        else:
            mids = range(len(self.whole))
        if eng.quota and eng._has_quota(req.tenant):
            demand = num * milli
            mids = [m for m in mids if eng._quota_left(req.tenant, m) >= demand]
        if not mids:
            return None
        c = self.c
        cpu_free, mem_free = c.cpu_free, c.mem_free
        cpu, mem, sel = req.cpu_milli, req.memory_mib, req.node_selector
        budget = SCAN_MAX
        if milli < MILLI:
            gpu_free = c.gpu_free
            for b in range(milli // SHARE_BUCKET_MILLI, SHARE_BUCKETS):
                for m in mids:
                    for key in self.share[m][b]:
                        n = key >> GPU_BITS
                        g = key & 0xFF
                        if gpu_free[n][g] >= milli and cpu_free[n] >= cpu and mem_free[n] >= mem and (
                                not sel or _match(c.labels[n], sel)):
                            return self._take(n, (g,), milli, req)
                        budget -= 1
                        if budget <= 0:
                            return None
        island = num > 1 and req.topology is Topology.SAME_NVLINK_ISLAND
        G = len(self.whole[mids[0]]) - 1
        for k in range(num, G + 1):
            for m in mids:
                for n in self.whole[m][k]:
                    if cpu_free[n] >= cpu and mem_free[n] >= mem and (not sel or _match(c.labels[n], sel)):
                        gpus = self._pick(n, num, island)
                        if gpus is not None:
                            return self._take(n, gpus, milli, req)
                    budget -= 1
                    if budget <= 0:
                        return None
        return None

    def _pick(self, n: int, num: int, island: bool = False) -> tuple[int, ...] | None:
        """``num`` of node n's free healthy GPUs (on one NVLink island when ``island``: None when no
        island of the node has that many free)."""
        c = self.c
        row = c.gpu_free[n]
        if n in self.one_island and n not in self.sick:
            # The common node: any free GPUs will do, and the first ``num`` are found in C (the node's
            # bucket says it has at least ``num`` entirely free).
            if num == 1:
                return (row.index(MILLI),)
            out, g = [], -1
            for _ in range(num):
                g = row.index(MILLI, g + 1)
                out.append(g)
            return tuple(out)
        healthy, isl = c.gpu_healthy[n], c.gpu_island[n]
        gs = [g for g in range(len(row)) if row[g] == MILLI and healthy[g]]
        if num == len(gs) and not island:
            return tuple(gs)
        if n in self.one_island:  # a sick node with one island: the first of its free healthy GPUs
            return tuple(gs[:num])
        from scheduler.engine import pick_islands

        if island:
            per: dict[int, int] = {}
            for g in gs:
                per[isl[g]] = per.get(isl[g], 0) + 1
            if max(per.values(), default=0) < num:
                return None
        return pick_islands(gs, isl, num, island)

    def _take(self, n: int, gpus: tuple[int, ...], milli: int, req) -> tuple[Assignment, int]:
        """Reserve what ``place`` found (its fit is already checked) and charge the tenant."""
        c = self.c
        cpu, mem = req.cpu_milli, req.memory_mib
        a = Assignment(c.ids[n], gpus, milli, cpu, mem)
        if c._np is not None or len(c.listeners) != 1:
            self.engine._take_raw(n, a, req.tenant)
            return a, n
        c.cpu_free[n] -= cpu
        c.mem_free[n] -= mem
        row = c.gpu_free[n]
        for g in gpus:
            row[g] -= milli
        if c._lazy is not None:
            c._dirty.add(n)  # Cluster.take's bookkeeping of the mirrors, inlined
        self.gpus_changed(n, gpus, -milli)
        eng = self.engine
        d = milli * len(gpus)
        t = req.tenant
        k = (t, self.model[n])
        used = eng.used
        used[k] = used.get(k, 0) + d
        ut = eng.used_total
        ut[t] = ut.get(t, 0) + d
        return a, n

    def give(self, n: int, gpus: tuple[int, ...], milli: int, cpu: int, mem: int) -> bool:
        """Cluster.give for an indexed node while this index is the cluster's only listener and no numpy
        mirror is live (the listener loop and the mirror checks skipped); False, with nothing done,
        otherwise, for Cluster.give to do."""
        c = self.c
        if c._np is not None or len(c.listeners) != 1 or n not in self.model:
            return False
        c.give_lists(n, gpus, milli, cpu, mem)  # raises, as Cluster.give does, on a release past capacity
        if c._lazy is not None:
            c._dirty.add(n)
        self.gpus_changed(n, gpus, milli)
        return True


def _match(labels: dict, sel) -> bool:
    for k, v in sel.items():
        if labels.get(k) != v:
            return False
    return True
