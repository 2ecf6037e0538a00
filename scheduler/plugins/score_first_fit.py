"""Score: every feasible node scores the same; the engine's node order decides (first fit)."""
import numpy as np

from scheduler.types import PolicyName

NAME = "FirstFit"
POLICY = PolicyName.FIRST_FIT


def score(a, need, cand, ctx):
    return np.zeros(len(cand), dtype=np.int64)
