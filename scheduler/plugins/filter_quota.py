"""Filter: the tenant's quota left for the node's GPU model covers this placement step."""
from scheduler.types import Reason

NAME = "Quota"
REASON = Reason.QUOTA_EXCEEDED


def applies(need) -> bool:
    return need.milli > 0


def mask(a, need, ctx):
    allowed = ctx.quota_models(need)
    if allowed is None:
        return a["sched"] | ~a["sched"]
    return ctx.model_ok(a, need, allowed).any(axis=1)
