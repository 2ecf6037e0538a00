"""Score: ours — FGD's fragmentation gradient, learned online, plus a CPU-stranding term.

    score = ⌊100·sigmoid((ΔF − λ·ΔS)/1000)⌋         (ties: the seeded node order, as FGD)

- ΔF = F_before − F_after, FGD's fragmentation gradient (scheduler/frag.py), but
  measured against the typical tasks of the requests this engine has scored so
  far (``OnlineWorkload``), not a sample of the whole trace: the policy only knows
  the cluster and the past.
- S is the GPU milli of a node that its free CPU cannot feed at the arrival
  mix's CPU-per-GPU ratio:  S = max(0, free_gpu_milli − k·free_cpu_milli),
  k = Σ GPU milli of GPU tasks / (Σ CPU of GPU tasks + α·Σ CPU of CPU-only tasks).
  ΔS = S_after − S_before. Placing CPU on a node whose GPUs need it is penalised;
  placing a GPU task with little CPU on a node short of CPU is rewarded. α > 0
  counts part of the CPU-only tasks' demand, which competes for the same CPU.

Why: on the openb traces most of FGD's avoidable loss is GPUs left idle on nodes
whose CPU ran out (docs/scheduler.md). FGD's F sees CPU only through "does one
typical task still fit", not through how much CPU all the node's free GPUs will
need.

The share's GPU on the chosen node is FGD's (lowest-indexed GPU of the best
integer gradient): S does not depend on which GPU of the node takes the share.

What counts as an arrival: every request the policy scores. Through the
filter → score pipeline that includes dry runs (``Engine.explain``, preemption
planning), which therefore also count towards the learned mix; the fast path
only sees real placements. Releases do not un-count anything: the mix is that of
arrivals, not of what is running.

Options (``Engine(policy_options={...})``, defaults in ``DEFAULTS``): ``strand`` (λ),
``alpha`` (α), ``typical`` (``online``, or ``sample``: the engine's workload
sample, as FGD — for comparison only).
"""
import math
import weakref

import numpy as np

from scheduler.frag import OnlineWorkload
from scheduler.plugins import score_fgd
from scheduler.types import PolicyName

NAME = "FGDBalanced"
POLICY = PolicyName.FGD_BALANCED
DEFAULTS = {"strand": 1.0, "alpha": 0.4, "typical": "online"}

class _PerEngine:
    """What the policy keeps per engine: its online workload and its options (re-read when replaced)."""

    __slots__ = ("workload", "opts_src", "opts")

    def __init__(self):
        self.workload = OnlineWorkload()
        self.opts_src = self.opts = None


_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()      # engine → _PerEngine


def _state(engine) -> _PerEngine:
    st = _ENGINES.get(engine)
    if st is None:
        st = _ENGINES[engine] = _PerEngine()
    src = getattr(engine, "policy_options", None)
    if st.opts is None or src is not st.opts_src:
        st.opts = dict(DEFAULTS)
        st.opts.update(src or {})
        st.opts_src = src
    return st


def options(engine) -> dict:
    return _state(engine).opts


def workload(engine) -> OnlineWorkload:
    """The engine's online view of its arrivals (one per engine)."""
    return _state(engine).workload


def frag_model(engine, o):
    if o["typical"] == "sample":
        return engine.frag_model()
    c = engine.cluster
    return workload(engine).model(c.model_id, c.gpus_max)


def model_names(cluster, models) -> tuple:
    """Acceptable model ids (None: any) as the sorted names a task shape carries."""
    return () if models is None else tuple(sorted(cluster.models[m] for m in models))


def stranding_growth(gpu_free, cpu_free, gpu_taken, cpu_taken, k: float):
    """ΔS per candidate: growth of the GPU milli that the node's CPU cannot feed at k GPU milli per CPU milli.

    With t = gpu_free − k·cpu_free and x = gpu_taken − k·cpu_taken (what the task takes, net):
    ΔS = max(0, t − x) − max(0, t) = −clip(t, 0, x) for x ≥ 0, clip(t − x, 0, −x) for x < 0.
    """
    t = cpu_free * -k
    t += gpu_free
    x = gpu_taken - k * cpu_taken
    if x >= 0:
        return -np.clip(t, 0.0, x)
    t -= x
    return np.clip(t, 0.0, -x)


