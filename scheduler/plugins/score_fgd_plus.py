"""Score: ours — FGD's fragmentation gradient with configurable refinements.

Options (``Engine(policy_options={...})``, defaults in ``DEFAULTS``):

- ``resolution``: FGD squashes the gradient through a sigmoid into 0..100
  integers so that many nodes tie and the seeded node order decides; we use
  ``resolution`` steps instead of 100 (``0`` = the exact gradient).
- ``tie``: what breaks the remaining ties before the node order:
  ``none``, ``delta`` (the exact gradient), ``gpu-pack`` (least free GPU left),
  ``cpu-pack`` (least CPU left).
- ``gpu_choice``: ``exact`` (the GPU of the best exact gradient) or ``fgd``
  (lowest-indexed GPU of the best integer score, as the paper).
"""
import numpy as np

from scheduler.plugins import score_fgd
from scheduler.types import PolicyName

NAME = "FGDPlus"
POLICY = PolicyName.FGD_PLUS
DEFAULTS = {"resolution": 100, "tie": "gpu-pack", "gpu_choice": "fgd"}


def options(ctx_engine) -> dict:
    o = dict(DEFAULTS)
    o.update(getattr(ctx_engine, "policy_options", None) or {})
    return o


def _quantiser(res):
    if res <= 0:
        return lambda d: d
    def q(d):
        with np.errstate(over="ignore"):
            return np.floor(res / (1.0 + np.exp(-d / 1000.0)))
    return q


def _tie(kind, d, gleft, cleft):
    if kind == "delta":
        t = d
    elif kind == "gpu-pack":
        t = -gleft
    elif kind == "cpu-pack":
        t = -cleft
    elif kind == "cpu-spread":
        t = cleft
    elif kind == "gpu-spread":
        t = gleft
    else:
        return 0.0
    lo, hi = t.min(), t.max()
    return 0.5 * (t - lo) / max(1e-9, hi - lo)


def score(a, need, cand, ctx):
    o = options(ctx.engine)
    d = score_fgd.deltas(a, need, cand, ctx)
    q = _quantiser(o["resolution"])
    if d.ndim == 2:
        qq = np.where(np.isfinite(d), q(np.where(np.isfinite(d), d, 0.0)), -np.inf)
        ctx.gpu_hint = d.argmax(axis=1) if o["gpu_choice"] == "exact" else qq.argmax(axis=1)
        d = d.max(axis=1)
    gleft = (a["gfree"][cand] * a["gusable"][cand]).sum(axis=1).astype(float) - need.gpu_total
    cleft = (a["cpu_free"][cand] - need.cpu).astype(float)
    return q(d) + _tie(o["tie"], d, gleft, cleft)


def fast(fx, req, rank):
    """The memoised path (scheduler/fragindex.py)."""
    r = fx.candidates(req)
    if r is None:
        return None
    o = options(fx.engine)
    cand, d, t, s, cia, num, milli, cib = r
    q = _quantiser(o["resolution"])
    sc = q(d)
    if o["tie"] != "none":
        if o["tie"] in ("gpu-pack", "gpu-spread"):
            gleft = fx.state_total[s] - num * milli
        else:
            gleft = None
        cleft = fx.c.arrays()["cpu_free"][cand] - req.cpu_milli if o["tie"] in ("cpu-pack", "cpu-spread") else None
        sc = sc + _tie(o["tie"], d, gleft, cleft)
    j = score_fgd.select(sc, cand, rank)
    return fx.commit(req, int(cand[j]), t, int(s[j]), int(cia[j]), num, milli,
                     q if o["gpu_choice"] == "fgd" else None, int(cib[j]))
