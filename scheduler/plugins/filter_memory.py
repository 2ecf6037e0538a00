"""Filter: the node's free memory covers the request."""
from scheduler.types import Reason

NAME = "Memory"
REASON = Reason.MEMORY


def applies(need) -> bool:
    return need.mem > 0


def mask(a, need, ctx):
    return a["mem_free"] >= need.mem
