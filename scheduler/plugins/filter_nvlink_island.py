"""Filter: the requested GPUs fit entirely free on one NVLink island of the node."""
import numpy as np

from scheduler.types import MILLI, Reason

NAME = "NvlinkIsland"
REASON = Reason.NVLINK_ISLAND


def applies(need) -> bool:
    return need.island and need.milli >= MILLI and need.num > 1


def largest_free_island(a, need, ctx) -> np.ndarray:
    ok = ctx.model_ok(a, need) & a["gusable"] & (a["gfree"] == MILLI)
    isl = a["gisland"]
    best = np.zeros(ok.shape[0], dtype=np.int64)
    for i in range(a["islands"]):  # island ids run 0..islands-1; padding GPUs are never usable
        best = np.maximum(best, (ok & (isl == i)).sum(axis=1))
    return best


def mask(a, need, ctx):
    return largest_free_island(a, need, ctx) >= need.num
