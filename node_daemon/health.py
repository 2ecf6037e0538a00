"""The daemon's own view of its GPUs' health (answers Health, guards Prepare).

The control plane applies the authoritative rules (actors/node_shard.py); the
daemon keeps the same rules locally so it refuses to prepare an allocation on a
GPU it already knows is bad, even before the control plane has reacted.

    rule                                         sticky?   cleared by
    XID that the catalog says needs a reset      yes       `clear` fault / daemon restart (after a GPU reset)
    XID that says drain the node (all GPUs)      yes       idem
    GPU lost (fell off the bus)                  yes       idem
    uncorrectable ECC since driver load          yes       idem (volatile counter resets with the driver)
    thermal trip (HW thermal slowdown / ≥ trip)  no        clears itself when the GPU cools down
"""
from __future__ import annotations

import threading

from gpuaas import xid as xidmod
from gpuaas.lifecycle import GpuState
from node_daemon.backend import THROTTLE_HW_THERMAL, GpuSample, XidRecord

THERMAL_TRIP_C = 92


class HealthView:
    def __init__(self, gpu_indices: list[int]):
        self._lock = threading.Lock()
        self._indices = list(gpu_indices)
        self._sticky: dict[int, str] = {}
        self._transient: dict[int, str] = {}

    def record_xid(self, x: XidRecord) -> bool:
        """Apply one XID; True when it took a GPU out of service."""
        action = xidmod.classify(x.xid)
        if not xidmod.takes_gpu_out_of_service(x.xid):
            return False
        reason = f"XID {x.xid} ({action.value}): {xidmod.describe(x.xid)}"
        with self._lock:
            targets = self._indices if action is xidmod.XidAction.DRAIN_NODE else [x.gpu_index]
            for i in targets:
                if i in self._indices:
                    self._sticky.setdefault(i, reason)
        return True

    def observe(self, samples: list[GpuSample]) -> None:
        with self._lock:
            for s in samples:
                if s.lost:
                    self._sticky.setdefault(s.index, "GPU fell off the bus (lost)")
                    continue
                if s.ecc_volatile_uncorrected > 0:
                    self._sticky.setdefault(s.index, f"{s.ecc_volatile_uncorrected} uncorrectable ECC error(s)"
                                                     " since driver load")
                if s.throttle_reasons & THROTTLE_HW_THERMAL or s.temperature_c >= THERMAL_TRIP_C:
                    self._transient[s.index] = f"thermal trip ({s.temperature_c} °C, HW thermal slowdown)"
                else:
                    self._transient.pop(s.index, None)

    def clear(self, gpu_index: int | None = None) -> None:
        with self._lock:
            if gpu_index is None:
                self._sticky.clear()
                self._transient.clear()
            else:
                self._sticky.pop(gpu_index, None)
                self._transient.pop(gpu_index, None)

    def state(self, gpu_index: int) -> tuple[GpuState, str]:
        with self._lock:
            reason = self._sticky.get(gpu_index) or self._transient.get(gpu_index)
        return (GpuState.UNHEALTHY, reason) if reason else (GpuState.READY, "")

    def states(self) -> list[tuple[int, GpuState, str]]:
        return [(i, *self.state(i)) for i in self._indices]
