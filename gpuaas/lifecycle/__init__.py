"""Lifecycle state machines: one transition table each, in code.

Every state change in the control plane goes through ``transition()`` of the
matching table; ``docs/state-machines.md`` is rendered from these tables
(``python -m gpuaas.lifecycle.render``) and a test fails when it is stale.
"""
from gpuaas.lifecycle.allocation import (ALLOCATION_TABLE, AllocEvent, AllocState, Billing)
from gpuaas.lifecycle.node import GPU_TABLE, NODE_TABLE, GpuEvent, GpuState, NodeEvent, NodeState
from gpuaas.lifecycle.table import IllegalTransition, Transition, TransitionTable

__all__ = [
    "ALLOCATION_TABLE", "AllocEvent", "AllocState", "Billing",
    "NODE_TABLE", "GPU_TABLE", "NodeEvent", "NodeState", "GpuEvent", "GpuState",
    "IllegalTransition", "Transition", "TransitionTable",
]
