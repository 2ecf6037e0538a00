"""Score: a uniformly random feasible node (paper's Random baseline), from the engine's seeded RNG."""
from scheduler.types import PolicyName

NAME = "Random"
POLICY = PolicyName.RANDOM


def score(a, need, cand, ctx):
    return ctx.rng.random(len(cand))
