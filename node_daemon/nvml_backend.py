"""Real GPUs through NVML (`pynvml`, from the `nvidia-ml-py` distribution).

Reading and translating are separate: `read_static` / `read_dynamic` turn NVML
calls into a plain dict of readings (None wherever the GPU answers
NotSupported, or the driver lacks the call), and nvml_translate.py turns that
dict into domain objects. `readings()` returns the full dict, which is what
benchmarks/gpu_check.py records as a fixture for the translation test.

    nvmlInit ──► handles ──► read_static ──► inventory (NVLink islands from links + P2P status)
                     ├────► read_dynamic (per sample) ──► nvml_translate.sample_from_readings
                     ├────► event set (XID critical errors) ──► poll_xid_events
                     └────► running processes ──► end_processes (TERM, grace, KILL)
"""
from __future__ import annotations

import ctypes
import importlib
import logging
import os
import signal
import threading
import time

from node_daemon import nvml_translate as tr
from node_daemon.backend import GpuBackend, GpuSample, Inventory, ProcessSample, XidRecord

log = logging.getLogger("gpuaas.node_daemon.nvml")

NVLINK_LINKS_MAX = 36
P2P_STATUS_OK = 0
# ECC counters, retired pages and remapped rows change rarely and are costly to
# read on GSP-based GPUs; they are re-read at most this often (the urgent case,
# an uncorrectable error, also arrives at once as XID 48/94/95/63).
SLOW_FIELDS_REFRESH_S = 5.0
# nvmlDeviceGetTotalEnergyConsumption costs ~4.5 ms of CPU per call on an H100
# (measured by benchmarks/gpu_check.py's host; every other reading is 5-130 µs).
# It is read at most this often; between reads the energy is extrapolated from
# the power reading, and the reported counter never goes backwards.
ENERGY_REFRESH_S = 5.0


class NvmlUnavailable(RuntimeError):
    """NVML cannot be used on this machine (no library, no driver, no GPU)."""


class _Lost(Exception):
    """The GPU answered NVML_ERROR_GPU_IS_LOST."""


def _s(v) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def _proc_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


