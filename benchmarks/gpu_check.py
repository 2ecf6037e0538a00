"""Real-GPU check of the node daemon's NVML backend. Exits non-zero if any check fails.

    python benchmarks/gpu_check.py --json results/gpu_check.json \
        [--record-fixture tests/node_daemon/fixtures/nvml_readings_recorded.json] [--gpu 0] [--load-s 15]

What it does, on a machine with an NVIDIA GPU (needs only the project's
dependencies; torch, if importable, generates the load):

 1. NVML initializes here (else: nothing to check, exit 1);
 2. starts `gpuaas-node-daemon --backend nvml --no-register` as a subprocess;
 3. GetInventory: real name, memory and UUID, cross-checked against NVML read directly;
 4. the standard gRPC health service answers SERVING; Health lists every GPU;
 5. streams telemetry at 200 ms while a matmul loop (torch) runs on one GPU,
    and checks that utilization and power rise above the idle baseline, energy
    grows, and the load's process shows up in the samples;
 6. Prepare an allocation on that GPU, start a process there, Cleanup: the
    daemon must find and end it and report it;
 7. records the raw NVML readings (usable as a translation-test fixture) and
    the daemon's CPU cost per GPU per sample;
 8. SIGTERM: the daemon exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

LOAD_SNIPPET = r"""
import sys, time
try:
    import torch
except ImportError as exc:
    print("NO_TORCH", exc, flush=True)
    sys.exit(3)
gpu, secs = int(sys.argv[1]), float(sys.argv[2])
dev = torch.device(f"cuda:{gpu}")
a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
torch.cuda.synchronize()
print("LOAD_READY", flush=True)
end = time.time() + secs
while time.time() < end:
    for _ in range(10):
        c = a @ b
    torch.cuda.synchronize()
