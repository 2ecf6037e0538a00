"""Filter: the node has at least one GPU of an acceptable model."""
from scheduler.types import Reason

NAME = "GpuModel"
REASON = Reason.GPU_MODEL


def applies(need) -> bool:
    return need.milli > 0


def mask(a, need, ctx):
    return ctx.model_ok(a, need).any(axis=1)
