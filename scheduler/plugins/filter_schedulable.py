"""Filter: the node accepts new placements (not cordoned, draining, suspect or offline)."""
from scheduler.types import Reason

NAME = "NodeSchedulable"
REASON = Reason.NODE_UNSCHEDULABLE


def applies(need) -> bool:
    return True


def mask(a, need, ctx):
    return a["sched"]
