"""Run ML code on an allocation's GPUs through Ray.

``run(allocation, fn, *args)`` schedules ``fn`` as a Ray task pinned to the
Ray node that hosts the allocation's GPU node, in a worker whose
``CUDA_VISIBLE_DEVICES`` holds exactly the allocation's GPU indices (set in
the worker's environment before any CUDA library loads). Gangs: ``run_gang``
runs one task per replica.
"""
from __future__ import annotations

import os
import socket

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def ray_node_for(node_address: str) -> str:
    """The Ray node id running on the host of a node agent address."""
    host = node_address.rsplit(":", 1)[0]
    alive = [n for n in ray.nodes() if n.get("Alive")]
    for n in alive:
        if n.get("NodeManagerAddress") == host:
            return n["NodeID"]
    if host in LOOPBACK:
        # The agent listens on this host's loopback: the Ray node on this host.
        return ray.get_runtime_context().get_node_id()
    raise LookupError(f"no live Ray node runs on {host}; start a Ray worker there (ray start --address …)")


def _invoke(fn, expected: str, args, kwargs):
    seen = os.environ.get("CUDA_VISIBLE_DEVICES")
    if seen != expected:
        raise RuntimeError(f"CUDA_VISIBLE_DEVICES is {seen!r}, expected {expected!r}")
    return fn(*args, **kwargs)


def run_async(allocation, fn, *args, replica: int = 0, num_cpus: float = 0, **kwargs):
    """Submit ``fn`` on replica ``replica`` of ``allocation``; returns an ObjectRef."""
    a = allocation.assignments[replica]
    cuda = ",".join(str(i) for i in a.gpu_indices)
    env = {"CUDA_VISIBLE_DEVICES": cuda, "GPUAAS_ALLOCATION_ID": allocation.allocation_id,
           "GPUAAS_NODE_ID": a.node_id, "GPUAAS_GPU_MILLI": str(a.gpu_milli)}
    task = ray.remote(_invoke).options(
        num_cpus=num_cpus, num_gpus=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=ray_node_for(a.node_address), soft=False),
        runtime_env={"env_vars": env})
    return task.remote(fn, cuda, args, kwargs)


def run(allocation, fn, *args, replica: int = 0, timeout_s: float = 120.0, **kwargs):
    return ray.get(run_async(allocation, fn, *args, replica=replica, **kwargs), timeout=timeout_s)


def run_gang(allocation, fn, *args, timeout_s: float = 120.0, **kwargs) -> list:
    refs = [run_async(allocation, fn, *args, replica=i, **kwargs) for i in range(len(allocation.assignments))]
    return ray.get(refs, timeout=timeout_s)


def describe_worker() -> dict:
    """What a job sees: used by the demo's ML job."""
    return {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "allocation_id": os.environ.get("GPUAAS_ALLOCATION_ID"), "node_id": os.environ.get("GPUAAS_NODE_ID"),
            "host": socket.gethostname(), "pid": os.getpid(),
            "ray_node": ray.get_runtime_context().get_node_id()[:12]}
