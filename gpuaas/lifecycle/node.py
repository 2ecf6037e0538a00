"""Node and per-GPU lifecycles (DESIGN §5)."""
from __future__ import annotations

import enum

from gpuaas.lifecycle.table import Transition as T, TransitionTable


class NodeState(enum.Enum):
    # Values equal gpuaas.v1.NodeState numbers.
    READY = 1
    CORDONED = 2
    DRAINING = 3
    DRAINED = 4
    SUSPECT = 5
    OFFLINE = 6
    UNHEALTHY = 7
    DECOMMISSIONED = 8


class NodeEvent(enum.Enum):
    REGISTERED = "registered"
    CORDON = "cordon"
    UNCORDON = "uncordon"
    DRAIN = "drain"
    DRAINED = "drained"
    HEARTBEAT_MISSED = "heartbeat_missed"
    HEARTBEAT_BACK = "heartbeat_back"
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"
    FATAL_FAULT = "fatal_fault"
    CLEARED = "cleared"
    DECOMMISSION = "decommission"


class GpuState(enum.Enum):
    # Values equal gpuaas.v1.GpuState numbers.
    READY = 1
    UNHEALTHY = 2
    QUARANTINED = 3


class GpuEvent(enum.Enum):
    DISCOVERED = "discovered"
    FATAL_FAULT = "fatal_fault"
    CLEARED = "cleared"
    QUARANTINE = "quarantine"
    RELEASE_RESOLVED = "release_resolved"


N, NE = NodeState, NodeEvent

NODE_TABLE = TransitionTable("node", [
    T(None, NE.REGISTERED, N.READY, True, "daemon registered with a valid inventory"),
    T(N.READY, NE.CORDON, N.CORDONED, False, "no new placements"),
    T(N.CORDONED, NE.UNCORDON, N.READY, False, "placements resume"),
    T(N.READY, NE.DRAIN, N.DRAINING, False, "no new placements; DRAINED once empty"),
    T(N.CORDONED, NE.DRAIN, N.DRAINING, False, "no new placements; DRAINED once empty"),
    T(N.DRAINING, NE.DRAINED, N.DRAINED, True, "last allocation left the node"),
    T(N.DRAINED, NE.UNCORDON, N.READY, False, "returned to service"),
    T(N.READY, NE.HEARTBEAT_MISSED, N.SUSPECT, True, "telemetry silent past the grace period; no new placements"),
    T(N.SUSPECT, NE.HEARTBEAT_BACK, N.READY, True, "telemetry resumed"),
    T(N.SUSPECT, NE.HEARTBEAT_TIMEOUT, N.OFFLINE, True, "its RUNNING allocations → FAILED, billing stopped"),
    T(N.READY, NE.FATAL_FAULT, N.UNHEALTHY, True, "fatal XID / uncorrectable ECC / thermal trip on the node"),
    T(N.UNHEALTHY, NE.CLEARED, N.READY, False, "operator cleared it (or a transient cause cleared)"),
    T(N.OFFLINE, NE.REGISTERED, N.READY, True, "daemon re-registered; orphans cleaned up"),
    T(N.SUSPECT, NE.REGISTERED, N.READY, True, "daemon restarted within the grace period"),
    T(N.READY, NE.REGISTERED, N.READY, True, "re-registration of a live node (control plane restarted)"),
    # A node out of service by an operator's choice keeps that choice through a lost daemon:
    # no SUSPECT step (nothing is placed there anyway), but its RUNNING allocations are failed
    # and their billing stopped exactly as on an OFFLINE node, and the daemon may come back.
    T(N.CORDONED, NE.HEARTBEAT_TIMEOUT, N.CORDONED, True,
      "telemetry silent past the offline timeout: its RUNNING allocations → FAILED, billing stopped; stays cordoned"),
    T(N.DRAINING, NE.HEARTBEAT_TIMEOUT, N.DRAINING, True,
      "telemetry silent past the offline timeout: its RUNNING allocations → FAILED, billing stopped; DRAINED once empty"),
    T(N.CORDONED, NE.REGISTERED, N.CORDONED, True, "daemon re-registered; orphans cleaned up; stays cordoned"),
    T(N.DRAINING, NE.REGISTERED, N.DRAINING, True, "daemon re-registered; orphans cleaned up; still draining"),
    T(N.DRAINED, NE.REGISTERED, N.DRAINED, True, "daemon re-registered (e.g. after maintenance); out of service "
      "until uncordoned"),
] + [T(s, NE.DECOMMISSION, N.DECOMMISSIONED, False, "removed from the fleet") for s in NodeState
     if s is not N.DECOMMISSIONED])

G, GE = GpuState, GpuEvent

GPU_TABLE = TransitionTable("gpu", [
    T(None, GE.DISCOVERED, G.READY, True, "listed in the node's inventory"),
    T(G.READY, GE.FATAL_FAULT, G.UNHEALTHY, True, "fatal XID or uncorrectable ECC: only this GPU leaves service"),
    T(G.UNHEALTHY, GE.CLEARED, G.READY, False, "operator cleared it"),
    T(G.READY, GE.QUARANTINE, G.QUARANTINED, True, "a release on it could not be cleaned up"),
    T(G.QUARANTINED, GE.RELEASE_RESOLVED, G.READY, False, "operator resolved the stuck release"),
    T(G.UNHEALTHY, GE.QUARANTINE, G.UNHEALTHY, True, "already out of service"),
])
