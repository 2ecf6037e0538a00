"""Fast path of the fragmentation policies (fgd, fgd-plus, fgd-balanced): memoised per node free-state.

A node's expected fragmentation depends only on its *free state* — GPU model
and the multiset of usable free milli per GPU — and on which CPU threshold of
the typical tasks its free CPU lies under. Many nodes share a free state, and a
state's numbers never change, so they are computed once:

    state sid      = (model, free milli sorted descending)      (registry, grows)
    Fb[sid, ci]    = F of that state with CPU index ci            (all ci at once)
    per task shape (num, milli, models):
      ok[sid]      = the shape fits the state's GPUs
      A[sid, ci]   = max over GPU choices of −F(state after, ci)  (whole: lowest free GPUs)
      V[sid, ci]   = the free milli of the GPU chosen (shares)

One decision is then a handful of numpy operations over the nodes:
feasible = schedulable ∧ CPU ∧ memory ∧ ok[sid[n]]; delta = Fb[sid, ci_before]
+ A[sid, ci_after]; score and select as the policy says (ties: node order).

Only simple requests take this path (one replica, no selector, no topology
constraint, no quota for the tenant, single-model nodes); everything else, and
every failure (which must be explained), goes through the full pipeline.
"""
from __future__ import annotations

import numpy as np

from scheduler.types import MILLI, Assignment, Topology

_GROW = 256


