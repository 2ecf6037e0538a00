"""Filter: the node's free milli-CPU covers the request."""
from scheduler.types import Reason

NAME = "Cpu"
REASON = Reason.CPU


def applies(need) -> bool:
    return need.cpu > 0


def mask(a, need, ctx):
    return a["cpu_free"] >= need.cpu
