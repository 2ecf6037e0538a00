"""`gpuaas-node-daemon`: the per-node agent.

    gpuaas-node-daemon --name NODE --listen 127.0.0.1:0 --control-plane 127.0.0.1:50051 \
        --backend auto --gpus 8 --gpu-model H100 --labels zone=a,rack=r1 \
        --cpu-milli 64000 --memory-mib 524288 --fault-dir DIR --port-file PATH

SIGTERM / SIGINT: deregister, finish in-flight calls within --grace-s, exit 0.
A second SIGINT exits at once. SIGUSR1: look at --fault-dir now.
"""
from __future__ import annotations

import argparse
import logging
import os
import pathlib
import signal
import socket
import sys
import threading

from node_daemon.daemon import BackendChoice, DaemonConfig, NodeDaemon

log = logging.getLogger("gpuaas.node_daemon")


def _labels(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"label {part!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def _default_memory_mib() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    except (ValueError, OSError):
        return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpuaas-node-daemon", description="gpuaas per-node GPU agent (NodeAgent gRPC)")
    p.add_argument("--name", default=socket.gethostname(), help="node name (default: hostname)")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to serve NodeAgent on; port 0 picks a free one")
    p.add_argument("--advertise", default="", help="HOST:PORT the control plane dials (default: the bound address)")
    p.add_argument("--control-plane", default=os.environ.get("GPUAAS_CONTROL_PLANE", "127.0.0.1:50051"),
                   help="HOST:PORT of the control plane's NodeRegistry")
    p.add_argument("--no-register", action="store_true", help="run standalone, without a control plane")
    p.add_argument("--token", default=None, help="node token (default: env GPUAAS_NODE_TOKEN)")
    p.add_argument("--backend", choices=[b.value for b in BackendChoice], default="auto",
                   help="auto: NVML if it initializes, else simulated")
    p.add_argument("--gpus", type=int, default=8, help="simulated backend: number of GPUs (1..64)")
    p.add_argument("--gpu-model", default="H100", help="simulated backend: GPU model (H100, A100, L4, …)")
    p.add_argument("--nvlink-island-size", type=int, default=0,
                   help="simulated backend: GPUs per NVLink island (0 = all in one island)")
    p.add_argument("--seed", type=int, default=0, help="simulated backend: RNG seed")
    p.add_argument("--labels", type=_labels, default={}, help="node labels: zone=a,rack=r1")
    p.add_argument("--cpu-milli", type=int, default=(os.cpu_count() or 1) * 1000)
    p.add_argument("--memory-mib", type=int, default=_default_memory_mib())
    p.add_argument("--fault-dir", type=pathlib.Path, default=None,
                   help="directory watched for fault-injection JSON files (see node_daemon/faults.py)")
    p.add_argument("--port-file", type=pathlib.Path, default=None, help="write the bound HOST:PORT here")
    p.add_argument("--grace-s", type=float, default=5.0, help="shutdown grace for in-flight calls")
    p.add_argument("--cleanup-grace-s", type=float, default=5.0, help="SIGTERM → SIGKILL delay in Cleanup")
    p.add_argument("--reregister-after-s", type=float, default=10.0,
                   help="re-register when no telemetry consumer has been connected for this long")
    p.add_argument("--exit-with-pid", type=int, default=0,
                   help="shut down gracefully once this process is gone (a simulated fleet started by a "
                        "control plane on one machine must not outlive it)")
    p.add_argument("--log-level", default=os.environ.get("GPUAAS_LOG_LEVEL", "INFO"))
    return p


def config_from_args(a: argparse.Namespace) -> DaemonConfig:
    errors = []
    if not 1 <= a.gpus <= 64:
        errors.append("--gpus must be 1..64")
    if a.cpu_milli < 0 or a.memory_mib < 0:
        errors.append("--cpu-milli and --memory-mib must not be negative")
    if ":" not in a.listen:
        errors.append("--listen must be HOST:PORT")
    if a.nvlink_island_size < 0:
        errors.append("--nvlink-island-size must be >= 0")
    if errors:
        raise SystemExit("gpuaas-node-daemon: " + "; ".join(errors))
    return DaemonConfig(
        node_name=a.name, listen=a.listen, advertise_address=a.advertise,
        control_plane=None if a.no_register else a.control_plane,
        token=a.token if a.token is not None else os.environ.get("GPUAAS_NODE_TOKEN", ""),
        backend=BackendChoice(a.backend), gpus=a.gpus, gpu_model=a.gpu_model, island_size=a.nvlink_island_size,
        seed=a.seed, labels=a.labels, cpu_milli=a.cpu_milli, memory_mib=a.memory_mib, fault_dir=a.fault_dir,
        port_file=a.port_file, shutdown_grace_s=a.grace_s, cleanup_grace_s=a.cleanup_grace_s,
        reregister_after_s=a.reregister_after_s)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(a.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    cfg = config_from_args(a)
    try:
        daemon = NodeDaemon(cfg).start()
    except Exception as exc:  # noqa: BLE001 - say why, exit non-zero
        log.error("cannot start: %s", exc)
        return 2
    stop = threading.Event()
    signals = {"name": ""}

    def on_signal(signum, _frame):
        name = signal.Signals(signum).name
        if stop.is_set():
            # A repeated SIGTERM (process group + pid) changes nothing; a second Ctrl-C means "now".
            if signum == signal.SIGINT:
                log.warning("second SIGINT: exiting now")
                os._exit(1)
            return
        signals["name"] = name
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, lambda *_: daemon.faults.wake() if daemon.faults else None)
    while not stop.wait(0.5):
        if a.exit_with_pid and not _alive(a.exit_with_pid):
            log.info("process %d is gone: shutting down gracefully", a.exit_with_pid)
            daemon.stop(reason=f"process {a.exit_with_pid} gone")
            return 0
    log.info("%s received: shutting down gracefully", signals["name"])
    daemon.stop(reason=f"{signals['name']} received")
    return 0


if __name__ == "__main__":
    sys.exit(main())