class FragIndex:
    def __init__(self, engine):
        self.engine = engine
        self.c = engine.cluster
        self.model_source = None            # callable → FragModel; None: the engine's (workload sample)
        self.cand_cpu_free = None           # free CPU of the last candidates() answer, in its order
        self.reset()

    def reset(self) -> None:
        self.fm = None
        self.sig: dict = {}                 # (model, free tuple) → sid
        self.st: list = []                  # sid → (model, free tuple)
        self.Fb = np.zeros((0, 1))
        self.n_fb = 0
        self.tasks: dict = {}               # task key → [ok, A, V, filled]
        self.sid = np.zeros(0, dtype=np.int64)
        self.mixed = 0                      # nodes with GPUs of several models, or none

    # ------------------------------------------------------------ maintenance (cluster listener)

    def _ensure_model(self) -> None:
        fm = self.model_source() if self.model_source is not None else self.engine.frag_model()
        if fm is not self.fm:
            self.fm = fm
            self.sig.clear()
            self.st.clear()
            self.Fb = np.zeros((_GROW, len(fm.cpu_thr) + 1))
            self.n_fb = 0
            self.state_total = np.zeros(0, dtype=np.int64)
            self.tasks.clear()
            self.sid = np.zeros(len(self.c.ids), dtype=np.int64)
            self.mixed = 0
            for n in range(len(self.c.ids)):
                self._set(n)

    def _state(self, model: int, free: tuple) -> int:
        k = (model, free)
        s = self.sig.get(k)
        if s is None:
            s = self.sig[k] = len(self.st)
            self.st.append(k)
        return s

    def _set(self, n: int) -> None:
        c = self.c
        if len(self.sid) <= n:
            self.sid = np.concatenate([self.sid, np.zeros(n + 1 - len(self.sid) + _GROW, dtype=np.int64)])
        row = c.gpu_free[n]
        models = c.gpu_model[n]
        if not c.alive[n]:
            self.sid[n] = self._state(-1, ())
            return
        if not row or any(m != models[0] for m in models):
            self.mixed += 1
        h = c.gpu_healthy[n]
        free = tuple(sorted((f if h[g] else 0 for g, f in enumerate(row)), reverse=True))
        self.sid[n] = self._state(models[0] if row else -1, free)

    def node_changed(self, n: int) -> None:
        if self.fm is not None:
            self.fm = None  # membership/health changed: rebuild lazily (rare)

    def node_gone(self, n: int) -> None:
        self.fm = None

    def gpus_changed(self, n: int, gpus, delta: int) -> None:
        if self.fm is None:
            return
        c = self.c
        row = c.gpu_free[n]
        h = c.gpu_healthy[n]
        free = tuple(sorted((f if h[g] else 0 for g, f in enumerate(row)), reverse=True))
        self.sid[n] = self._state(c.gpu_model[n][0], free)

    # ------------------------------------------------------------ memo tables

    def _fill_fb(self) -> None:
        n0, n1 = self.n_fb, len(self.st)
        if n1 <= n0:
            return
        fm = self.fm
        if self.Fb.shape[0] < n1:
            grow = np.zeros((max(n1, 2 * self.Fb.shape[0]), self.Fb.shape[1]))
            grow[:n0] = self.Fb[:n0]
            self.Fb = grow
        G = fm.G
        C = self.Fb.shape[1]
        gf = np.zeros((n1 - n0, G), dtype=np.int64)
        mod = np.zeros(n1 - n0, dtype=np.int64)
        for i, (m, free) in enumerate(self.st[n0:n1]):
            gf[i, :len(free)] = free[:G]
            mod[i] = max(m, 0)
        # F at every CPU index (cpu_left at each threshold), the GPU part once per state
        self.Fb[n0:n1, :] = fm.frag_bands(gf, mod)
        self.n_fb = n1
        self.state_total = np.concatenate([self.state_total[:n0], gf.sum(axis=1)])

    def _task(self, num: int, milli: int, models):
        key = (num, milli, models)
        t = self.tasks.get(key)
        if t is None:
            C = self.Fb.shape[1]
            # ok, A, V, filled
            t = self.tasks[key] = [np.zeros(_GROW, dtype=bool), np.full((_GROW, C), -np.inf),
                                   np.zeros((_GROW, C), dtype=np.int64), np.zeros(_GROW, dtype=bool), {}]
        return t

    def _fill_task(self, t, sids, num, milli, models) -> None:
        """Fill the task's tables for the states ``sids`` (only states some node is in)."""
        opts = []  # (sid, [(v, after sid)])
        for s in sids:
            m, free = self.st[s]
            if m < 0 or (models is not None and m not in models):
                continue
            if milli <= 0:
                opts.append((s, [(0, s)]))
            elif milli >= MILLI:
                if free.count(MILLI) >= num:
                    after = tuple(sorted(free[num:] + (0,) * num, reverse=True))
                    opts.append((s, [(MILLI, self._state(m, after))]))
            else:
                o = []
                for v in sorted(set(free)):
                    if v >= milli:
                        lst = list(free)
                        lst[lst.index(v)] = v - milli
                        o.append((v, self._state(m, tuple(sorted(lst, reverse=True)))))
                if o:
                    opts.append((s, o))
        self._fill_fb()
        n1 = len(self.st)
        if t[0].shape[0] < n1:
            size = max(n1 + _GROW, 2 * t[0].shape[0])
            n0 = t[0].shape[0]
            ok = np.zeros(size, dtype=bool)
            ok[:n0] = t[0]
            A = np.full((size, t[1].shape[1]), -np.inf)
            A[:n0] = t[1]
            V = np.zeros((size, t[1].shape[1]), dtype=np.int64)
            V[:n0] = t[2]
            filled = np.zeros(size, dtype=bool)
            filled[:n0] = t[3]
            t[0], t[1], t[2], t[3] = ok, A, V, filled
        Fb = self.Fb
        ok, A, V = t[0], t[1], t[2]
        for s, o in opts:
            ok[s] = True
            t[4][s] = o
            if len(o) == 1:
                A[s] = -Fb[o[0][1]]
                V[s] = o[0][0]
            else:
                vals = np.array([-Fb[a] for _, a in o])        # options × C
                j = vals.argmax(axis=0)                           # ties: smallest free value (best fit)
                A[s] = vals[j, np.arange(vals.shape[1])]
                V[s] = np.array([v for v, _ in o])[j]
        t[3][list(sids)] = True

    # ------------------------------------------------------------ placement

    def eligible(self, req) -> bool:
        eng = self.engine
        return (req.replicas == 1 and not req.node_selector
                and req.topology in (Topology.ANY, Topology.SPREAD, Topology.SAME_NODE)
                and not (eng.quota and eng._has_quota(req.tenant)))

    def candidates(self, req):
        """→ (cand nodes, delta per cand, task table, need tuple) or None (nothing fits: use the pipeline)."""
        self._ensure_model()
        if self.mixed:
            return None
        milli = req.per_gpu_milli()
        num = req.gpus_per_replica() if milli else 0
        models = self.engine._models_of(req)
        t = self._task(num, milli, models)
        a = self.c.arrays()
        cpu = req.cpu_milli
        cf = a["cpu_free"]
        sid = self.sid[:len(cf)]
        cand = np.flatnonzero(a["sched"] & (cf >= cpu) & (a["mem_free"] >= req.memory_mib))
        if len(cand) == 0:
            return None
        s = sid[cand]
        filled = t[3]
        if len(self.st) > len(filled) or not filled[s].all():
            lim = len(filled)
            todo = (s >= lim) | ~filled[np.minimum(s, lim - 1)] if lim else np.ones(len(s), dtype=bool)
            self._fill_task(t, np.unique(s[todo]).tolist(), num, milli, models)
        keep = t[0][s]
        cand = cand[keep]
        if len(cand) == 0:
            return None
        s = s[keep]
        thr = self.fm.cpu_thr
        c0 = self.cand_cpu_free = cf[cand]          # kept for policies that score CPU too
        cib = np.searchsorted(thr, c0, side="right")
        cia = np.searchsorted(thr, c0 - cpu, side="right")
        d = self.Fb[s, cib] + t[1][s, cia]
        return cand, d, t, s, cia, num, milli, cib

    def commit(self, req, n: int, t, s: int, ci: int, num: int, milli: int, quantise=None, cib: int = 0):
        """Reserve on node n. A share goes to the GPU of the best delta; with ``quantise`` (FGD's
        integer score), to the lowest-indexed GPU of the best quantised delta, as the paper does."""
        c = self.c
        if milli <= 0:
            gpus = ()
        elif milli >= MILLI:
            row, h = c.gpu_free[n], c.gpu_healthy[n]
            gs = [g for g in range(len(row)) if row[g] == MILLI and h[g]]
            if len(gs) == num:
                gpus = tuple(gs)
            else:
                from scheduler.engine import pick_islands

                gpus = pick_islands(gs, c.gpu_island[n], num, False)
        else:
            row, h = c.gpu_free[n], c.gpu_healthy[n]
            o = t[4][s]
            if quantise is None or len(o) == 1:
                v = int(t[2][s, ci])
                gpus = (next(g for g in range(len(row)) if row[g] == v and h[g]),)
            else:
                fb = self.Fb[s, cib]
                q = dict(zip((v for v, _ in o), quantise(np.array([fb - self.Fb[a, ci] for _, a in o])).tolist()))
                best = max(q.values())
                gpus = (next(g for g in range(len(row)) if h[g] and q.get(row[g]) == best),)
        asg = Assignment(c.ids[n], gpus, milli if gpus else 0, req.cpu_milli, req.memory_mib)
        self.engine._take_raw(n, asg, req.tenant)
        return asg
