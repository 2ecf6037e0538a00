"""Human answers to "why is this pending?", built from the per-reason rejection counts."""
from __future__ import annotations

from scheduler.types import MILLI, Reason, Request, Topology


def describe_need(req: Request) -> str:
    models = " or ".join(req.gpu_models) if req.gpu_models else "GPU"
    milli = req.per_gpu_milli()
    if milli <= 0:
        what = f"{req.cpu_milli}m CPU and {req.memory_mib} MiB (no GPU)"
    elif milli < MILLI:
        what = f"{milli}/1000 of one {models}"
    else:
        what = f"{req.gpus_per_replica()} × {models}"
    where = {
        Topology.SAME_NVLINK_ISLAND: " on one NVLink island",
        Topology.SAME_NODE: " on one node",
        Topology.SAME_RACK: " in one rack",
        Topology.SPREAD: " on distinct nodes",
    }.get(req.topology, "")
    if req.replicas > 1:
        what = f"{req.replicas} replicas of {what}"
    return f"needs {what}{where}"


def rejections(reasons: dict) -> str:
    parts = []
    for r, c in sorted(reasons.items(), key=lambda rc: -rc[1]):
        if c <= 0:
            continue
        noun = "nodes" if c != 1 else "node"
        parts.append(f"{c} {noun} rejected for {r.value}" if not parts else f"{c} for {r.value}")
    return ", ".join(parts)


def explain_failure(req: Request, reasons: dict, facts: list[str]) -> str:
    head = describe_need(req)
    tail = rejections({r: c for r, c in reasons.items() if isinstance(r, Reason)})
    return "; ".join(x for x in [head, *facts, tail] if x)
