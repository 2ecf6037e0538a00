"""Filter and score plugins, wired in one place.

Filters run in this order; a node is blamed on the first filter that rejects
it, so every rejected node counts against exactly one Reason.
"""
from __future__ import annotations

from scheduler.plugins import (filter_cpu, filter_gpu_fit, filter_gpu_model, filter_memory, filter_node_selector,
                               filter_nvlink_island, filter_quota, filter_schedulable)
from scheduler.plugins import (score_best_fit, score_dot_product, score_fgd, score_fgd_balanced, score_fgd_plus,
                               score_first_fit, score_gpu_packing, score_random)
from scheduler.types import PolicyName

FILTERS = (
    filter_schedulable,      # cordoned / draining / offline nodes take nothing new
    filter_node_selector,    # exact label match
    filter_gpu_model,        # node has a GPU of an acceptable model
    filter_quota,            # tenant quota left for that model
    filter_cpu,              # CPU fits
    filter_memory,           # memory fits
    filter_gpu_fit,          # enough free whole GPUs, or one GPU with the share free
    filter_nvlink_island,    # all GPUs on one NVLink island (when asked)
)

SCORERS = {
    PolicyName.FAST_BEST_FIT: score_best_fit,   # its indexed fast path lives in scheduler/index.py
    PolicyName.FIRST_FIT: score_first_fit,
    PolicyName.BEST_FIT: score_best_fit,
    PolicyName.GPU_PACKING: score_gpu_packing,
    PolicyName.DOT_PRODUCT: score_dot_product,
    PolicyName.RANDOM: score_random,
    PolicyName.FGD: score_fgd,
    PolicyName.FGD_PLUS: score_fgd_plus,
    PolicyName.FGD_BALANCED: score_fgd_balanced,
}
