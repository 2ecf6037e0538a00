"""Pure translation of raw NVML readings into the daemon's domain types.

The NVML backend first records what the driver said into a plain dict (the
"readings", JSON-serialisable, `None` wherever NVML answered NotSupported or
the call does not exist in this driver), then calls the functions below. The
same functions run in CI on recorded readings (tests/node_daemon/fixtures/),
so the translation is tested without a GPU.

Readings format "gpuaas-nvml-readings/1":

    {"format": "gpuaas-nvml-readings/1", "source": "recorded" | "documented-shapes",
     "driver_version": str, "nvml_version": str,
     "devices": [{
        "index": int, "name": str, "uuid": str, "pci_bus_id": str,
        "memory_info": {"total": bytes, "free": bytes, "used": bytes} | null,
        "mig_mode": [current, pending] | null,
        "utilization": {"gpu": pct, "memory": pct} | null,
        "temperature_c": int | null, "power_usage_mw": int | null, "clock_sm_mhz": int | null,
        "throttle_reasons": int | null,
        "ecc": {"volatile_corrected", "volatile_uncorrected", "aggregate_corrected", "aggregate_uncorrected": int | null} | null,
        "retired_pages": {"single_bit": int, "double_bit": int, "pending": bool} | null,   (pre-Ampere)
        "remapped_rows": {"correctable": int, "uncorrectable": int, "pending": bool, "failure": bool} | null,  (Ampere+)
        "total_energy_mj": int | null,
        "nvlinks": [{"link": int, "active": bool, "remote_pci_bus_id": str | null, "remote_device_type": int | null}],
        "processes": [{"pid": int, "used_gpu_memory": bytes | null, "name": str}]
     }],
     "topology": {"common_ancestor": [[level | null]], "p2p_nvlink": [[bool | null]]} }
"""
from __future__ import annotations

from node_daemon.backend import (
    BackendKind,
    GpuDevice,
    GpuSample,
    Inventory,
    ProcessSample,
    model_from_name,
)

FORMAT = "gpuaas-nvml-readings/1"
MIB = 1024 * 1024
NVLINK_DEVICE_TYPE_SWITCH = 2  # nvmlIntNvLinkDeviceType_t NVML_NVLINK_DEVICE_TYPE_SWITCH

# nvmlGpuTopologyLevel_t, for reading the common-ancestor matrix
TOPOLOGY_LEVELS = {0: "INTERNAL", 10: "SINGLE", 20: "MULTIPLE", 30: "HOSTBRIDGE", 40: "NODE", 50: "SYSTEM"}


def _i(v, default: int = 0) -> int:
    """NVML value or None (NotSupported) → int."""
    if v is None or isinstance(v, bool):
        return default if v is None else int(v)
    try:
        return int(v)
    except (TypeError, ValueError):
        return default


def normalize_pci(bus_id: str | None) -> str:
    """'00000000:18:00.0' and '0000:18:00.0' → '0000:18:00.0' (domain, bus, device.function)."""
    if not bus_id:
        return ""
    parts = str(bus_id).strip().upper().split(":")
    if len(parts) == 3:
        try:
            return f"{int(parts[0], 16):04X}:{parts[1]}:{parts[2]}"
        except ValueError:
            pass
    return str(bus_id).strip().upper()


def nvlink_islands(devices: list[dict], topology: dict | None) -> list[int]:
    """Island id per device (list order): GPUs connected by NVLink — directly, through
    NVSwitches, or as NVML's P2P NVLink status reports — share an island; a GPU
    without NVLink is an island of its own. Ids count from 0 in order of the lowest
    member index."""
    n = len(devices)
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    by_pci = {normalize_pci(d.get("pci_bus_id")): k for k, d in enumerate(devices)}
    on_switch: list[int] = []
    for k, d in enumerate(devices):
        for link in d.get("nvlinks") or []:
            if not link.get("active"):
                continue
            if link.get("remote_device_type") == NVLINK_DEVICE_TYPE_SWITCH:
                on_switch.append(k)
                continue
            peer = by_pci.get(normalize_pci(link.get("remote_pci_bus_id")))
            if peer is not None and peer != k:
                union(k, peer)
    for k in on_switch[1:]:
        union(on_switch[0], k)
    p2p = (topology or {}).get("p2p_nvlink") or []
    for a, row in enumerate(p2p[:n]):
        for b, ok in enumerate((row or [])[:n]):
            if ok and a != b:
                union(a, b)
    ids: dict[int, int] = {}
    return [ids.setdefault(find(k), len(ids)) for k in range(n)]


def inventory_from_readings(r: dict) -> Inventory:
    devices = r.get("devices") or []
    islands = nvlink_islands(devices, r.get("topology"))
    gpus = []
    for k, d in enumerate(devices):
        name = str(d.get("name") or "NVIDIA GPU")
        mem = d.get("memory_info") or {}
        mig = d.get("mig_mode")
        gpus.append(GpuDevice(
            index=_i(d.get("index"), k), uuid=str(d.get("uuid") or ""), name=name, model=model_from_name(name),
            memory_mib=_i(mem.get("total")) // MIB, pci_bus_id=str(d.get("pci_bus_id") or ""),
            mig_enabled=bool(mig and _i(mig[0]) == 1), nvlink_island=islands[k]))
    return Inventory(backend=BackendKind.NVML, simulated=False, driver_version=str(r.get("driver_version") or ""),
                     nvml_version=str(r.get("nvml_version") or ""), gpus=tuple(gpus))


def sample_from_readings(d: dict, *, lost: bool = False) -> GpuSample:
    """One GPU's dynamic readings → GpuSample. Absent (NotSupported) readings are zero."""
    index, uuid = _i(d.get("index")), str(d.get("uuid") or "")
    if lost or d.get("lost"):
        return GpuSample(index=index, uuid=uuid, lost=True)
    util = d.get("utilization") or {}
    mem = d.get("memory_info") or {}
    ecc = d.get("ecc") or {}
    retired = d.get("retired_pages")
    remapped = d.get("remapped_rows")
    if retired is not None:
        pages = _i(retired.get("single_bit")) + _i(retired.get("double_bit"))
    elif remapped is not None:
        # Ampere+ replaced page retirement with row remapping: report remapped rows.
        pages = _i(remapped.get("correctable")) + _i(remapped.get("uncorrectable"))
    else:
        pages = 0
    procs = tuple(ProcessSample(pid=_i(p.get("pid")), used_memory_mib=_i(p.get("used_gpu_memory")) // MIB,
                                name=str(p.get("name") or ""))
                  for p in d.get("processes") or [])
    return GpuSample(
        index=index, uuid=uuid, gpu_util_pct=_i(util.get("gpu")), memory_util_pct=_i(util.get("memory")),
        memory_used_mib=_i(mem.get("used")) // MIB, temperature_c=_i(d.get("temperature_c")),
        power_mw=_i(d.get("power_usage_mw")), sm_clock_mhz=_i(d.get("clock_sm_mhz")),
        throttle_reasons=_i(d.get("throttle_reasons")),
        ecc_volatile_corrected=_i(ecc.get("volatile_corrected")),
        ecc_volatile_uncorrected=_i(ecc.get("volatile_uncorrected")),
        ecc_aggregate_uncorrected=_i(ecc.get("aggregate_uncorrected")),
        retired_pages=pages, energy_mj=_i(d.get("total_energy_mj")), processes=procs, lost=False)


def samples_from_readings(r: dict) -> list[GpuSample]:
    return [sample_from_readings(d) for d in r.get("devices") or []]
