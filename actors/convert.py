"""The edge: validate contract messages and turn them into domain objects.

Proto types stop here; the scheduler sees only its own dataclasses.
"""
from __future__ import annotations

import hashlib

from gpuaas.errors import InvalidArgument
from gpuaas.v1 import common_pb2
from scheduler import Request, Topology

_TOPOLOGY = {t.value: t for t in Topology}  # validated requests only carry these values

REQUEST_ID_LEN_MAX = 128
MAP_ENTRIES_MAX = 32
MAP_TEXT_LEN_MAX = 256
REPLICAS_MAX = 1024
PRIORITY_ABS_MAX = 1000
CPU_MILLI_MAX = 10_000_000
MEMORY_MIB_MAX = 1 << 34
MODELS_MAX = 16


def request_hash(req: common_pb2.PlacementRequest) -> bytes:
    return hashlib.sha256(req.SerializeToString(deterministic=True)).digest()


def serialized_and_hash(req: common_pb2.PlacementRequest) -> tuple[bytes, bytes]:
    """The request's deterministic bytes (stored with the allocation) and their hash (idempotency)."""
    raw = req.SerializeToString(deterministic=True)
    return raw, hashlib.sha256(raw).digest()


_TOPOLOGY_VALUES = frozenset(common_pb2.Topology.values())


def validate_request(req: common_pb2.PlacementRequest, *, known_models: set[str], gpus_per_node_max: int,
                     lease_s_max: int, prefix: str = "request") -> None:
    """Raise InvalidArgument listing every field violation of ``req``."""
    v: list[tuple[str, str]] = []
    f = lambda name: f"{prefix}.{name}"  # noqa: E731
    rid = req.request_id
    if not rid:
        v.append((f("request_id"), "required: the client's idempotency key"))
    elif len(rid) > REQUEST_ID_LEN_MAX or not rid.isprintable():
        v.append((f("request_id"), f"at most {REQUEST_ID_LEN_MAX} printable characters"))
    if req.gpu_count < 0:
        v.append((f("gpu_count"), "must not be negative"))
    if req.gpu_milli < 0:
        v.append((f("gpu_milli"), "must not be negative"))
    if req.gpu_count > 0 and req.gpu_milli > 0:
        v.append((f("gpu_milli"), "set either gpu_count (whole GPUs) or gpu_milli (a share of one GPU), not both"))
    elif req.gpu_count == 0 and req.gpu_milli == 0:
        v.append((f("gpu_count"), "ask for at least one GPU (gpu_count >= 1) or a share (gpu_milli 1..999)"))
    if req.gpu_milli >= 1000:
        v.append((f("gpu_milli"), "a share is 1..999 thousandths; use gpu_count for whole GPUs"))
    if gpus_per_node_max and req.gpu_count > gpus_per_node_max:
        v.append((f("gpu_count"), f"{req.gpu_count} GPUs per replica; the largest node has {gpus_per_node_max}"))
    models = req.gpu_models
    if models:  # most requests name no model: skip building the list (it showed in the committer's profile)
        if len(models) > MODELS_MAX:
            v.append((f("gpu_models"), f"at most {MODELS_MAX} models"))
        unknown = [m for m in models if m not in known_models]
        if unknown:
            v.append((f("gpu_models"), f"unknown GPU model(s) {unknown}; the fleet has {sorted(known_models)}"))
    if not 0 <= req.cpu_milli <= CPU_MILLI_MAX:
        v.append((f("cpu_milli"), f"0..{CPU_MILLI_MAX}"))
    if not 0 <= req.memory_mib <= MEMORY_MIB_MAX:
        v.append((f("memory_mib"), f"0..{MEMORY_MIB_MAX}"))
    if not 0 <= req.replicas <= REPLICAS_MAX:
        v.append((f("replicas"), f"0..{REPLICAS_MAX} (0 means 1)"))
    if req.topology not in _TOPOLOGY_VALUES:
        v.append((f("topology"), f"unknown topology {req.topology}"))
    if abs(req.priority) > PRIORITY_ABS_MAX:
        v.append((f("priority"), f"-{PRIORITY_ABS_MAX}..{PRIORITY_ABS_MAX}"))
    if req.lease_s < 0:
        v.append((f("lease_s"), "must not be negative (0 means no lease)"))
    elif req.lease_s > lease_s_max:
        v.append((f("lease_s"), f"at most {lease_s_max}"))
    if req.queue_timeout_s < 0:
        v.append((f("queue_timeout_s"), "must not be negative"))
    for name, m in (("node_selector", req.node_selector), ("labels", req.labels)):
        if not m:
            continue
        if len(m) > MAP_ENTRIES_MAX:
            v.append((f(name), f"at most {MAP_ENTRIES_MAX} entries"))
        elif any(len(k) > MAP_TEXT_LEN_MAX or len(val) > MAP_TEXT_LEN_MAX for k, val in m.items()):
            v.append((f(name), f"keys and values at most {MAP_TEXT_LEN_MAX} characters"))
    if v:
        raise InvalidArgument(f"invalid placement request: {v[0][0]}: {v[0][1]}", violations=v)


