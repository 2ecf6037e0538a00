"""The capacity view: per node and per GPU state held in compact arrays.

Python lists are the source of truth (cheap scalar updates on the hot path);
numpy mirrors of the same numbers serve the vectorised filter/score pipeline.
The mirrors are kept in step on every change when ``live_arrays`` is on (the
scoring policies). The indexed fast policy needs them only off its fast path (a
gang, an NVLink-island request, a failure to explain), so there they are built on
first use and then refreshed on use: only the nodes changed since the last use are
rewritten, so a change costs a set insertion and a use what changed since, never a
rebuild of the whole cluster (which at 10,000 nodes cost milliseconds per gang).

    NodeSpec ─► add_node ─► slot n ─┬─ cpu_free[n], mem_free[n], sched[n], labels[n]
                                    └─ gpu_free[n][g], gpu_model[n][g], island[n][g], healthy[n][g]
    take()/give() ─► lists (+ numpy mirrors) ─► listeners (the fast index)
"""
from __future__ import annotations

import numpy as np

from scheduler.types import MILLI, NodeSpec, SchedulerError


class Cluster:
    def __init__(self, *, live_arrays: bool = True):
        self.ids: list[str] = []
        self.index: dict[str, int] = {}
        self.specs: list[NodeSpec | None] = []
        self.alive: list[bool] = []
        self.schedulable: list[bool] = []
        self.cpu_cap: list[int] = []
        self.mem_cap: list[int] = []
        self.cpu_free: list[int] = []
        self.mem_free: list[int] = []
        self.gpu_free: list[list[int]] = []
        self.gpu_model: list[list[int]] = []
        self.gpu_island: list[list[int]] = []
        self.gpu_healthy: list[list[bool]] = []
        self.labels: list[dict] = []
        self.models: list[str] = []
        self.model_id: dict[str, int] = {}
        self.free_slots: list[int] = []
        self.gpus_max = 0
        self.live_arrays = live_arrays
        self._np: dict | None = None
        # Off live_arrays: the mirrors as last used, and the nodes changed since (None: build anew).
        self._lazy: dict | None = None
        self._dirty: set[int] = set()
        self.listeners: list = []  # objects with node_changed(n) / node_gone(n)

    # ------------------------------------------------------------ membership

    def model_of(self, name: str) -> int:
        mid = self.model_id.get(name)
        if mid is None:
            mid = self.model_id[name] = len(self.models)
            self.models.append(name)
        return mid

    def add_node(self, spec: NodeSpec) -> int:
        n = self.index.get(spec.node_id)
        if n is not None:
            if not self.specs[n].same_as(spec):
                raise SchedulerError(f"node {spec.node_id!r} already registered with a different spec")
            return n
        if spec.cpu_milli < 0 or spec.memory_mib < 0:
            raise SchedulerError(f"node {spec.node_id!r}: capacities must not be negative")
        if any(g.nvlink_island < 0 for g in spec.gpus):
            raise SchedulerError(f"node {spec.node_id!r}: NVLink island numbers must not be negative")
        gm = [self.model_of(g.model) for g in spec.gpus]
        row = ([MILLI] * len(gm), gm, [g.nvlink_island for g in spec.gpus], [True] * len(gm))
        if self.free_slots:
            n = self.free_slots.pop()
            self.ids[n] = spec.node_id
            self.specs[n] = spec
            self.alive[n] = True
            self.schedulable[n] = True
            self.cpu_cap[n] = self.cpu_free[n] = spec.cpu_milli
            self.mem_cap[n] = self.mem_free[n] = spec.memory_mib
            self.gpu_free[n], self.gpu_model[n], self.gpu_island[n], self.gpu_healthy[n] = row
            self.labels[n] = dict(spec.labels)
        else:
            n = len(self.ids)
            self.ids.append(spec.node_id)
            self.specs.append(spec)
            self.alive.append(True)
            self.schedulable.append(True)
            self.cpu_cap.append(spec.cpu_milli)
            self.cpu_free.append(spec.cpu_milli)
            self.mem_cap.append(spec.memory_mib)
            self.mem_free.append(spec.memory_mib)
            self.gpu_free.append(row[0])
            self.gpu_model.append(row[1])
            self.gpu_island.append(row[2])
            self.gpu_healthy.append(row[3])
            self.labels.append(dict(spec.labels))
        self.index[spec.node_id] = n
        self.gpus_max = max(self.gpus_max, len(gm))
        self._np = self._lazy = None  # shape changed: rebuild mirrors on next use
        for lst in self.listeners:
            lst.node_changed(n)
        return n

    def remove_node(self, node_id: str) -> int:
        n = self.index.pop(node_id)
        for lst in self.listeners:
            lst.node_gone(n)
        self.alive[n] = False
        self.schedulable[n] = False
        self.specs[n] = None
        self.ids[n] = ""
        self.cpu_cap[n] = self.cpu_free[n] = self.mem_cap[n] = self.mem_free[n] = 0
        self.gpu_free[n], self.gpu_model[n], self.gpu_island[n], self.gpu_healthy[n] = [], [], [], []
        self.labels[n] = {}
        self.free_slots.append(n)
        self._np = self._lazy = None
        return n

    def is_empty(self, n: int) -> bool:
        return (self.cpu_free[n] == self.cpu_cap[n] and self.mem_free[n] == self.mem_cap[n]
                and all(f == MILLI for f in self.gpu_free[n]))

    def set_schedulable(self, n: int, value: bool) -> None:
        self.schedulable[n] = value
        if self._np is not None:
            self._np["sched"][n] = value and self.alive[n]
        elif self._lazy is not None:
            self._dirty.add(n)
        for lst in self.listeners:
            lst.node_changed(n)

    def set_gpu_healthy(self, n: int, g: int, value: bool) -> None:
        self.gpu_healthy[n][g] = value
        if self._np is not None:
            self._np["gusable"][n, g] = value
        elif self._lazy is not None:
            self._dirty.add(n)
        for lst in self.listeners:
            lst.node_changed(n)

    # ------------------------------------------------------------ capacity

    def take(self, n: int, gpus: tuple[int, ...], milli: int, cpu: int, mem: int) -> None:
        """Reserve; the caller has checked the fit (asserted here: a failure is a bug)."""
        if self.cpu_free[n] < cpu or self.mem_free[n] < mem:
            raise SchedulerError(f"over-commit of CPU/memory on {self.ids[n]}")
        row = self.gpu_free[n]
        for g in gpus:
            if row[g] < milli:
                raise SchedulerError(f"over-commit of GPU {g} on {self.ids[n]}")
        self.cpu_free[n] -= cpu
        self.mem_free[n] -= mem
        for g in gpus:
            row[g] -= milli
        a = self._np
        if a is not None:
            a["cpu_free"][n] -= cpu
            a["mem_free"][n] -= mem
            gf = a["gfree"]
            for g in gpus:
                gf[n, g] -= milli
        elif self._lazy is not None:
            self._dirty.add(n)
        for lst in self.listeners:
            lst.gpus_changed(n, gpus, -milli)

    def give_lists(self, n: int, gpus: tuple[int, ...], milli: int, cpu: int, mem: int) -> None:
        """give()'s check and its update of the lists, no more: the fast index's release calls it and
        does the rest itself (scheduler/index.py, FastIndex.give)."""
        row = self.gpu_free[n]
        cf = self.cpu_free[n] + cpu
        mf = self.mem_free[n] + mem
        if cf > self.cpu_cap[n] or mf > self.mem_cap[n]:
            raise SchedulerError(f"release returned more than capacity on {self.ids[n]}")
        for g in gpus:
            if row[g] + milli > MILLI:
                raise SchedulerError(f"release returned more than capacity on {self.ids[n]}")
        self.cpu_free[n] = cf
        self.mem_free[n] = mf
        for g in gpus:
            row[g] += milli

    def give(self, n: int, gpus: tuple[int, ...], milli: int, cpu: int, mem: int) -> None:
        self.give_lists(n, gpus, milli, cpu, mem)
        a = self._np
        if a is not None:
            a["cpu_free"][n] += cpu
            a["mem_free"][n] += mem
            gf = a["gfree"]
            for g in gpus:
                gf[n, g] += milli
        elif self._lazy is not None:
            self._dirty.add(n)
        for lst in self.listeners:
            lst.gpus_changed(n, gpus, milli)

    # ------------------------------------------------------------ vector view

    def arrays(self) -> dict:
        """numpy view of the whole cluster: the live mirrors, or (off ``live_arrays``) the mirrors of
        the last use with the nodes changed since rewritten. Callers read it; changes go through
        take/give and the setters."""
        if self._np is not None:
            return self._np
        if self.live_arrays:
            self._np = self._build_arrays()
            return self._np
        a = self._lazy
        if a is None or len(self._dirty) > len(self.ids) // 4:
            a = self._lazy = self._build_arrays()
        else:
            for n in self._dirty:
                self._write_node(a, n)
        self._dirty.clear()
        return a

    def _write_node(self, a: dict, n: int) -> None:
        """Bring node ``n``'s row of the mirrors in line with the lists (its free capacity, health and
        schedulability; its shape only changes by add_node/remove_node, which rebuild)."""
        a["cpu_free"][n] = self.cpu_free[n]
        a["mem_free"][n] = self.mem_free[n]
        a["sched"][n] = self.schedulable[n] and self.alive[n]
        k = len(self.gpu_free[n])
        if k:
            a["gfree"][n, :k] = self.gpu_free[n]
            a["gusable"][n, :k] = self.gpu_healthy[n]

    def _build_arrays(self) -> dict:
        N, G = len(self.ids), max(1, self.gpus_max)
        gfree = np.zeros((N, G), dtype=np.int64)
        gmodel = np.full((N, G), -1, dtype=np.int64)
        gisland = np.zeros((N, G), dtype=np.int64)
        gusable = np.zeros((N, G), dtype=bool)
        for n in range(N):
            k = len(self.gpu_free[n])
            if k:
                gfree[n, :k] = self.gpu_free[n]
                gmodel[n, :k] = self.gpu_model[n]
                gisland[n, :k] = self.gpu_island[n]
                gusable[n, :k] = self.gpu_healthy[n]
        return {
            "cpu_free": np.array(self.cpu_free, dtype=np.int64),
            "mem_free": np.array(self.mem_free, dtype=np.int64),
            "cpu_cap": np.array(self.cpu_cap, dtype=np.int64),
            "mem_cap": np.array(self.mem_cap, dtype=np.int64),
            "sched": np.array([s and a for s, a in zip(self.schedulable, self.alive)], dtype=bool),
            "gfree": gfree, "gmodel": gmodel, "gisland": gisland, "gusable": gusable,
            "islands": int(gisland.max(initial=0)) + 1,  # island ids change only with membership
            "gcount": np.array([len(r) for r in self.gpu_free], dtype=np.int64),
        }

    # ------------------------------------------------------------ invariants

    def check(self, expected_gpu_used: dict | None = None) -> None:
        for n in range(len(self.ids)):
            if not self.alive[n]:
                continue
            assert 0 <= self.cpu_free[n] <= self.cpu_cap[n], f"cpu out of range on {self.ids[n]}"
            assert 0 <= self.mem_free[n] <= self.mem_cap[n], f"memory out of range on {self.ids[n]}"
            for g, f in enumerate(self.gpu_free[n]):
                assert 0 <= f <= MILLI, f"GPU {g} free {f} out of range on {self.ids[n]}"
        mirrors = self._np if self._np is not None else (self.arrays() if self._lazy is not None else None)
        if mirrors is not None:
            fresh = self._build_arrays()
            for k in ("cpu_free", "mem_free", "gfree", "sched", "gusable"):
                assert np.array_equal(fresh[k], mirrors[k]), f"numpy mirror {k} drifted from the lists"
