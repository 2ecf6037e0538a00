"""Daemon-side telemetry cost: CPU seconds the node daemon spends per GPU per sample.

    python benchmarks/telemetry_daemon.py --json results/telemetry_daemon.json \
        [--backend simulated|nvml] [--gpus 8] [--interval-ms 100] [--streams 1] [--seconds 10]

Starts a real `gpuaas-node-daemon --no-register` subprocess, opens `--streams`
telemetry streams at `--interval-ms`, reads them for `--seconds`, and divides
the daemon process's CPU time (user + system, from /proc) by the GPU samples it
delivered. An idle run (no stream) of the same length is subtracted, so the
figure is the cost of producing and sending telemetry, not of the daemon
existing. Fields: `cpu_us_per_gpu_sample`, `idle_cpu_pct`, `frames_per_s`.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._common import write_json  # noqa: E402


def _cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--backend", default="simulated", choices=["simulated", "nvml"])
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--interval-ms", type=int, default=100)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=10.0)
    a = ap.parse_args(argv)

    import grpc
    from gpuaas.v1 import node_pb2, node_pb2_grpc

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="telemetry-daemon-"))
    port_file = tmp / "port"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "node_daemon.main", "--name", "bench", "--no-register",
                             "--backend", a.backend, "--gpus", str(a.gpus), "--port-file", str(port_file),
                             "--log-level", "WARNING"], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=open(tmp / "daemon.log", "wb"))
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                print((tmp / "daemon.log").read_text()[-2000:])
                return 1
            time.sleep(0.05)
        addr = port_file.read_text().strip()
        stub = node_pb2_grpc.NodeAgentStub(grpc.insecure_channel(addr))
        gpus = len(stub.GetInventory(node_pb2.GetInventoryRequest(), timeout=10).gpus)
        time.sleep(1.0)  # let start-up settle

        c0, t0 = _cpu_s(proc.pid), time.monotonic()
        time.sleep(a.seconds)
        idle_cpu_s, idle_wall_s = _cpu_s(proc.pid) - c0, time.monotonic() - t0

        counts = [0] * a.streams
        calls = [stub.StreamTelemetry(node_pb2.StreamTelemetryRequest(interval_ms=a.interval_ms))
                 for _ in range(a.streams)]

        def read(i):
            try:
                for _ in calls[i]:
                    counts[i] += 1
            except grpc.RpcError:
                pass

        threads = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(a.streams)]
        c0, t0 = _cpu_s(proc.pid), time.monotonic()
        for t in threads:
            t.start()
        time.sleep(a.seconds)
        cpu_s, wall_s = _cpu_s(proc.pid) - c0, time.monotonic() - t0
        frames = sum(counts)
        for c in calls:
            c.cancel()
        busy_cpu_s = max(0.0, cpu_s - idle_cpu_s * wall_s / idle_wall_s)
        samples = frames * gpus
        result = {
            "backend": a.backend, "gpus": gpus, "interval_ms": a.interval_ms, "streams": a.streams,
            "seconds": round(wall_s, 2), "frames": frames, "frames_per_s": round(frames / wall_s, 1),
            "gpu_samples": samples, "daemon_cpu_s": round(cpu_s, 3), "idle_cpu_s": round(idle_cpu_s, 3),
            "idle_cpu_pct": round(100 * idle_cpu_s / idle_wall_s, 2),
            "cpu_us_per_gpu_sample": round(busy_cpu_s / samples * 1e6, 1) if samples else None,
            "cpu_us_per_gpu_sample_gross": round(cpu_s / samples * 1e6, 1) if samples else None,
            "cpu_pct_while_streaming": round(100 * cpu_s / wall_s, 2),
        }
        print(f"node daemon telemetry cost ({a.backend}, {gpus} GPUs, {a.streams} stream(s) @ {a.interval_ms} ms): "
              f"{result['cpu_us_per_gpu_sample']} µs CPU per GPU sample "
              f"(gross {result['cpu_us_per_gpu_sample_gross']}), {result['frames_per_s']} frames/s, "
              f"idle {result['idle_cpu_pct']}% CPU")
        write_json(a.json, result)
        return 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
