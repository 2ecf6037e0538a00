"""Simulated GPUs: for machines without an NVIDIA driver, and for tests.

Behaves like the NVML backend on the wire. Metrics follow the allocations
prepared on each GPU: utilization, power, memory and temperature rise while an
allocation holds it, energy integrates power. Noise comes from a seeded RNG and
time from an injectable clock, so a run is reproducible from its seed.

Faults (applied through faults.py from the daemon's --fault-dir):

    xid(gpu, code)            an XID event on that GPU
    ecc_uncorrectable(gpu)    volatile+aggregate uncorrectable ECC count +1, a retired page, XID 48
    thermal_trip(gpu)         temperature to the slowdown point, HW thermal slowdown bits, clocks halved
    fall_off_bus(gpu)         XID 79, the GPU reports lost=true with zeroed metrics from then on
    clear(gpu | all)          undo the above (the operator replaced/reset the GPU)
"""
from __future__ import annotations

import dataclasses
import math
import random
import threading
import time
import zlib
from typing import Callable

from node_daemon.backend import (
    THROTTLE_GPU_IDLE,
    THROTTLE_HW_SLOWDOWN,
    THROTTLE_HW_THERMAL,
    THROTTLE_SW_THERMAL,
    BackendKind,
    GpuBackend,
    GpuDevice,
    GpuSample,
    Inventory,
    ProcessSample,
    XidRecord,
)


@dataclasses.dataclass(frozen=True)
class GpuModelSpec:
    model: str
    name: str
    memory_mib: int
    power_idle_w: float
    power_max_w: float
    sm_clock_idle_mhz: int
    sm_clock_max_mhz: int


MODELS: dict[str, GpuModelSpec] = {s.model: s for s in [
    GpuModelSpec("H100", "NVIDIA H100 80GB HBM3", 81559, 70, 700, 345, 1980),
    GpuModelSpec("H200", "NVIDIA H200", 143771, 75, 700, 345, 1980),
    GpuModelSpec("B200", "NVIDIA B200", 183359, 120, 1000, 345, 1965),
    GpuModelSpec("A100", "NVIDIA A100-SXM4-80GB", 81920, 55, 400, 210, 1410),
    GpuModelSpec("L40S", "NVIDIA L40S", 46068, 35, 350, 210, 2520),
    GpuModelSpec("L4", "NVIDIA L4", 23034, 16, 72, 210, 2040),
    GpuModelSpec("A10G", "NVIDIA A10G", 23028, 25, 300, 210, 1710),
    GpuModelSpec("T4", "Tesla T4", 15360, 10, 70, 300, 1590),
    GpuModelSpec("V100", "Tesla V100-SXM2-32GB", 32768, 40, 300, 135, 1530),
]}

AMBIENT_C = 30.0
TEMP_RISE_BUSY_C = 42.0
TEMP_TAU_S = 3.0  # thermal time constant: quick, so tests see the rise within seconds
THERMAL_TRIP_C = 92
BASE_MEMORY_MIB = 512
SIM_DRIVER_VERSION = "sim-550.54.15"
SIM_NVML_VERSION = "sim-12.550.54.15"


def spec_for(model: str) -> GpuModelSpec:
    key = model.strip().upper()
    if key in MODELS:
        return MODELS[key]
    return GpuModelSpec(key or "GPU", f"NVIDIA {key or 'GPU'}", 81920, 60, 500, 300, 1800)


@dataclasses.dataclass
class _SimGpu:
    device: GpuDevice
    temperature_c: float = AMBIENT_C
    energy_mj: float = 0.0
    ecc_volatile_corrected: int = 0
    ecc_volatile_uncorrected: int = 0
    ecc_aggregate_uncorrected: int = 0
    retired_pages: int = 0
    thermal_trip: bool = False
    lost: bool = False
    # allocation_id → (gpu_milli, simulated pids still "running")
    holders: dict = dataclasses.field(default_factory=dict)
    # (processes, milli of the holders with processes, their memory) derived from holders; None: rebuild.
    # A shared GPU can hold hundreds of allocations, and samples come every interval.
    derived: tuple | None = None