print("LOAD_DONE", flush=True)
"""


class Report:
    def __init__(self):
        self.checks: list[dict] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append({"name": name, "ok": bool(ok), "detail": detail})
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)
        return ok

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c["ok"] for c in self.checks)


def _cpu_s(pid: int) -> float:
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _start_load(gpu: int, secs: float) -> subprocess.Popen | None:
    env = dict(os.environ, CUDA_DEVICE_ORDER="PCI_BUS_ID")
    p = subprocess.Popen([sys.executable, "-c", LOAD_SNIPPET, str(gpu), str(secs)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    line = p.stdout.readline().strip()
    if not line.startswith("LOAD_READY"):
        rest = line + p.stdout.read()[-500:] if p.poll() is not None else line
        p.kill()
        print(f"load generator did not start: {rest.strip()[:500]}", flush=True)
        return None
    return p


class Collector(threading.Thread):
    """Reads a telemetry stream into a list of (phase, frame) until stopped."""

    def __init__(self, stub, interval_ms: int):
        super().__init__(daemon=True)
        from gpuaas.v1 import node_pb2

        self.call = stub.StreamTelemetry(node_pb2.StreamTelemetryRequest(interval_ms=interval_ms))
        self.frames: list[tuple[str, float, object]] = []
        self.phase = "idle"
        self.error = ""

    def run(self):
        import grpc

        try:
            for f in self.call:
                self.frames.append((self.phase, time.monotonic(), f))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = f"{exc.code().name}: {exc.details()}"

    def stop(self):
        self.call.cancel()
        self.join(5)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, help="write the report here")
    ap.add_argument("--record-fixture", default=None, help="write the raw NVML readings here (translation fixture)")
    ap.add_argument("--gpu", type=int, default=0, help="GPU to load")
    ap.add_argument("--load-s", type=float, default=15.0)
    ap.add_argument("--idle-s", type=float, default=4.0)
    ap.add_argument("--interval-ms", type=int, default=200)
    a = ap.parse_args(argv)
    rep = Report()
    out: dict = {"checks": rep.checks}
    t_start = time.monotonic()
    try:
        _run(a, rep, out)
    except Exception as exc:  # noqa: BLE001 - report, then fail
        rep.check("gpu_check completed", False, f"{type(exc).__name__}: {exc}")
    out["ok"] = rep.ok
    out["elapsed_s"] = round(time.monotonic() - t_start, 1)
    from benchmarks._common import write_json

    write_json(a.json, out)
    print(f"gpu_check: {'ALL CHECKS PASSED' if rep.ok else 'FAILED'} "
          f"({sum(c['ok'] for c in rep.checks)}/{len(rep.checks)} in {out['elapsed_s']}s)", flush=True)
    return 0 if rep.ok else 1


def _run(a, rep: Report, out: dict) -> None:
    # 1. NVML here
    try:
        import pynvml as nv
        nv.nvmlInit()
    except Exception as exc:  # noqa: BLE001
        rep.check("NVML initializes", False, f"{exc} — this machine has no usable NVIDIA driver")
        return
    count = nv.nvmlDeviceGetCount()
    driver = nv.nvmlSystemGetDriverVersion()
    driver = driver.decode() if isinstance(driver, bytes) else driver
    rep.check("NVML initializes", count > 0, f"driver {driver}, {count} GPU(s)")
    if not 0 <= a.gpu < count:
        rep.check("chosen GPU exists", False, f"--gpu {a.gpu} but {count} GPU(s)")
        return
    h = nv.nvmlDeviceGetHandleByIndex(a.gpu)
    direct = {"name": nv.nvmlDeviceGetName(h), "uuid": nv.nvmlDeviceGetUUID(h),
              "memory_mib": nv.nvmlDeviceGetMemoryInfo(h).total // 2**20}
    direct = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in direct.items()}

    # 2. the daemon, as an operator starts it
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from gpuaas.v1 import node_pb2, node_pb2_grpc

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="gpu-check-"))
    log_path = tmp / "daemon.log"
    port_file = tmp / "port"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    daemon = subprocess.Popen([sys.executable, "-m", "node_daemon.main", "--name", "gpu-check", "--no-register",
                               "--backend", "nvml", "--listen", "127.0.0.1:0", "--port-file", str(port_file),
                               "--cleanup-grace-s", "3"],
                              stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, env=env, cwd=REPO)
    loads: list[subprocess.Popen] = []
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() and daemon.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if not rep.check("daemon starts on the NVML backend", port_file.exists(),
                         port_file.read_text().strip() if port_file.exists() else log_path.read_text()[-1500:]):
            return
        addr = port_file.read_text().strip()
        ch = grpc.insecure_channel(addr)
        stub = node_pb2_grpc.NodeAgentStub(ch)

        # 3. inventory
        inv = stub.GetInventory(node_pb2.GetInventoryRequest(), timeout=10)
        g = inv.gpus[a.gpu] if len(inv.gpus) > a.gpu else None
        out["inventory"] = {"backend": inv.backend, "simulated": inv.simulated, "driver_version": inv.driver_version,
                            "nvml_version": inv.nvml_version,
                            "gpus": [{"index": x.index, "name": x.name, "model": x.model, "uuid": x.uuid,
                                      "memory_mib": x.memory_mib, "pci_bus_id": x.pci_bus_id,
                                      "mig_enabled": x.mig_enabled, "nvlink_island": x.nvlink_island}
                                     for x in inv.gpus]}
        rep.check("inventory is real (backend nvml, not simulated)", inv.backend == "nvml" and not inv.simulated,
                  f"backend={inv.backend} simulated={inv.simulated} driver={inv.driver_version}")
        rep.check("inventory GPU count matches NVML", len(inv.gpus) == count, f"{len(inv.gpus)} vs {count}")
        rep.check("inventory name/UUID/memory match NVML",
                  g is not None and (g.name, g.uuid, g.memory_mib) == (direct["name"], direct["uuid"],
                                                                       direct["memory_mib"]),
                  f"daemon: {g.name if g else None!r} {g.uuid if g else None} {g.memory_mib if g else None} MiB; "
                  f"NVML: {direct['name']!r} {direct['uuid']} {direct['memory_mib']} MiB; model {g.model if g else None}")

        # 4. health
        hs = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="gpuaas.v1.NodeAgent"),
                                                  timeout=5)
        hr = stub.Health(node_pb2.HealthRequest(), timeout=5)
        rep.check("grpc.health.v1 SERVING and Health lists every GPU",
                  hs.status == health_pb2.HealthCheckResponse.SERVING and len(hr.gpus) == count,
                  f"healthy={hr.healthy} " + ", ".join(f"{x.index}:{x.state}{' ' + x.reason if x.reason else ''}"
                                                       for x in hr.gpus))
        log_text = log_path.read_text()
        rep.check("XID event set registered", "XID events: watching" in log_text,
                  next((ln for ln in log_text.splitlines() if "XID events" in ln), "no XID event line in the log"))

        # 5. telemetry under load
        col = Collector(stub, a.interval_ms)
        cpu0, t0 = _cpu_s(daemon.pid), time.monotonic()
        col.start()
        time.sleep(a.idle_s)
        col.phase = "load"
        load = _start_load(a.gpu, a.load_s)
        if load is not None:
            loads.append(load)
            time.sleep(min(a.load_s, 4.0))
            try:  # raw readings under load: the fixture for the translation test
                from node_daemon.nvml_backend import NvmlBackend
                be = NvmlBackend.open()
                out["raw_readings"] = be.readings()
                be.close()
            except Exception as exc:  # noqa: BLE001
                out["raw_readings_error"] = str(exc)
            load.wait(a.load_s + 30)
        else:
            time.sleep(2)
        col.phase = "cool"
        time.sleep(2)
        col.stop()
        cpu1, t1 = _cpu_s(daemon.pid), time.monotonic()
        frames = col.frames
        rep.check("telemetry stream delivered frames", len(frames) >= (t1 - t0) * 1000 / a.interval_ms * 0.7 and
                  not col.error, f"{len(frames)} frames in {t1 - t0:.1f}s{'; ' + col.error if col.error else ''}")
        series = [(ph, round(ts - t0, 2), f.samples[a.gpu]) for ph, ts, f in frames if len(f.samples) > a.gpu]
        out["timeline"] = [{"phase": ph, "t_s": t, "gpu_util_pct": s.gpu_util_pct, "power_w": s.power_mw / 1000,
                            "temperature_c": s.temperature_c, "memory_used_mib": s.memory_used_mib,
                            "sm_clock_mhz": s.sm_clock_mhz, "energy_mj": s.energy_mj,
                            "throttle_reasons": s.throttle_reasons, "processes": len(s.processes)}
                           for ph, t, s in series]
        idle = [s for ph, _, s in series if ph == "idle"]
        busy = [s for ph, _, s in series if ph == "load"]
        if load is None:
            rep.check("utilization rises under load", False,
                      "no load generator available (torch is not importable or CUDA failed); cannot show a rise")
            rep.check("power rises under load", False, "no load generator available")
        else:
            u_idle = statistics.median(s.gpu_util_pct for s in idle) if idle else 0
            u_max = max((s.gpu_util_pct for s in busy), default=0)
            p_idle = statistics.median(s.power_mw for s in idle) / 1000 if idle else 0
            p_busy = statistics.median(sorted(s.power_mw for s in busy)[len(busy) // 2:]) / 1000 if busy else 0
            rep.check("utilization rises under load", u_max >= 50 and u_max >= u_idle + 30,
                      f"idle median {u_idle}% → load max {u_max}%")
            rep.check("power rises under load", p_busy >= p_idle * 1.3 and p_busy > p_idle + 20,
                      f"idle median {p_idle:.0f} W → load upper-half median {p_busy:.0f} W")
            pids = {p.pid for s in busy for p in s.processes}
            rep.check("the load's process appears in the samples", load.pid in pids,
                      f"load pid {load.pid}; seen {sorted(pids)[:8]}")
        energies = [s.energy_mj for _, _, s in series]
        rep.check("energy counter grows", len(energies) > 1 and energies[-1] > energies[0] and
                  all(b >= a_ for a_, b in zip(energies, energies[1:])),
                  f"{energies[0] if energies else 0} → {energies[-1] if energies else 0} mJ")
        n_samples = len(frames) * count
        cpu_s = cpu1 - cpu0
        out["daemon_cpu"] = {"cpu_s": round(cpu_s, 3), "wall_s": round(t1 - t0, 2), "frames": len(frames),
                             "gpus": count, "interval_ms": a.interval_ms,
                             "cpu_us_per_gpu_sample": round(cpu_s / n_samples * 1e6, 1) if n_samples else None}
        print(f"daemon CPU: {out['daemon_cpu']}", flush=True)

        # 6. Prepare, a leftover process, Cleanup ends it
        prep = stub.Prepare(node_pb2.PrepareRequest(allocation_id="gpu-check-1", gpu_indices=[a.gpu],
                                                    tenant_id="gpu-check"), timeout=10)
        rep.check("Prepare answers CUDA_VISIBLE_DEVICES", prep.cuda_visible_devices == str(a.gpu),
                  prep.cuda_visible_devices)
        left = _start_load(a.gpu, 300)
        if left is None:
            rep.check("Cleanup ends leftover processes", False, "no load generator to leave a process behind")
        else:
            loads.append(left)
            cl = stub.Cleanup(node_pb2.CleanupRequest(allocation_id="gpu-check-1"), timeout=30)
            try:
                left.wait(10)
            except subprocess.TimeoutExpired:
                pass
            rep.check("Cleanup ends leftover processes", cl.processes_ended >= 1 and left.poll() is not None,
                      f"processes_ended={cl.processes_ended} ({cl.message}); leftover exit={left.poll()}")

        # 8. graceful stop
        daemon.send_signal(signal.SIGTERM)
        try:
            rc = daemon.wait(20)
        except subprocess.TimeoutExpired:
            rc = None
        rep.check("SIGTERM: daemon exits 0", rc == 0, f"exit {rc}")
    finally:
        for p in loads:
            if p.poll() is None:
                p.kill()
        if daemon.poll() is None:
            daemon.kill()
        out["daemon_log_tail"] = log_path.read_text(errors="replace")[-4000:] if log_path.exists() else ""
        nv.nvmlShutdown()
    if a.record_fixture and out.get("raw_readings"):
        p = pathlib.Path(a.record_fixture)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(out["raw_readings"], indent=1, default=str) + "\n")
        print(f"recorded NVML readings fixture: {p}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