class NvmlBackend(GpuBackend):
    name = "nvml"
    simulated = False

    @classmethod
    def open(cls, *, nvml_module=None) -> "NvmlBackend":
        try:
            nv = nvml_module or importlib.import_module("pynvml")
        except ImportError as exc:
            raise NvmlUnavailable(f"pynvml is not installed: {exc}") from None
        try:
            nv.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - NVMLError, OSError from ctypes: all mean "no NVML"
            raise NvmlUnavailable(f"nvmlInit failed: {exc}") from None
        try:
            count = nv.nvmlDeviceGetCount()
        except Exception as exc:  # noqa: BLE001
            nv.nvmlShutdown()
            raise NvmlUnavailable(f"nvmlDeviceGetCount failed: {exc}") from None
        if count < 1:
            nv.nvmlShutdown()
            raise NvmlUnavailable("NVML initialized but sees no GPU")
        return cls(nv, count)

    def __init__(self, nv, count: int):
        self.nv = nv
        self._lock = threading.Lock()
        self._handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        self._lost: set[int] = set()
        self._warned: set[str] = set()
        self._closed = False
        self._slow: dict[int, tuple[float, dict]] = {}
        # gpu → [monotonic of the last real read, reported mJ, monotonic of the last report]
        self._energy: dict[int, list] = {}
        self._static = self.read_static()
        self._inventory = tr.inventory_from_readings(self._static)
        self._events = None
        self._open_event_set()

    # ------------------------------------------------------------ NVML calls

    def _call(self, fn_name: str, *args):
        """One NVML call; None when unsupported or failing (logged once per call name)."""
        nv = self.nv
        fn = getattr(nv, fn_name, None)
        if fn is None:
            return None
        try:
            return fn(*args)
        except nv.NVMLError as exc:
            if isinstance(exc, getattr(nv, "NVMLError_GpuIsLost", ())):
                raise _Lost() from None
            unsupported = (getattr(nv, "NVMLError_NotSupported", ()), getattr(nv, "NVMLError_FunctionNotFound", ()),
                           getattr(nv, "NVMLError_NoPermission", ()))
            if fn_name not in self._warned:
                self._warned.add(fn_name)
                level = logging.DEBUG if isinstance(exc, unsupported) else logging.WARNING
                log.log(level, "NVML %s: %s (reported as absent)", fn_name, exc)
            return None

    # ------------------------------------------------------------ readings

    def read_static(self) -> dict:
        nv = self.nv
        devices = []
        for i, h in enumerate(self._handles):
            mem = self._call("nvmlDeviceGetMemoryInfo", h)
            pci = self._call("nvmlDeviceGetPciInfo", h)
            mig = self._call("nvmlDeviceGetMigMode", h)
            links = []
            for link in range(min(NVLINK_LINKS_MAX, getattr(nv, "NVML_NVLINK_MAX_LINKS", NVLINK_LINKS_MAX))):
                try:
                    state = nv.nvmlDeviceGetNvLinkState(h, link)
                except nv.NVMLError:
                    # NotSupported (no NVLink) or InvalidArgument (past the last link): stop.
                    break
                remote = self._call("nvmlDeviceGetNvLinkRemotePciInfo", h, link) if state else None
                rtype = self._call("nvmlDeviceGetNvLinkRemoteDeviceType", h, link) if state else None
                links.append({"link": link, "active": bool(state == getattr(nv, "NVML_FEATURE_ENABLED", 1)),
                              "remote_pci_bus_id": _s(remote.busId) if remote is not None else None,
                              "remote_device_type": int(rtype) if rtype is not None else None})
            devices.append({
                "index": i, "name": _s(self._call("nvmlDeviceGetName", h) or ""),
                "uuid": _s(self._call("nvmlDeviceGetUUID", h) or ""),
                "pci_bus_id": _s(pci.busId) if pci is not None else "",
                "memory_info": {"total": mem.total, "free": mem.free, "used": mem.used} if mem is not None else None,
                "mig_mode": [int(mig[0]), int(mig[1])] if mig is not None else None,
                "nvlinks": links})
        n = len(self._handles)
        ancestor = [[None] * n for _ in range(n)]
        p2p = [[None] * n for _ in range(n)]
        for a in range(n):
            for b in range(n):
                if a == b:
                    continue
                lvl = self._call("nvmlDeviceGetTopologyCommonAncestor", self._handles[a], self._handles[b])
                ancestor[a][b] = int(lvl) if lvl is not None else None
                st = self._call("nvmlDeviceGetP2PStatus", self._handles[a], self._handles[b],
                                getattr(nv, "NVML_P2P_CAPS_INDEX_NVLINK", 2))
                p2p[a][b] = (int(st) == P2P_STATUS_OK) if st is not None else None
        return {"format": tr.FORMAT, "source": "recorded",
                "driver_version": _s(self._call("nvmlSystemGetDriverVersion") or ""),
                "nvml_version": _s(self._call("nvmlSystemGetNVMLVersion") or ""),
                "devices": devices, "topology": {"common_ancestor": ancestor, "p2p_nvlink": p2p}}

    def read_slow(self, i: int) -> dict:
        """ECC counters, retired pages, remapped rows of GPU ``i``."""
        nv, h = self.nv, self._handles[i]
        unc, cor = getattr(nv, "NVML_MEMORY_ERROR_TYPE_UNCORRECTED", 1), getattr(nv, "NVML_MEMORY_ERROR_TYPE_CORRECTED", 0)
        vol, agg = getattr(nv, "NVML_VOLATILE_ECC", 0), getattr(nv, "NVML_AGGREGATE_ECC", 1)
        ecc = {"volatile_corrected": self._call("nvmlDeviceGetTotalEccErrors", h, cor, vol),
               "volatile_uncorrected": self._call("nvmlDeviceGetTotalEccErrors", h, unc, vol),
               "aggregate_corrected": self._call("nvmlDeviceGetTotalEccErrors", h, cor, agg),
               "aggregate_uncorrected": self._call("nvmlDeviceGetTotalEccErrors", h, unc, agg)}
        sbe = self._call("nvmlDeviceGetRetiredPages", h, getattr(nv, "NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS", 0))
        dbe = self._call("nvmlDeviceGetRetiredPages", h, getattr(nv, "NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR", 1))
        pending = self._call("nvmlDeviceGetRetiredPagesPendingStatus", h)
        rows = self._call("nvmlDeviceGetRemappedRows", h)
        return {
            "ecc": {k: (int(v) if v is not None else None) for k, v in ecc.items()},
            "retired_pages": ({"single_bit": len(sbe or []), "double_bit": len(dbe or []),
                               "pending": bool(pending) if pending is not None else False}
                              if sbe is not None or dbe is not None else None),
            "remapped_rows": ({"correctable": int(rows[0]), "uncorrectable": int(rows[1]), "pending": bool(rows[2]),
                               "failure": bool(rows[3])} if rows is not None else None),
        }

    def _energy_mj(self, i: int, h, power_mw, now: float, max_age_s: float):
        e = self._energy.get(i)
        if e is None or max_age_s <= 0 or now - e[0] > max_age_s or power_mw is None:
            real = self._call("nvmlDeviceGetTotalEnergyConsumption", h)
            if real is None:
                return None
            reported = max(int(real), e[1] if e else 0)
            self._energy[i] = [now, reported, now]
            return reported
        e[1] = int(e[1] + power_mw * max(0.0, now - e[2]))  # mW × s = mJ
        e[2] = now
        return e[1]

    def read_dynamic(self, i: int, *, slow_max_age_s: float = 0.0, energy_max_age_s: float = 0.0) -> dict:
        nv, h = self.nv, self._handles[i]
        util = self._call("nvmlDeviceGetUtilizationRates", h)
        mem = self._call("nvmlDeviceGetMemoryInfo", h)
        reasons = self._call("nvmlDeviceGetCurrentClocksEventReasons", h)
        if reasons is None:
            reasons = self._call("nvmlDeviceGetCurrentClocksThrottleReasons", h)
        now = time.monotonic()
        power = self._call("nvmlDeviceGetPowerUsage", h)
        cached = self._slow.get(i)
        if cached is None or now - cached[0] > slow_max_age_s:
            cached = self._slow[i] = (now, self.read_slow(i))
        return {
            "index": i, "uuid": self._inventory.gpus[i].uuid if hasattr(self, "_inventory") else "",
            **cached[1],
            "utilization": {"gpu": util.gpu, "memory": util.memory} if util is not None else None,
            "memory_info": {"total": mem.total, "free": mem.free, "used": mem.used} if mem is not None else None,
            "temperature_c": self._call("nvmlDeviceGetTemperature", h, getattr(nv, "NVML_TEMPERATURE_GPU", 0)),
            "power_usage_mw": power,
            "clock_sm_mhz": self._call("nvmlDeviceGetClockInfo", h, getattr(nv, "NVML_CLOCK_SM", 1)),
            "throttle_reasons": int(reasons) if reasons is not None else None,
            "total_energy_mj": self._energy_mj(i, h, power, now, energy_max_age_s),
            "processes": [{"pid": p.pid, "used_gpu_memory": p.used_gpu_memory, "name": p.name}
                          for p in self.processes(i, raw=True)],
        }

    def readings(self) -> dict:
        """Static + dynamic readings of every GPU (what gpu_check.py records)."""
        out = dict(self._static)
        devices = []
        for i, static in enumerate(self._static["devices"]):
            d = dict(static)
            try:
                d.update(self.read_dynamic(i))
            except _Lost:
                d["lost"] = True
            devices.append(d)
        out["devices"] = devices
        return out

    # ------------------------------------------------------------ interface

    def inventory(self) -> Inventory:
        return self._inventory

    def sample(self) -> list[GpuSample]:
        out = []
        with self._lock:
            for i, g in enumerate(self._inventory.gpus):
                if i in self._lost:
                    out.append(GpuSample(index=g.index, uuid=g.uuid, lost=True))
                    continue
                try:
                    out.append(tr.sample_from_readings(self.read_dynamic(
                        i, slow_max_age_s=SLOW_FIELDS_REFRESH_S, energy_max_age_s=ENERGY_REFRESH_S)))
                except _Lost:
                    self._lost.add(i)
                    log.error("GPU %d (%s) is lost: NVML says it fell off the bus", i, g.uuid)
                    out.append(GpuSample(index=g.index, uuid=g.uuid, lost=True))
        return out

    def _open_event_set(self) -> None:
        nv = self.nv
        try:
            self._events = nv.nvmlEventSetCreate()
        except nv.NVMLError as exc:
            log.warning("NVML event set unavailable (%s): XID events will not be reported", exc)
            return
        mask = getattr(nv, "nvmlEventTypeXidCriticalError", 8)
        registered = 0
        for i, h in enumerate(self._handles):
            try:
                nv.nvmlDeviceRegisterEvents(h, mask, self._events)
                registered += 1
            except nv.NVMLError as exc:
                log.warning("GPU %d: XID events unavailable (%s)", i, exc)
        log.info("XID events: watching %d of %d GPU(s)", registered, len(self._handles))

    def _index_of(self, device) -> int:
        try:
            return int(self.nv.nvmlDeviceGetIndex(device))
        except Exception:  # noqa: BLE001 - fall back to comparing handle addresses
            addr = ctypes.cast(device, ctypes.c_void_p).value
            for i, h in enumerate(self._handles):
                if ctypes.cast(h, ctypes.c_void_p).value == addr:
                    return i
            return -1

    def poll_xid_events(self, timeout_ms: int) -> list[XidRecord]:
        nv = self.nv
        if self._events is None or self._closed:
            time.sleep(timeout_ms / 1000)
            return []
        try:
            data = nv.nvmlEventSetWait_v2(self._events, int(timeout_ms))
        except nv.NVMLError as exc:
            if not isinstance(exc, getattr(nv, "NVMLError_Timeout", ())):
                log.debug("nvmlEventSetWait: %s", exc)
                time.sleep(timeout_ms / 1000)
            return []
        if not data.eventType & getattr(nv, "nvmlEventTypeXidCriticalError", 8):
            return []
        xid = int(data.eventData)
        return [XidRecord(self._index_of(data.device), xid, time.time(), f"NVML XID critical error {xid}")]

    def processes(self, gpu_index: int, *, raw: bool = False):
        h = self._handles[gpu_index]
        seen: dict[int, ProcessSample] = {}
        for fn in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            for p in self._call(fn, h) or []:
                used = getattr(p, "usedGpuMemory", None)
                used = int(used) if isinstance(used, int) and used < 2**63 else None
                if p.pid not in seen:
                    seen[p.pid] = (p.pid, used, _proc_name(p.pid))
        if raw:
            return [_RawProc(pid, used, name) for pid, used, name in seen.values()]
        return [ProcessSample(pid, (used or 0) // tr.MIB, name) for pid, used, name in seen.values()]

    def end_processes(self, gpu_indices: list[int], *, grace_s: float = 5.0) -> int:
        me = os.getpid()
        pids = {p.pid for i in gpu_indices for p in self.processes(i) if p.pid != me}
        if not pids:
            return 0
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        alive = set(pids)
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = {p for p in alive if _exists(p)}
        for pid in alive:
            log.warning("process %d did not end within %.1fs of SIGTERM: SIGKILL", pid, grace_s)
            _signal(pid, signal.SIGKILL)
        time.sleep(0.1 if alive else 0)
        ended = sum(1 for p in pids if not _exists(p))
        log.info("ended %d of %d leftover process(es) on GPUs %s", ended, len(pids), gpu_indices)
        return ended

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._events is not None:
                self.nv.nvmlEventSetFree(self._events)
            self.nv.nvmlShutdown()
        except Exception as exc:  # noqa: BLE001
            log.debug("NVML shutdown: %s", exc)


class _RawProc:
    __slots__ = ("pid", "used_gpu_memory", "name")

    def __init__(self, pid, used, name):
        self.pid, self.used_gpu_memory, self.name = pid, used, name


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        log.error("not allowed to signal process %d (run the daemon as root to clean up other users' processes)", pid)


def _exists(pid: int) -> bool:
    """True while the process runs. A zombie (ended, not yet reaped by its parent) has ended."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
