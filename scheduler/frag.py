"""Expected GPU fragmentation of a node, measured against a workload's typical tasks.

From the FGD paper (Weng et al., USENIX ATC'23): for every typical task t
(frequency p_t) a node's free GPU milli counts as fragmented when t could not
use it: all of it when t cannot run on the node at all (model, CPU, too few
GPUs), otherwise the free milli of the GPUs too small for t's share.

We use the equivalent form  F = total_free − Σ_t p_t·ok_t·usable_t,  grouped
by the distinct per-GPU demand u of the typical tasks, so that one pass over
each u serves every task with that u:

    F = total − Σ_u usable_u · W[model, u, min(count_u, G), cpu_idx(cpu_left)]

with count_u / usable_u the number / free milli of GPUs with ≥ u free, and W
the summed frequency of tasks with demand u that need ≤ count_u GPUs and
≤ cpu_left CPU on a node of that model.
"""
from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np

from scheduler.types import MILLI


@dataclasses.dataclass(frozen=True)
class TaskShape:
    cpu_milli: int
    num_gpu: int
    gpu_milli: int            # per GPU
    models: tuple[str, ...] = ()


def typical_shapes(shapes: list[TaskShape], *, coverage: float = 0.95,
                   include_cpu: bool = True) -> list[tuple[TaskShape, float]]:
    """The most frequent task shapes covering ``coverage`` of all tasks, with normalised frequencies.

    CPU-only tasks take part (as in the paper's runs): they cannot use any GPU,
    so for them every free GPU milli counts as fragment.
    """
    return typical_of_counts(Counter(s for s in shapes if include_cpu or (s.num_gpu > 0 and s.gpu_milli > 0)),
                             coverage=coverage)


def typical_of_counts(counts: Counter, *, coverage: float = 0.95) -> list[tuple[TaskShape, float]]:
    """``typical_shapes`` from shape counts."""
    total = sum(counts.values())
    if not total:
        return []
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0].cpu_milli, kv[0].gpu_milli, kv[0].num_gpu,
                                                      kv[0].models))
    out, cum = [], 0
    for shape, c in ordered:
        if cum >= coverage * total:
            break
        out.append((shape, c))
        cum += c
    return [(s, c / cum) for s, c in out]


class FragModel:
    def __init__(self, typical: list[tuple[TaskShape, float]], model_id: dict[str, int], gpus_max: int):
        self.typical = typical
        self.G = max(1, gpus_max)
        self.typical_all = list(typical)
        # CPU-only typical tasks never use a GPU: they add p·total to F and need no term below
        typical = [(s, p) for s, p in typical if s.num_gpu > 0 and s.gpu_milli > 0]
        self.u_vals = np.array(sorted({s.gpu_milli for s, _ in typical}) or [MILLI], dtype=np.int64)
        self.cpu_thr = np.array(sorted({s.cpu_milli for s, _ in typical}) or [0], dtype=np.int64)
        typed = any(s.models for s, _ in typical)
        M = max(1, len(model_id)) if typed else 1
        self.typed = typed
        W = np.zeros((M, len(self.u_vals), self.G + 1, len(self.cpu_thr) + 1))
        for s, p in typical:
            ui = int(np.searchsorted(self.u_vals, s.gpu_milli))
            ci = int(np.searchsorted(self.cpu_thr, s.cpu_milli)) + 1
            ms = range(M) if not s.models else [model_id[m] for m in s.models if m in model_id]
            if s.num_gpu > self.G:
                continue  # never fits a node of this cluster: it only ever sees fragments
            for m in ms:
                W[m, ui, s.num_gpu:, ci:] += p
        self.W = W

    def frag(self, cpu_left: np.ndarray, gfree: np.ndarray, model: np.ndarray) -> np.ndarray:
        """Expected fragmented GPU milli of each node state (rows of ``gfree``, unusable GPUs as 0)."""
        total = gfree.sum(axis=1).astype(float)
        ci = np.searchsorted(self.cpu_thr, cpu_left, side="right")
        m = model if self.typed else 0
        U = len(self.u_vals)
        # every demand u at once (rows × U × G); the subtractions stay in the order of u so that the
        # result is bit-identical to subtracting one u at a time
        ge = gfree[:, None, :] >= self.u_vals[None, :, None]
        cnt = np.minimum(ge.sum(axis=2), self.G)
        usable = (gfree[:, None, :] * ge).sum(axis=2)
        ui = np.arange(U)[None, :]
        w = self.W[np.asarray(m)[:, None] if self.typed else 0, ui, cnt, ci[:, None]]
        contrib = usable * w
        F = total
        for u in range(U):
            F = F - contrib[:, u]
        return F


    def frag_bands(self, gfree: np.ndarray, model: np.ndarray) -> np.ndarray:
        """F of each node state (rows of ``gfree``) at every CPU index 0..len(cpu_thr): rows × indices.

        The same numbers as ``frag`` with cpu_left at each threshold, but the GPU part is computed once
        per state instead of once per CPU index; bit-identical (the same products, subtracted in the
        same order of u).
        """
        total = gfree.sum(axis=1).astype(float)
        U = len(self.u_vals)
        ge = gfree[:, None, :] >= self.u_vals[None, :, None]
        cnt = np.minimum(ge.sum(axis=2), self.G)                               # rows × U
        usable = (gfree[:, None, :] * ge).sum(axis=2)                          # rows × U
        m = np.asarray(model)[:, None] if self.typed else 0
        w = self.W[m, np.arange(U)[None, :], cnt, :]                           # rows × U × C
        terms = np.empty((len(gfree), U + 1, w.shape[2]))
        terms[:, 0, :] = total[:, None]
        terms[:, 1:, :] = usable[:, :, None] * w
        return np.subtract.reduce(terms, axis=1)                              # total − t₁ − t₂ − …


