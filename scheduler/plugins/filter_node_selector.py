"""Filter: every key=value of the request's node selector is a label of the node."""
import numpy as np

from scheduler.types import Reason

NAME = "NodeSelector"
REASON = Reason.NODE_SELECTOR


def applies(need) -> bool:
    return bool(need.selector)


def mask(a, need, ctx):
    labels = ctx.cluster.labels
    items = tuple(need.selector.items())
    return np.fromiter((all(lab.get(k) == v for k, v in items) for lab in labels), dtype=bool, count=len(labels))
