"""The edge: domain objects ⇄ contract messages. Nothing else imports _pb2 types
for data (server.py and registration.py only send what this module builds)."""
from __future__ import annotations

from google.protobuf import timestamp_pb2

from node_daemon.backend import GpuSample, Inventory, XidRecord
from node_daemon.telemetry import Frame
from gpuaas.v1 import node_pb2


def _ts(at_s: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(at_s * 1e9))
    return ts


def inventory_pb(inv: Inventory, *, node_name: str, hostname: str, cpu_milli: int, memory_mib: int,
                 labels: dict[str, str]) -> node_pb2.NodeInventory:
    return node_pb2.NodeInventory(
        node_name=node_name, hostname=hostname, backend=inv.backend.value, simulated=inv.simulated,
        driver_version=inv.driver_version, nvml_version=inv.nvml_version, cpu_milli=cpu_milli,
        memory_mib=memory_mib, labels=labels,
        gpus=[node_pb2.GpuInfo(index=g.index, uuid=g.uuid, name=g.name, model=g.model, memory_mib=g.memory_mib,
                               pci_bus_id=g.pci_bus_id, mig_enabled=g.mig_enabled, nvlink_island=g.nvlink_island)
              for g in inv.gpus])


def sample_pb(s: GpuSample, processes: bool = True) -> node_pb2.GpuSample:
    return node_pb2.GpuSample(
        index=s.index, uuid=s.uuid, gpu_util_pct=s.gpu_util_pct, memory_util_pct=s.memory_util_pct,
        memory_used_mib=s.memory_used_mib, temperature_c=s.temperature_c, power_mw=s.power_mw,
        sm_clock_mhz=s.sm_clock_mhz, throttle_reasons=s.throttle_reasons,
        ecc_volatile_corrected=s.ecc_volatile_corrected, ecc_volatile_uncorrected=s.ecc_volatile_uncorrected,
        ecc_aggregate_uncorrected=s.ecc_aggregate_uncorrected, retired_pages=s.retired_pages,
        energy_mj=s.energy_mj, lost=s.lost,
        processes=[node_pb2.ProcessInfo(pid=p.pid, used_memory_mib=p.used_memory_mib, name=p.name)
                   for p in s.processes] if processes else ())


def xid_pb(x: XidRecord) -> node_pb2.XidEvent:
    return node_pb2.XidEvent(gpu_index=x.gpu_index, xid=x.xid, at=_ts(x.at_s), message=x.message)


def frame_pb(f: Frame, node_name: str, processes: bool = True) -> node_pb2.TelemetryFrame:
    return node_pb2.TelemetryFrame(seq=f.seq, at=_ts(f.at_s), node_name=node_name,
                                   samples=[sample_pb(s, processes) for s in f.samples],
                                   xid_events=[xid_pb(x) for x in f.xids], dropped_frames=f.dropped_frames)
