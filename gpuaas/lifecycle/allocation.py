"""Allocation lifecycle (DESIGN §5). Billing starts on the edge into RUNNING
and stops on the edge out of it; nothing else starts or stops it."""
from __future__ import annotations

import enum

from gpuaas.lifecycle.table import Transition as T, TransitionTable


class AllocState(enum.Enum):
    # Values equal gpuaas.v1.AllocationState numbers.
    QUEUED = 1
    PLACED = 2
    RUNNING = 3
    RELEASING = 4
    RELEASED = 5
    FAILED = 6
    RELEASE_FAILED = 7
    CANCELLED = 8


class AllocEvent(enum.Enum):
    ACCEPTED = "accepted"
    PLACED = "placed"
    CANCELLED = "cancelled"
    QUEUE_TIMEOUT = "queue_timeout"
    PREPARE_OK = "prepare_ok"
    PREPARE_FAILED_RETRY = "prepare_failed_retry"
    PREPARE_FAILED_FINAL = "prepare_failed_final"
    RELEASE_REQUESTED = "release_requested"
    LEASE_EXPIRED = "lease_expired"
    PREEMPTED = "preempted"
    NODE_LOST = "node_lost"
    GPU_FAULT = "gpu_fault"
    CLEANUP_OK = "cleanup_ok"
    CLEANUP_FAILED_RETRY = "cleanup_failed_retry"
    CLEANUP_FAILED_FINAL = "cleanup_failed_final"
    OPERATOR_RESOLVED = "operator_resolved"


class Billing(enum.Enum):
    START = "start"
    STOP = "stop"


S, E = AllocState, AllocEvent

ALLOCATION_TABLE = TransitionTable("allocation", [
    T(None, E.ACCEPTED, S.QUEUED, True, "counted against the queue, not quota"),
    T(S.QUEUED, E.PLACED, S.PLACED, True, "GPUs reserved, quota charged"),
    T(S.QUEUED, E.CANCELLED, S.CANCELLED, False, "client released it before placement"),
    T(S.QUEUED, E.QUEUE_TIMEOUT, S.CANCELLED, True, "waited past queue_timeout_s"),
    T(S.PLACED, E.PREPARE_OK, S.RUNNING, True, "billing starts at this instant", Billing.START),
    T(S.PLACED, E.PREPARE_FAILED_RETRY, S.QUEUED, True, "reservation freed, attempt counted; a gang rolls back whole"),
    T(S.PLACED, E.PREPARE_FAILED_FINAL, S.FAILED, True, "reservation freed"),
    # Not in the design table: a client may release while prepare is in flight.
    # Nothing was billed; the node still needs a cleanup, so it goes through RELEASING.
    T(S.PLACED, E.RELEASE_REQUESTED, S.RELEASING, False, "released before it ran: never billed"),
    T(S.RUNNING, E.RELEASE_REQUESTED, S.RELEASING, False, "billing stops at this instant", Billing.STOP),
    T(S.RUNNING, E.LEASE_EXPIRED, S.RELEASING, True, "billing stops at this instant", Billing.STOP),
    T(S.RUNNING, E.PREEMPTED, S.RELEASING, True, "billing stops; freed capacity held for the preemptor", Billing.STOP),
    T(S.RUNNING, E.NODE_LOST, S.FAILED, True, "billing stops at detection; cleanup deferred until the node is back",
      Billing.STOP),
    T(S.RUNNING, E.GPU_FAULT, S.FAILED, True, "billing stops at detection", Billing.STOP),
    T(S.RELEASING, E.CLEANUP_OK, S.RELEASED, True, "GPUs returned to the pool"),
    T(S.RELEASING, E.CLEANUP_FAILED_RETRY, S.RELEASING, True, "retry with exponential backoff + jitter; not billed"),
    T(S.RELEASING, E.CLEANUP_FAILED_FINAL, S.RELEASE_FAILED, True, "GPUs quarantined, operator alerted"),
    T(S.RELEASE_FAILED, E.OPERATOR_RESOLVED, S.RELEASED, False, "operator cleaned up by hand; GPUs back in the pool"),
    T(S.FAILED, E.CLEANUP_OK, S.RELEASED, True, "GPUs returned to the pool"),
])

TERMINAL = frozenset({S.RELEASED, S.CANCELLED})
# States whose GPUs are held in the capacity view.
HOLDS_CAPACITY = frozenset({S.PLACED, S.RUNNING, S.RELEASING, S.FAILED, S.RELEASE_FAILED})
