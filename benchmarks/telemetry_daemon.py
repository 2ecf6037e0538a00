"""Daemon-side telemetry cost: CPU seconds the node daemon spends per GPU per sample.

    python benchmarks/telemetry_daemon.py --json results/telemetry_daemon.json \
        [--backend simulated|nvml] [--gpus 8] [--interval-ms 100] [--streams 1] [--seconds 10]

Starts a real `gpuaas-node-daemon --no-register` subprocess, opens `--streams`
telemetry streams at `--interval-ms`, reads them for `--seconds`, and divides
the daemon process's CPU time (per thread, /proc/PID/task/*/schedstat, ns) by the GPU samples it
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


def _thread_cpu_ns(pid: int) -> dict[int, int]:
    """CPU time (ns) of each live thread of ``pid``, from /proc/PID/task/TID/schedstat
    (nanosecond resolution; /proc/PID/stat counts 10 ms ticks, too coarse at 1 Hz)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = int(open(f"/proc/{pid}/task/{tid}/schedstat").read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # the thread ended meanwhile
    return out


class CpuMeter:
    """CPU seconds a process spent since the mark: per-thread deltas (threads born meanwhile count
    from zero; a thread that ended meanwhile is lost, which this benchmark's threads do not do)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.mark()

    def mark(self) -> None:
        self._t0 = _thread_cpu_ns(self.pid)

    def seconds(self) -> float:
        now = _thread_cpu_ns(self.pid)
        return sum(ns - self._t0.get(tid, 0) for tid, ns in now.items()) / 1e9


def measure(*, backend: str = "simulated", gpus: int = 8, interval_ms: int = 100, streams: int = 1,
            seconds: float = 10.0) -> dict:
    """Start a real daemon subprocess, measure idle then streaming CPU; the result dict (see the module doc)."""
    import grpc
    from gpuaas.v1 import node_pb2, node_pb2_grpc

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="telemetry-daemon-"))
    port_file = tmp / "port"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "node_daemon.main", "--name", "bench", "--no-register",
                             "--backend", backend, "--gpus", str(gpus), "--port-file", str(port_file),
                             "--log-level", "WARNING"], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=open(tmp / "daemon.log", "wb"))
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the daemon did not start: " + (tmp / "daemon.log").read_text()[-2000:])
            time.sleep(0.05)
        addr = port_file.read_text().strip()
        channel = grpc.insecure_channel(addr)
        stub = node_pb2_grpc.NodeAgentStub(channel)
        gpus = len(stub.GetInventory(node_pb2.GetInventoryRequest(), timeout=10).gpus)
        time.sleep(1.0)  # let start-up settle

        meter = CpuMeter(proc.pid)
        t0 = time.monotonic()
        time.sleep(seconds)
        idle_cpu_s, idle_wall_s = meter.seconds(), time.monotonic() - t0

        counts = [0] * streams
        calls = [stub.StreamTelemetry(node_pb2.StreamTelemetryRequest(interval_ms=interval_ms))
                 for _ in range(streams)]

        def read(i):
            try:
                for _ in calls[i]:
                    counts[i] += 1
            except grpc.RpcError:
                pass

        threads = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(streams)]
        meter.mark()
        t0 = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(seconds)
        cpu_s, wall_s = meter.seconds(), time.monotonic() - t0
        frames = sum(counts)
        for c in calls:
            c.cancel()
        channel.close()
        busy_cpu_s = max(0.0, cpu_s - idle_cpu_s * wall_s / idle_wall_s)
        samples = frames * gpus
        return {
            "backend": backend, "gpus": gpus, "interval_ms": interval_ms, "streams": streams,
            "seconds": round(wall_s, 2), "frames": frames, "frames_per_s": round(frames / wall_s, 1),
            "gpu_samples": samples, "daemon_cpu_s": round(cpu_s, 3), "idle_cpu_s": round(idle_cpu_s, 3),
            "idle_cpu_pct": round(100 * idle_cpu_s / idle_wall_s, 2),
            "cpu_us_per_gpu_sample": round(busy_cpu_s / samples * 1e6, 1) if samples else None,
            "cpu_us_per_gpu_sample_gross": round(cpu_s / samples * 1e6, 1) if samples else None,
            "cpu_pct_while_streaming": round(100 * cpu_s / wall_s, 2),
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def describe(r: dict) -> str:
    return (f"node daemon telemetry cost ({r['backend']}, {r['gpus']} GPUs, {r['streams']} stream(s) @ "
            f"{r['interval_ms']} ms): {r['cpu_us_per_gpu_sample']} µs CPU per GPU sample "
            f"(gross {r['cpu_us_per_gpu_sample_gross']}), {r['frames_per_s']} frames/s, idle {r['idle_cpu_pct']}% CPU")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--backend", default="simulated", choices=["simulated", "nvml"])
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--interval-ms", type=int, default=100)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=10.0)
    a = ap.parse_args(argv)
    try:
        result = measure(backend=a.backend, gpus=a.gpus, interval_ms=a.interval_ms, streams=a.streams,
                         seconds=a.seconds)
    except RuntimeError as exc:
        print(exc)
        return 1
    print(describe(result))
    write_json(a.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
