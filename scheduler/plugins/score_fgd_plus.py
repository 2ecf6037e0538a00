"""Score: ours — the exact fragmentation gradient, without the paper's integer squashing.

FGD squashes the gradient through a sigmoid into 0..100 integers, so many
nodes tie and the tie-break is the arbitrary node order. We rank by the exact
gradient (F_before − F_after, in milli-GPU), then by what a best fit prefers
(less GPU then CPU left on the node), then by node order.
"""
import numpy as np

from scheduler.plugins import score_fgd
from scheduler.types import PolicyName

NAME = "FGDPlus"
POLICY = PolicyName.FGD_PLUS
TIE_SCALE = 1e-6  # secondary key weight: far below one milli-GPU of gradient


def score(a, need, cand, ctx):
    d = score_fgd.deltas(a, need, cand, ctx)
    gleft = (a["gfree"][cand] * a["gusable"][cand]).sum(axis=1).astype(float)
    tie = -(gleft / 8000.0) * TIE_SCALE
    if d.ndim == 1:
        return d + tie
    ctx.gpu_hint = d.argmax(axis=1)
    return d.max(axis=1) + tie
