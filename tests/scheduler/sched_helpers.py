"""Shared builders for the scheduler tests: real engines over small in-memory clusters."""
from __future__ import annotations

from scheduler import Engine, GpuSpec, NodeSpec, PolicyName


def node(node_id: str, *, gpus: int = 8, model: str = "H100", cpu: int = 64_000, mem: int = 512_000,
         islands: int = 1, labels: dict | None = None) -> NodeSpec:
    per = max(1, gpus // islands)
    return NodeSpec(node_id=node_id, cpu_milli=cpu, memory_mib=mem,
                    gpus=tuple(GpuSpec(model=model, memory_mib=80_000, nvlink_island=g // per) for g in range(gpus)),
                    labels=labels or {})


def engine(policy: PolicyName = PolicyName.BEST_FIT, nodes=(), seed: int = 0) -> Engine:
    e = Engine(policy=policy, seed=seed)
    for n in nodes:
        e.add_node(n)
    return e
