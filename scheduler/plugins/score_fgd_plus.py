"""Score: ours — FGD's fragmentation gradient, with ties broken towards packing.

FGD squashes the gradient through a sigmoid into 0..100 integers, so many
nodes tie and the arbitrary node order decides. We keep FGD's ranking where
it has one and break its ties by a packing preference: the node left with the
least free GPU (then CPU) wins, so partly used nodes fill up before fresh ones
are opened, which keeps whole nodes free for the multi-GPU tasks to come.
"""
import os

import numpy as np

from scheduler.plugins import score_fgd
from scheduler.types import PolicyName

NAME = "FGDPlus"
POLICY = PolicyName.FGD_PLUS
VARIANT = os.environ.get("GPUAAS_FGDPLUS_VARIANT", "A")  # A: packing tie-break (the shipped one)


def score(a, need, cand, ctx):
    fm = ctx.engine.frag_model("demand") if VARIANT in ("C", "D") else None
    d = score_fgd.deltas(a, need, cand, ctx, fm)
    gleft = (a["gfree"][cand] * a["gusable"][cand]).sum(axis=1).astype(float) - need.gpu_total
    cleft = (a["cpu_free"][cand] - need.cpu).astype(float)
    if VARIANT == "C":
        tie = np.zeros(len(cand))
    elif VARIANT in ("A", "D"):
        tie = -(gleft / 8000.0)
    elif VARIANT == "B":
        tie = -(gleft / 8000.0 * 0.5 + cleft / 128000.0 * 0.5)
    else:
        tie = -(gleft / 8000.0) - 1e-3 * cleft / 128000.0
    if VARIANT == "E":  # exact gradient, node order on ties
        if d.ndim == 1:
            return d
        ctx.gpu_hint = d.argmax(axis=1)
        return d.max(axis=1)
    if d.ndim == 1:
        q = score_fgd.quantise(d).astype(float)
    else:
        qq = np.where(np.isfinite(d), score_fgd.quantise(np.where(np.isfinite(d), d, 0.0)), -1)
        ctx.gpu_hint = qq.argmax(axis=1)
        q = qq.max(axis=1).astype(float)
    return q + 0.5 * (tie - tie.min()) / max(1e-9, (tie.max() - tie.min()))
