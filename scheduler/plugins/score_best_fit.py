"""Score: least CPU and GPU left after placement (the FGD paper's BestFit baseline).

Raw score 100·(1 − ½·cpu_left/128 000 − ½·gpu_left/8 000), truncated to an
integer and min-max normalised to 0..100 with integer arithmetic, as the
paper's simulator does; the coarse integers create the ties that its seeded
node order then breaks.
"""
import numpy as np

from scheduler.types import PolicyName

NAME = "BestFit"
POLICY = PolicyName.BEST_FIT
MAX_SPEC_CPU_MILLI = 128_000
MAX_SPEC_GPU_MILLI = 8_000


def score(a, need, cand, ctx):
    cpu_left = a["cpu_free"][cand] - need.cpu
    gpu_left = (a["gfree"][cand] * a["gusable"][cand]).sum(axis=1) - need.gpu_total
    raw = (1.0 - (cpu_left / MAX_SPEC_CPU_MILLI * 0.5 + gpu_left / MAX_SPEC_GPU_MILLI * 0.5)) * 100.0
    s = np.trunc(raw).astype(np.int64)
    lo, hi = s.min(), s.max()
    if hi == lo:
        return np.zeros(len(cand), dtype=np.int64)
    return (s - lo) * 100 // (hi - lo)
