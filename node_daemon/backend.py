"""The GPU backend interface and the domain types every backend speaks.

Proto types stop at the edge (server.py); backends, the telemetry hub and the
health rules work on these plain objects.

    GpuBackend (abstract)
    ├── NvmlBackend       nvml_backend.py   real GPUs through pynvml
    └── SimulatedBackend  sim_backend.py    N simulated GPUs, fault injection
"""
from __future__ import annotations

import abc
import dataclasses
import enum
import re


class BackendKind(enum.Enum):
    NVML = "nvml"
    SIMULATED = "simulated"


# NVML clock-event ("throttle") reason bits, nvml.h nvmlClocksEventReason*.
THROTTLE_GPU_IDLE = 0x1
THROTTLE_APP_CLOCKS = 0x2
THROTTLE_SW_POWER_CAP = 0x4
THROTTLE_HW_SLOWDOWN = 0x8
THROTTLE_SYNC_BOOST = 0x10
THROTTLE_SW_THERMAL = 0x20
THROTTLE_HW_THERMAL = 0x40
THROTTLE_HW_POWER_BRAKE = 0x80


@dataclasses.dataclass(frozen=True)
class GpuDevice:
    index: int
    uuid: str
    name: str
    model: str
    memory_mib: int
    pci_bus_id: str = ""
    mig_enabled: bool = False
    nvlink_island: int = 0


@dataclasses.dataclass(frozen=True)
class Inventory:
    """What the backend knows about the GPUs; the daemon adds the node's own facts."""
    backend: BackendKind
    simulated: bool
    driver_version: str
    nvml_version: str
    gpus: tuple[GpuDevice, ...]


@dataclasses.dataclass(frozen=True)
class ProcessSample:
    pid: int
    used_memory_mib: int
    name: str


@dataclasses.dataclass(frozen=True)
class GpuSample:
    index: int
    uuid: str
    gpu_util_pct: int = 0
    memory_util_pct: int = 0
    memory_used_mib: int = 0
    temperature_c: int = 0
    power_mw: int = 0
    sm_clock_mhz: int = 0
    throttle_reasons: int = 0
    ecc_volatile_corrected: int = 0
    ecc_volatile_uncorrected: int = 0
    ecc_aggregate_uncorrected: int = 0
    retired_pages: int = 0
    energy_mj: int = 0
    processes: tuple[ProcessSample, ...] = ()
    lost: bool = False


@dataclasses.dataclass(frozen=True)
class XidRecord:
    gpu_index: int
    xid: int
    at_s: float  # wall-clock seconds since the epoch
    message: str = ""


class GpuBackend(abc.ABC):
    """One node's GPUs. Implementations are thread-safe: the telemetry hub,
    the XID poller and the RPC handlers call them from different threads."""

    name: str
    simulated: bool

    @abc.abstractmethod
    def inventory(self) -> Inventory: ...

    @abc.abstractmethod
    def sample(self) -> list[GpuSample]:
        """One reading of every GPU, in index order."""

    # True when wake_xid_poll() ends a blocked poll_xid_events at once: the poller may then
    # block for long (no periodic wake-up just to notice a stop).
    xid_poll_interruptible = False

    @abc.abstractmethod
    def poll_xid_events(self, timeout_ms: int) -> list[XidRecord]:
        """Block up to ``timeout_ms`` for XID events; [] on timeout."""

    def wake_xid_poll(self) -> None:
        """End a blocked poll_xid_events early (the daemon is stopping), where the backend can."""

    @abc.abstractmethod
    def processes(self, gpu_index: int) -> list[ProcessSample]: ...

    # True when end_processes may wait (up to its grace) for processes to exit: a CleanupBatch then
    # cleans its items up side by side, so that one stubborn process does not hold back the rest.
    process_end_waits = True

    @abc.abstractmethod
    def end_processes(self, gpu_indices: list[int], *, grace_s: float = 5.0) -> int:
        """End every process on these GPUs (TERM, then KILL after grace); returns how many ended."""

    def on_prepare(self, allocation_id: str, gpu_indices: list[int], gpu_milli: int) -> None:
        """An allocation now holds these GPUs (the simulated backend puts load on them)."""

    def on_release(self, allocation_id: str) -> None:
        """The allocation is gone."""

    def close(self) -> None:
        """Release the driver handle; idempotent."""


# Short model names used for placement, longest match first (so "H100" does not
# win over "GH200", nor "A10" over "A100").
_MODELS = ("GB200", "GH200", "B200", "B100", "H200", "H100", "H800", "H20", "A100", "A800", "A40", "A30",
           "A10G", "A10", "A16", "A2", "L40S", "L40", "L4", "V100", "T4", "P100", "P40", "P4", "K80",
           "RTX 6000 ADA", "RTX A6000", "RTX 4090", "RTX 3090")
_MODELS_BY_LEN = sorted(_MODELS, key=len, reverse=True)


def model_from_name(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' → 'H100'; unknown names → the name without the vendor prefix."""
    up = name.upper()
    for m in _MODELS_BY_LEN:
        if re.search(r"(?<![A-Z0-9])" + re.escape(m) + r"(?![0-9])", up):
            return m.replace(" ", "-")
    short = re.sub(r"^(NVIDIA|TESLA|GEFORCE|QUADRO)\s+", "", name.strip(), flags=re.I)
    return (short.split()[0] if short else "GPU")[:32]
