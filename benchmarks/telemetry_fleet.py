"""A fleet of real simulated node daemons in one process, for the transport benchmark.

    python benchmarks/telemetry_fleet.py --count 500 --first 0 --gpus 8 --out /tmp/fleet0.json

A 2-core machine cannot run 2,000 daemon processes, so this hosts ``--count``
real ``NodeDaemon`` objects in one Python process: each one the shipped daemon
code unchanged — its own simulated backend (seeded by its index), telemetry hub,
health view and its own gRPC ``NodeAgent`` server on its own loopback port —
standalone (no registration: the benchmark hands the addresses to the shard).
What is shared with the other daemons of the process is the interpreter (one
GIL) and the gRPC core; on a real fleet every daemon has a machine of its own.

When every daemon serves, ``--out`` receives ``{"addresses": {node: host:port}}``
(written atomically). SIGTERM / SIGINT ends the process at once (no graceful stop per daemon).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import signal
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--first", type=int, default=0, help="index of the first node (names fleet-NNNNN)")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--gpu-model", default="H100")
    ap.add_argument("--out", required=True)
    ap.add_argument("--sched-idle", action="store_true", help="run the daemons under SCHED_IDLE (Linux)")
    ap.add_argument("--switch-interval-s", type=float, default=0.05,
                    help="the interpreter's GIL switch interval for this process (Python's default: 0.005)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s fleet %(levelname)s %(name)s: %(message)s")

    if a.sched_idle:
        # Every thread made from here on inherits SCHED_IDLE: the daemons only get CPU that
        # nothing else wants, so thousands of their threads cannot starve the shard under test
        # (or anyone else's work on the machine). On a real fleet each daemon has its own node.
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))

    # Hundreds of daemons share this process's GIL. A thread waiting for the GIL wakes every
    # switch interval to ask for it, so with many daemon threads runnable at once the default
    # 5 ms turns into a storm of futex wake-ups (half the machine in the kernel at 2,000 hosted
    # daemons). Each daemon holds the GIL for microseconds between blocking calls, so a longer
    # interval costs them no latency. A hosting knob of this benchmark, not of the daemon.
    sys.setswitchinterval(a.switch_interval_s)

    from node_daemon.daemon import BackendChoice, DaemonConfig, NodeDaemon

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    daemons: list[NodeDaemon] = []
    t0 = time.monotonic()
    for i in range(a.first, a.first + a.count):
        if stop.is_set():
            os._exit(1)
        cfg = DaemonConfig(node_name=f"fleet-{i:05d}", listen="127.0.0.1:0", control_plane=None,
                           backend=BackendChoice.SIMULATED, gpus=a.gpus, gpu_model=a.gpu_model, seed=i,
                           shutdown_grace_s=0.5)
        daemons.append(NodeDaemon(cfg).start())
    out = pathlib.Path(a.out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"addresses": {d.config.node_name: d.address for d in daemons},
                               "start_s": round(time.monotonic() - t0, 2), "pid": os.getpid()}))
    os.replace(tmp, out)
    stop.wait()
    # A load generator: leave at once. Stopping hundreds of daemons gracefully side by side
    # is a CPU storm of its own on a small shared machine; the OS closes every socket.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
