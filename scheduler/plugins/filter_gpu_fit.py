"""Filter: enough entirely free GPUs (whole-GPU request), or one GPU with the share free."""
import numpy as np

from scheduler.types import MILLI, Reason

NAME = "GpuFit"
REASON = Reason.GPU_COUNT          # whole GPUs
REASON_SHARE = Reason.GPU_SHARE    # a share of one GPU


def applies(need) -> bool:
    return need.milli > 0


def reason(need):
    return REASON if need.milli >= MILLI else REASON_SHARE


def mask(a, need, ctx):
    ok = ctx.model_ok(a, need, ctx.quota_models(need)) & a["gusable"]
    gfree = a["gfree"]
    if need.milli >= MILLI:
        return ((gfree == MILLI) & ok).sum(axis=1) >= need.num
    if need.shares <= 1:
        return ((gfree >= need.milli) & ok).any(axis=1)
    # several shares on one node: how many copies fit, GPU by GPU
    copies = np.where(ok, gfree // need.milli, 0).sum(axis=1)
    return copies >= need.shares