def _balanced(d, gpu_free, cpu_free, gpu_taken, cpu_taken, st: _PerEngine):
    """d − λ·ΔS (the same arithmetic as with ``stranding_growth``, with fewer array passes)."""
    k = st.workload.gpu_per_cpu(st.opts["alpha"])
    lam = st.opts["strand"]
    if not lam or k <= 0:
        return d
    t = cpu_free * -k
    t += gpu_free
    x = gpu_taken - k * cpu_taken
    if x >= 0:
        gain = np.clip(t, 0.0, x)                   # −ΔS
        return d + gain if lam == 1 else d + lam * gain
    t -= x
    cost = np.clip(t, 0.0, -x)                      # ΔS
    return d - cost if lam == 1 else d - lam * cost


def _q(d):
    """score_fgd.quantise for values that cannot overflow exp: same arithmetic, no errstate."""
    return np.floor(100.0 / (1.0 + np.exp(-d / 1000.0)))


def _select(d, cand, rank):
    """score_fgd.select over quantise(d), quantising only the candidates that can tie with the best."""
    j = int(d.argmax())
    x = float(d[j])
    if not -500_000.0 < x < 500_000.0:              # far outside the sigmoid's range: quantise everything
        return score_fgd.select(score_fgd.quantise(d), cand, rank)
    # the best integer score is about qa; every candidate at qa − 1 or above has x ≥ 1000·logit((qa − 1)/100)
    # (the −1 margin absorbs rounding); the exact integers are then computed as quantise does
    lo = math.floor(100.0 / (1.0 + math.exp(-x / 1000.0))) - 1
    if lo < 1:
        return score_fgd.select(score_fgd.quantise(d), cand, rank)
    near = np.flatnonzero(d >= 1000.0 * math.log(lo / (100.0 - lo)) - 1.0)
    qn = _q(d[near])
    tie = near[qn == qn.max()]
    if len(tie) == 1:
        return int(tie[0])
    return int(tie[np.argmin(rank[cand[tie]])])


def score(a, need, cand, ctx):
    e = ctx.engine
    st = _state(e)
    d = score_fgd.deltas(a, need, cand, ctx, frag_model(e, st.opts))
    if d.ndim == 2:
        ok = np.isfinite(d)
        q = np.where(ok, score_fgd.quantise(np.where(ok, d, 0.0)), -1)
        ctx.gpu_hint = q.argmax(axis=1)  # FGD's GPU: first with the best integer gradient
        d = d.max(axis=1)
    gfree = (a["gfree"][cand] * a["gusable"][cand]).sum(axis=1)
    sc = score_fgd.quantise(_balanced(d, gfree, a["cpu_free"][cand], need.gpu_total, need.cpu, st))
    # learn from this arrival only after scoring it, exactly as the fast path does
    num, milli = (need.num, need.milli) if need.milli > 0 and need.num > 0 else (0, 0)
    st.workload.observe_parts(need.cpu, num, milli, model_names(e.cluster, need.models))
    return sc


def fast(fx, req, rank):
    """The memoised path (scheduler/fragindex.py): the same decisions as filter → score."""
    e = fx.engine
    st = _state(e)
    if fx.model_source is None:
        w, c = st.workload, fx.c
        fx.model_source = lambda: (w.model(c.model_id, c.gpus_max) if st.opts["typical"] != "sample"
                                   else e.frag_model())
    r = fx.candidates(req)
    if r is None:
        return None
    cand, d, t, s, cia, num, milli, cib = r
    j = _select(_balanced(d, fx.state_total[s], fx.cand_cpu_free, num * milli, req.cpu_milli, st), cand, rank)
    asg = fx.commit(req, int(cand[j]), t, int(s[j]), int(cia[j]), num, milli, score_fgd.quantise, int(cib[j]))
    num, milli = (num, milli) if milli > 0 and num > 0 else (0, 0)
    st.workload.observe_parts(req.cpu_milli, num, milli,
                              model_names(fx.c, e._models_of(req)) if req.gpu_models else ())
    return asg