def demand_weighted(typical: list[tuple[TaskShape, float]]) -> list[tuple[TaskShape, float]]:
    """Re-weigh typical tasks by frequency × GPU demand: a GPU left unusable for an 8-GPU task costs
    eight times what it costs a 1-GPU task, and unallocated GPU is what we minimise."""
    w = [(s, p * (s.num_gpu * s.gpu_milli / MILLI if s.num_gpu > 0 and s.gpu_milli > 0 else 0.0))
         for s, p in typical]
    tot = sum(p for _, p in w) or 1.0
    gpu_share = sum(p for s, p in typical if s.num_gpu > 0 and s.gpu_milli > 0)
    # keep the CPU-only tasks' share of probability mass (they only add a constant fragment term)
    return [(s, p / tot * gpu_share) for s, p in w if p > 0] + [(s, p) for s, p in typical
                                                                 if not (s.num_gpu > 0 and s.gpu_milli > 0)]


class OnlineWorkload:
    """What a scheduler can know of its workload: the requests it has scored so far, never the future.

    It keeps
      - the count of each task shape, from which the typical tasks (the most frequent
        shapes covering ``coverage`` of the tasks) are rebuilt at arrivals 1, g, g², …
        (g = ``refresh_growth``) up to ``refresh_max`` and then every ``refresh_max``
        arrivals (each rebuild invalidates the fragmentation memo tables, so rebuilds
        are kept rare: four in the first 3,000 arrivals with g = 8);
      - the CPU milli of GPU tasks, their GPU milli, and the CPU milli of CPU-only tasks,
        for the CPU-stranding term of the fgd-balanced policy.
    """

    def __init__(self, *, coverage: float = 0.95, refresh_growth: int = 8, refresh_max: int = 4096):
        self.coverage = coverage
        self.refresh_growth = max(2, refresh_growth)
        self.refresh_max = refresh_max
        self.counts: Counter = Counter()         # (cpu_milli, num_gpu, gpu_milli, models) → arrivals
        self.arrived = 0
        self.gpu_task_cpu_milli = 0
        self.gpu_task_gpu_milli = 0
        self.cpu_task_cpu_milli = 0
        self._next_refresh = 1
        self._fm: FragModel | None = None
        self._fm_key: tuple = ()

    def observe(self, shape: TaskShape, count: int = 1) -> None:
        self.observe_parts(shape.cpu_milli, shape.num_gpu, shape.gpu_milli, shape.models, count)

    def observe_parts(self, cpu_milli: int, num_gpu: int, gpu_milli: int, models: tuple = (),
                      count: int = 1) -> None:
        """``observe(TaskShape(...))`` without building the shape (the per-decision path)."""
        self.counts[(cpu_milli, num_gpu, gpu_milli, models)] += count
        self.arrived += count
        if num_gpu > 0 and gpu_milli > 0:
            self.gpu_task_cpu_milli += cpu_milli * count
            self.gpu_task_gpu_milli += num_gpu * gpu_milli * count
        else:
            self.cpu_task_cpu_milli += cpu_milli * count
        if self.arrived >= self._next_refresh:
            self._fm = None
            while self._next_refresh <= self.arrived:
                self._next_refresh = (self._next_refresh * self.refresh_growth if self._next_refresh < self.refresh_max
                                      else self._next_refresh + self.refresh_max)

    def model(self, model_id: dict[str, int], gpus_max: int) -> FragModel:
        """The fragmentation model against the typical tasks seen so far (rebuilt only at refresh points,
        or when the cluster gains a GPU model or a larger node)."""
        key = (len(model_id), gpus_max)
        if self._fm is None or key != self._fm_key:
            typical = typical_of_counts(Counter({TaskShape(*k): c for k, c in self.counts.items()}),
                                        coverage=self.coverage)
            self._fm = FragModel(typical, model_id, gpus_max)
            self._fm_key = key
        return self._fm

    def gpu_per_cpu(self, alpha: float) -> float:
        """GPU milli that one CPU milli feeds: GPU tasks' GPU over their CPU plus ``alpha`` × CPU-only tasks'
        CPU (0 before the first GPU task)."""
        cpu = self.gpu_task_cpu_milli + alpha * self.cpu_task_cpu_milli
        if self.gpu_task_gpu_milli <= 0 or cpu <= 0:
            return 0.0
        return self.gpu_task_gpu_milli / cpu
