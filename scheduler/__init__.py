"""gpuaas placement engine: a pure library (no Ray, no gRPC, no I/O except scheduler.trace).

Public API::

    from scheduler import Engine, NodeSpec, GpuSpec, Request, Topology, PolicyName, Decision, Assignment, Reason
"""
from scheduler.engine import Engine
from scheduler.types import (BEST_QUALITY_POLICY, DEFAULT_POLICY, MILLI, Assignment, Decision, GpuSpec, NodeSpec,
                             PolicyName, Reason, Request, SchedulerError, Topology)

__all__ = [
    "Engine", "NodeSpec", "GpuSpec", "Request", "Topology", "PolicyName", "Decision", "Assignment", "Reason",
    "SchedulerError", "DEFAULT_POLICY", "BEST_QUALITY_POLICY", "MILLI",
]
