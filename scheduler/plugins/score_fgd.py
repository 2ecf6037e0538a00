"""Score: fragmentation gradient descent, the FGD paper's policy.

Score = ⌊100·sigmoid((F_before − F_after)/1000)⌋ where F is the node's expected
fragmentation against the typical tasks (scheduler/frag.py). A share picks,
on each node, the GPU with the best score (lowest index on ties); whole GPUs
take the lowest-indexed free ones, as in the paper's simulator.
"""
import numpy as np

from scheduler.types import MILLI, PolicyName

NAME = "FGD"
POLICY = PolicyName.FGD


def deltas(a, need, cand, ctx, fm=None):
    """(F_before − F_after) per candidate (whole) or per candidate × GPU (share; −inf where it cannot go)."""
    fm = fm or ctx.frag_model()
    usable = a["gusable"][cand]
    gfree = a["gfree"][cand] * usable
    cpu = a["cpu_free"][cand]
    model = a["gmodel"][cand, 0]
    before = fm.frag(cpu, gfree, model)
    if need.milli <= 0:
        return before - fm.frag(cpu - need.cpu, gfree, model)
    if need.milli >= MILLI:
        full = (gfree == MILLI) & ctx.model_ok(a, need)[cand]
        take = full & (np.cumsum(full, axis=1) <= need.num)
        return before - fm.frag(cpu - need.cpu, np.where(take, 0, gfree), model)
    C, G = gfree.shape
    fits = (gfree >= need.milli) & ctx.model_ok(a, need)[cand] & usable
    # GPUs of one node with the same free milli lead to the same state: score the first of each value only
    same_before = np.triu(np.ones((G, G), dtype=bool), 1)  # [h, g]: h < g
    dup = ((gfree[:, :, None] == gfree[:, None, :]) & fits[:, :, None] & same_before[None, :, :]).any(axis=1)
    first = fits & ~dup
    rows, cols = np.nonzero(first)
    after = gfree[rows].copy()
    after[np.arange(len(rows)), cols] -= need.milli
    fa = fm.frag(cpu[rows] - need.cpu, after, model[rows])
    out = np.full((C, G), -np.inf)
    out[rows, cols] = before[rows] - fa
    return out

def quantise(d):
    with np.errstate(over="ignore"):
        return np.floor(100.0 / (1.0 + np.exp(-d / 1000.0))).astype(np.int64)


def score(a, need, cand, ctx):
    d = deltas(a, need, cand, ctx)
    if d.ndim == 1:
        return quantise(d)
    q = np.where(np.isfinite(d), quantise(np.where(np.isfinite(d), d, 0.0)), -1)
    ctx.gpu_hint = q.argmax(axis=1)  # first GPU with the best integer score, per candidate
    return q.max(axis=1)


def select(q, cand, rank):
    """Index into ``cand`` of the best score; ties go to the lowest node-order rank."""
    best = q.max()
    tie = np.flatnonzero(q == best)
    if len(tie) == 1:
        return int(tie[0])
    return int(tie[np.argmin(rank[cand[tie]])])


def fast(fx, req, rank):
    """The memoised path (scheduler/fragindex.py): same score, per free-state tables."""
    r = fx.candidates(req)
    if r is None:
        return None
    cand, d, t, s, cia, num, milli, cib = r
    j = select(quantise(d), cand, rank)
    return fx.commit(req, int(cand[j]), t, int(s[j]), int(cia[j]), num, milli, quantise, int(cib[j]))
