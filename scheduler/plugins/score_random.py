"""Score: a uniformly random feasible node (the paper's Random baseline), from the engine's seeded RNG.

The paper's Random also picks the GPU at random: a sharing task lands on a
uniformly random GPU among those of the chosen node with room for it (its
simulator runs Random with the "random" GPU selection; every other baseline
uses best fit). Whole-GPU tasks take free GPUs as every policy does.
"""
import numpy as np

from scheduler.types import MILLI, PolicyName

NAME = "Random"
POLICY = PolicyName.RANDOM


def score(a, need, cand, ctx):
    s = ctx.rng.random(len(cand))
    if 0 < need.milli < MILLI:
        gfree = a["gfree"][cand]
        fits = (gfree >= need.milli) & ctx.model_ok(a, need)[cand] & a["gusable"][cand]
        # a random key per GPU; the GPU with the largest key among those that fit
        keys = np.where(fits, ctx.rng.random(gfree.shape), -1.0)
        ctx.gpu_hint = keys.argmax(axis=1)
    return s
