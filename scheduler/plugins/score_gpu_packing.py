"""Score: shared GPUs first, then free GPUs on used nodes, then empty nodes (paper's GpuPacking).

case 1, a share fits on a partly used GPU: 100 − (free%)/10, at least 50
case 2, must use entirely free GPUs of a used node: 50 − GPUs used, at least 33
case 3, the node is entirely free: max(33 − free GPUs, free GPUs)
"""
import numpy as np

from scheduler.types import MILLI, PolicyName

NAME = "GpuPacking"
POLICY = PolicyName.GPU_PACKING


def score(a, need, cand, ctx):
    if need.milli <= 0:
        return np.zeros(len(cand), dtype=np.int64)
    gfree = a["gfree"][cand]
    ok = a["gusable"][cand] & ctx.model_ok(a, need)[cand]
    fully = ((gfree == MILLI) & ok).sum(axis=1)
    gcount = a["gcount"][cand]
    case3 = np.maximum(MILLI // MILLI * 33 - fully, fully)
    if need.milli >= MILLI:
        other = np.maximum(50 - need.num, 33)
    else:
        fits = ok & (gfree >= need.milli)
        best = np.where(fits, gfree, 10 * MILLI).min(axis=1)
        case1 = np.maximum(100 - (best * 100 // MILLI) // 10, 50)
        other = np.where(best >= MILLI, np.maximum(50 - 1, 33), case1)
    return np.where(fully == gcount, case3, other).astype(np.int64)