def to_domain(req: common_pb2.PlacementRequest, *, key: str, tenant: str):
    """PlacementRequest → scheduler.Request."""
    if req.gpu_count > 0:
        num_gpu, milli = req.gpu_count, 1000
    else:
        num_gpu, milli = 1, req.gpu_milli
    sel = req.node_selector
    return Request(key=key, tenant=tenant, num_gpu=num_gpu, gpu_milli=milli, cpu_milli=req.cpu_milli,
                   memory_mib=req.memory_mib, gpu_models=tuple(req.gpu_models), replicas=max(1, req.replicas),
                   topology=_TOPOLOGY[req.topology], priority=req.priority, node_selector=dict(sel) if sel else {})


def assignments_to_json(assignments, model_of) -> list[dict]:
    """scheduler.Assignment tuple → JSON-able rows stored in control.allocations."""
    return [{"node_id": a.node_id, "gpu_indices": list(a.gpu_indices), "gpu_milli": a.gpu_milli,
             "gpu_model": model_of(a.node_id, a.gpu_indices[0]) if a.gpu_indices else "",
             "cpu_milli": a.cpu_milli, "memory_mib": a.memory_mib} for a in assignments]


def gpu_milli_total(assignments: list[dict]) -> int:
    return sum(len(a["gpu_indices"]) * a["gpu_milli"] for a in assignments)


def validate_inventory(inv, address: str) -> None:
    v: list[tuple[str, str]] = []
    if not inv.node_name or len(inv.node_name) > 128 or not inv.node_name.replace("-", "").replace(".", "").replace(
            "_", "").isalnum():
        v.append(("inventory.node_name", "1..128 characters of [A-Za-z0-9._-]"))
    if not address or ":" not in address:
        v.append(("agent_address", "host:port of the node agent"))
    if not inv.gpus:
        v.append(("inventory.gpus", "a GPU node lists at least one GPU"))
    if len(inv.gpus) > 64:
        v.append(("inventory.gpus", "at most 64 GPUs per node"))
    idx = [g.index for g in inv.gpus]
    if len(set(idx)) != len(idx) or any(i < 0 for i in idx):
        v.append(("inventory.gpus.index", "indices must be unique and >= 0"))
    if any(not g.model for g in inv.gpus):
        v.append(("inventory.gpus.model", "every GPU needs a model"))
    if any(not 0 <= g.nvlink_island < len(inv.gpus) for g in inv.gpus):
        v.append(("inventory.gpus.nvlink_island", "an NVLink island is numbered 0..(GPUs on the node - 1)"))
    if inv.cpu_milli < 0 or inv.memory_mib < 0:
        v.append(("inventory.cpu_milli", "capacities must not be negative"))
    if v:
        raise InvalidArgument(f"invalid registration: {v[0][0]}: {v[0][1]}", violations=v)