class SimulatedBackend(GpuBackend):
    name = BackendKind.SIMULATED.value
    simulated = True
    process_end_waits = False  # simulated processes end at once

    def __init__(self, *, gpus: int = 8, model: str = "H100", island_size: int = 0, seed: int = 0,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
                 node_name: str = "sim"):
        if not 1 <= gpus <= 64:
            raise ValueError("gpus must be 1..64")
        self.spec = spec_for(model)
        island_size = island_size if island_size > 0 else gpus
        self._clock, self._wall = clock, wall_clock
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._xid_cv = threading.Condition(self._lock)
        self._xids: list[XidRecord] = []
        self._next_pid = 100_000 + (seed % 1000) * 100
        self._last_t = clock()
        seed_tag = f"{seed:04x}"[-4:]
        self._gpus = [_SimGpu(GpuDevice(
            index=i, uuid=f"GPU-5e1a7ed0-{seed_tag}-{zlib.crc32(node_name.encode()) & 0xFFFF:04x}-8000-{i:012x}",
            name=self.spec.name, model=self.spec.model, memory_mib=self.spec.memory_mib,
            pci_bus_id=f"{i // 14:08X}:{0x18 + (i % 14) * 0x10:02X}:00.0", mig_enabled=False,
            nvlink_island=i // island_size)) for i in range(gpus)]
        self._closed = False

    # ------------------------------------------------------------ interface

    def inventory(self) -> Inventory:
        return Inventory(backend=BackendKind.SIMULATED, simulated=True, driver_version=SIM_DRIVER_VERSION,
                         nvml_version=SIM_NVML_VERSION, gpus=tuple(g.device for g in self._gpus))

    def sample(self) -> list[GpuSample]:
        with self._lock:
            now = self._clock()
            dt_s = max(0.0, now - self._last_t)
            self._last_t = now
            return [self._step(g, dt_s) for g in self._gpus]

    def poll_xid_events(self, timeout_ms: int) -> list[XidRecord]:
        with self._xid_cv:
            if not self._xids and not self._closed:
                self._xid_cv.wait(max(0, timeout_ms) / 1000)
            out, self._xids = self._xids, []
            return out

    xid_poll_interruptible = True

    def wake_xid_poll(self) -> None:
        with self._xid_cv:
            self._xid_cv.notify_all()

    def processes(self, gpu_index: int) -> list[ProcessSample]:
        with self._lock:
            return self._procs(self._gpu(gpu_index))

    def end_processes(self, gpu_indices: list[int], *, grace_s: float = 5.0) -> int:
        ended = 0
        with self._lock:
            for i in gpu_indices:
                g = self._gpu(i)
                for aid, (milli, pids) in list(g.holders.items()):
                    ended += len(pids)
                    g.holders[aid] = (milli, [])
                g.derived = None
        return ended

    def on_prepare(self, allocation_id: str, gpu_indices: list[int], gpu_milli: int) -> None:
        with self._lock:
            for i in gpu_indices:
                g = self._gpu(i)
                if allocation_id not in g.holders:
                    # The tenant's workload starts one process per GPU.
                    g.holders[allocation_id] = (gpu_milli or 1000, [self._new_pid()])
                    g.derived = None

    def on_release(self, allocation_id: str) -> None:
        with self._lock:
            for g in self._gpus:
                if g.holders.pop(allocation_id, None) is not None:
                    g.derived = None

    def close(self) -> None:
        with self._xid_cv:
            self._closed = True
            self._xid_cv.notify_all()

    # ------------------------------------------------------------ faults

    def inject_xid(self, gpu_index: int, xid: int, message: str = "") -> None:
        with self._xid_cv:
            self._gpu(gpu_index)
            self._emit(gpu_index, xid, message or f"simulated XID {xid}")

    def inject_ecc_uncorrectable(self, gpu_index: int, count: int = 1) -> None:
        with self._xid_cv:
            g = self._gpu(gpu_index)
            g.ecc_volatile_uncorrected += count
            g.ecc_aggregate_uncorrected += count
            g.retired_pages += 1
            self._emit(gpu_index, 48, "simulated double-bit ECC error")

    def inject_thermal_trip(self, gpu_index: int) -> None:
        with self._lock:
            self._gpu(gpu_index).thermal_trip = True

    def inject_fall_off_bus(self, gpu_index: int) -> None:
        with self._xid_cv:
            g = self._gpu(gpu_index)
            g.lost = True
            self._emit(gpu_index, 79, "simulated: GPU has fallen off the bus")

    def clear(self, gpu_index: int | None = None) -> None:
        with self._lock:
            for g in self._gpus if gpu_index is None else [self._gpu(gpu_index)]:
                g.thermal_trip = g.lost = False
                g.ecc_volatile_uncorrected = 0

    # ------------------------------------------------------------ model

    def _gpu(self, index: int) -> _SimGpu:
        if not 0 <= index < len(self._gpus):
            raise IndexError(f"no GPU {index} (this node has {len(self._gpus)})")
        return self._gpus[index]

    def _new_pid(self) -> int:
        self._next_pid += 1
        return self._next_pid

    def _emit(self, gpu_index: int, xid: int, message: str) -> None:
        self._xids.append(XidRecord(gpu_index, int(xid), self._wall(), message))
        self._xid_cv.notify_all()

    def _procs(self, g: _SimGpu) -> list[ProcessSample]:
        out = []
        for aid, (milli, pids) in sorted(g.holders.items()):
            mem = int(g.device.memory_mib * 0.7 * milli / 1000)
            out += [ProcessSample(pid, mem, f"sim-{aid[:8]}") for pid in pids]
        return out

    def _step(self, g: _SimGpu, dt_s: float) -> GpuSample:
        d, s = g.device, self.spec
        if g.lost:
            return GpuSample(index=d.index, uuid=d.uuid, lost=True, ecc_aggregate_uncorrected=g.ecc_aggregate_uncorrected,
                             retired_pages=g.retired_pages, energy_mj=int(g.energy_mj))
        if g.derived is None:
            procs = tuple(self._procs(g))
            g.derived = (procs, sum(m for m, pids in g.holders.values() if pids),
                         sum(p.used_memory_mib for p in procs))
        procs, running, procs_mib = g.derived
        load = min(1.0, running / 1000)
        busy = load > 0
        util = min(100, max(0, round(100 * load * self._rng.uniform(0.88, 1.0)))) if busy else 0
        target_c = AMBIENT_C + TEMP_RISE_BUSY_C * util / 100
        if dt_s > 0:
            g.temperature_c = target_c + (g.temperature_c - target_c) * math.exp(-dt_s / TEMP_TAU_S)
        throttle = 0 if busy else THROTTLE_GPU_IDLE
        clock = s.sm_clock_max_mhz if busy else s.sm_clock_idle_mhz
        temp = g.temperature_c + self._rng.uniform(-0.4, 0.4)
        if g.thermal_trip:
            temp = max(temp, THERMAL_TRIP_C + 2)
            throttle |= THROTTLE_HW_SLOWDOWN | THROTTLE_HW_THERMAL | THROTTLE_SW_THERMAL
            clock = s.sm_clock_max_mhz // 2
        power_w = s.power_idle_w + (s.power_max_w - s.power_idle_w) * util / 100 * self._rng.uniform(0.95, 1.0)
        g.energy_mj += power_w * 1000 * dt_s
        used = BASE_MEMORY_MIB + procs_mib
        return GpuSample(
            index=d.index, uuid=d.uuid, gpu_util_pct=util,
            memory_util_pct=min(100, round(util * 0.6)), memory_used_mib=min(d.memory_mib, used),
            temperature_c=round(temp), power_mw=round(power_w * 1000), sm_clock_mhz=clock,
            throttle_reasons=throttle, ecc_volatile_corrected=g.ecc_volatile_corrected,
            ecc_volatile_uncorrected=g.ecc_volatile_uncorrected,
            ecc_aggregate_uncorrected=g.ecc_aggregate_uncorrected, retired_pages=g.retired_pages,
            energy_mj=int(g.energy_mj), processes=procs, lost=False)
