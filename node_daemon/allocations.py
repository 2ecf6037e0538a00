"""Allocations prepared on this node: Prepare and Cleanup, both idempotent.

    Prepare(id, gpus, milli)  ── validate ── same id, same body? ──► the earlier answer
                                     │            different body ──► ALREADY_EXISTS
                                     ▼
                           every GPU healthy? ── no ──► FAILED_PRECONDITION (+ PreconditionFailure)
                           share left on every GPU? ── no ──► FAILED_PRECONDITION
                                     ▼
                           record, backend.on_prepare, CUDA_VISIBLE_DEVICES="0,3"

    Cleanup(id) ── prepared? ── end leftover processes on GPUs no other allocation holds
                │               backend.on_release, remember id as cleaned
                ├─ cleaned before (bounded memory)? ──► OK, 0 processes, "already cleaned up"
                └─ never seen ──► NOT_FOUND (the control side reads it as "nothing left behind")
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time

from google.protobuf import any_pb2
from google.rpc import error_details_pb2

from gpuaas.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from gpuaas.lifecycle import GpuState
from node_daemon.backend import GpuBackend
from node_daemon.health import HealthView

log = logging.getLogger("gpuaas.node_daemon.allocations")

ALLOCATION_ID_LEN_MAX = 128
TENANT_ID_LEN_MAX = 128
CLEANED_REMEMBERED_MAX = 4096
GPU_MILLI_WHOLE = 1000
# A node holds at most one allocation per thousandth of each of its GPUs: the
# same bound the scheduler's capacity model implies, so the two never disagree.
ALLOCATIONS_PER_GPU_MAX = GPU_MILLI_WHOLE


class GpuNotReady(FailedPrecondition):
    """FAILED_PRECONDITION with a google.rpc.PreconditionFailure naming each bad GPU."""

    def __init__(self, message: str, *, gpus: list[tuple[int, str]], kind: str = "GPU_HEALTH"):
        super().__init__(message)
        self.gpus, self.kind = gpus, kind

    def to_status(self):
        st = super().to_status()
        pf = error_details_pb2.PreconditionFailure(violations=[
            error_details_pb2.PreconditionFailure.Violation(type=self.kind, subject=f"gpu/{i}", description=r)
            for i, r in self.gpus])
        d = any_pb2.Any()
        d.Pack(pf)
        st.details.append(d)
        return st


@dataclasses.dataclass(frozen=True)
class Allocation:
    allocation_id: str
    gpu_indices: tuple[int, ...]
    gpu_milli: int
    tenant_id: str
    prepared_at_s: float

    @property
    def cuda_visible_devices(self) -> str:
        return ",".join(str(i) for i in self.gpu_indices)


@dataclasses.dataclass(frozen=True)
class CleanupResult:
    processes_ended: int
    message: str


class AllocationTable:
    def __init__(self, backend: GpuBackend, health: HealthView, gpu_indices: list[int]):
        self.backend, self.health = backend, health
        self.gpu_indices = set(gpu_indices)
        self._lock = threading.Lock()
        self._live: dict[str, Allocation] = {}
        # Per GPU: allocation id → milli held. Keeps Prepare and Cleanup O(GPUs of the
        # allocation), not O(allocations on the node), at thousands of fractional shares.
        self._holders: dict[int, dict[str, int]] = {i: {} for i in self.gpu_indices}
        self._leaving: set[str] = set()  # allocations whose cleanup has begun and not finished
        self._held_milli: dict[int, int] = {i: 0 for i in self.gpu_indices}
        self.allocations_max = ALLOCATIONS_PER_GPU_MAX * max(1, len(self.gpu_indices))
        self._cleaned: collections.OrderedDict[str, CleanupResult] = collections.OrderedDict()

    # ------------------------------------------------------------ prepare

    def validate_prepare(self, allocation_id: str, gpu_indices: list[int], gpu_milli: int, tenant_id: str
                         ) -> tuple[tuple[int, ...], int]:
        v: list[tuple[str, str]] = []
        if not allocation_id or len(allocation_id) > ALLOCATION_ID_LEN_MAX:
            v.append(("allocation_id", f"required, 1..{ALLOCATION_ID_LEN_MAX} characters"))
        if len(tenant_id) > TENANT_ID_LEN_MAX:
            v.append(("tenant_id", f"at most {TENANT_ID_LEN_MAX} characters"))
        if not gpu_indices:
            v.append(("gpu_indices", "at least one GPU index"))
        elif len(set(gpu_indices)) != len(gpu_indices):
            v.append(("gpu_indices", "indices must be unique"))
        unknown = sorted({i for i in gpu_indices if i not in self.gpu_indices})
        if unknown:
            v.append(("gpu_indices", f"no such GPU on this node: {unknown[:8]} (node has "
                                     f"{len(self.gpu_indices)} GPUs, indices 0..{len(self.gpu_indices) - 1})"))
        if not 0 <= gpu_milli <= GPU_MILLI_WHOLE:
            v.append(("gpu_milli", "0..1000 thousandths of each GPU (0 means a whole GPU)"))
        elif 0 < gpu_milli < GPU_MILLI_WHOLE and len(gpu_indices) > 1:
            v.append(("gpu_milli", "a fractional share is of exactly one GPU"))
        if v:
            raise InvalidArgument(f"invalid Prepare: {v[0][0]}: {v[0][1]}", violations=v)
        return tuple(gpu_indices), gpu_milli or GPU_MILLI_WHOLE

    def prepare(self, allocation_id: str, gpu_indices: list[int], gpu_milli: int, tenant_id: str) -> Allocation:
        gpus, milli = self.validate_prepare(allocation_id, gpu_indices, gpu_milli, tenant_id)
        with self._lock:
            prior = self._live.get(allocation_id)
            if prior is not None:
                if prior.gpu_indices == gpus and prior.gpu_milli == milli and prior.tenant_id == tenant_id:
                    return prior
                raise AlreadyExists(f"allocation {allocation_id} is already prepared on GPUs "
                                    f"{list(prior.gpu_indices)} (milli {prior.gpu_milli}); a Prepare with a "
                                    "different body is refused")
            bad = [(i, r) for i in gpus for st, r in [self.health.state(i)] if st is not GpuState.READY]
            if bad:
                raise GpuNotReady("GPU " + ", ".join(f"{i} is unhealthy: {r}" for i, r in bad), gpus=bad)
            full = []
            for i in gpus:
                held = self._holders[i]
                if self._held_milli[i] + milli > GPU_MILLI_WHOLE:
                    full.append((i, "held by " + ", ".join(f"{a} ({m} milli)" for a, m in list(held.items())[:4])))
            if full:
                raise GpuNotReady("GPU " + "; ".join(f"{i} {r}" for i, r in full), gpus=full, kind="GPU_CAPACITY")
            if len(self._live) >= self.allocations_max:
                raise FailedPrecondition(f"this node holds {self.allocations_max} allocations already")
            alloc = Allocation(allocation_id, gpus, milli, tenant_id, time.time())
            self._live[allocation_id] = alloc
            for i in gpus:
                self._holders[i][allocation_id] = milli
                self._held_milli[i] += milli
            # A retried placement may land here again after a cleanup: that is a new life.
            self._cleaned.pop(allocation_id, None)
        self.backend.on_prepare(allocation_id, list(gpus), milli)
        log.debug("prepared allocation %s on GPUs %s (%d milli, tenant %s)", allocation_id,
                 alloc.cuda_visible_devices, milli, tenant_id or "-")
        return alloc

    # ------------------------------------------------------------ cleanup

    def cleanup(self, allocation_id: str, *, grace_s: float = 5.0) -> CleanupResult:
        if not allocation_id or len(allocation_id) > ALLOCATION_ID_LEN_MAX:
            raise InvalidArgument("invalid Cleanup: allocation_id: required, 1..128 characters",
                                  violations=[("allocation_id", f"required, 1..{ALLOCATION_ID_LEN_MAX} characters")])
        with self._lock:
            alloc = self._live.get(allocation_id)
            if alloc is None:
                done = self._cleaned.get(allocation_id)
                if done is not None:
                    return CleanupResult(0, f"already cleaned up ({done.processes_ended} processes ended then)")
                raise NotFound(f"allocation {allocation_id} is not prepared on this node")
            # A GPU stays shared while a holder that is not leaving remains: of two cleanups of one
            # GPU's holders that overlap (two calls, or a CleanupBatch's items side by side), the
            # later sees the GPU as its own and ends its processes, instead of each leaving them to
            # the other.
            self._leaving.add(allocation_id)
            shared = [i for i in alloc.gpu_indices
                      if any(h != allocation_id and h not in self._leaving for h in self._holders[i])]
        try:
            exclusive = [i for i in alloc.gpu_indices if i not in shared]
            ended = self.backend.end_processes(exclusive, grace_s=grace_s) if exclusive else 0
            self.backend.on_release(allocation_id)
        except BaseException:
            with self._lock:
                self._leaving.discard(allocation_id)
            raise
        msg = f"ended {ended} leftover process(es) on GPUs {exclusive}" if exclusive else "no exclusive GPUs"
        if shared:
            msg += f"; GPUs {shared} are shared with other allocations, their processes were left running"
        result = CleanupResult(ended, msg)
        with self._lock:
            self._leaving.discard(allocation_id)
            if self._live.pop(allocation_id, None) is not None:
                for i in alloc.gpu_indices:
                    self._held_milli[i] -= self._holders[i].pop(allocation_id, 0)
            self._cleaned[allocation_id] = result
            while len(self._cleaned) > CLEANED_REMEMBERED_MAX:
                self._cleaned.popitem(last=False)
        log.info("cleaned up allocation %s: %s", allocation_id, msg)
        return result

    def live(self) -> list[Allocation]:
        with self._lock:
            return list(self._live.values())
