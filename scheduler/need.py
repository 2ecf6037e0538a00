"""What one placement step must find on one node (a replica, or a whole gang on one node)."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from scheduler.types import MILLI, Request, Topology


@dataclasses.dataclass(slots=True)
class Need:
    cpu: int                      # milli-CPU on the node
    mem: int                      # MiB on the node
    num: int                      # GPUs (whole, or 1 for a share)
    milli: int                    # per GPU: 1000 whole, 1..999 share, 0 CPU-only
    models: frozenset | None      # acceptable model ids; None = any
    selector: Mapping[str, str]
    island: bool                  # all GPUs on one NVLink island
    tenant: str
    shares: int = 1               # share replicas that must fit on this node (same-node gangs of shares)

    @property
    def whole(self) -> bool:
        return self.milli >= MILLI

    @property
    def gpu_total(self) -> int:
        return self.num * self.milli * (self.shares if self.milli < MILLI else 1)


def replica_need(req: Request, model_ids: frozenset | None) -> Need:
    return Need(cpu=req.cpu_milli, mem=req.memory_mib, num=req.gpus_per_replica(), milli=req.per_gpu_milli(),
                models=model_ids, selector=req.node_selector,
                island=req.topology is Topology.SAME_NVLINK_ISLAND, tenant=req.tenant)


def combined_need(req: Request, model_ids: frozenset | None) -> Need:
    """All replicas of a same-node (or same-island) gang as one requirement on one node."""
    r = max(1, req.replicas)
    milli = req.per_gpu_milli()
    whole = milli >= MILLI
    return Need(cpu=req.cpu_milli * r, mem=req.memory_mib * r,
                num=req.gpus_per_replica() * r if whole else req.gpus_per_replica(),
                milli=milli, models=model_ids, selector=req.node_selector,
                island=req.topology is Topology.SAME_NVLINK_ISLAND, tenant=req.tenant,
                shares=1 if whole else r)


def model_mask(gmodel: np.ndarray, models: frozenset | None) -> np.ndarray:
    if models is None:
        return gmodel >= 0
    if len(models) == 1:
        (m,) = tuple(models)
        return gmodel == m
    return np.isin(gmodel, np.fromiter(models, dtype=np.int64))
