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
(written atomically). SIGTERM / SIGINT stops them all.
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
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s fleet %(levelname)s %(name)s: %(message)s")

    from node_daemon.daemon import BackendChoice, DaemonConfig, NodeDaemon

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    daemons: list[NodeDaemon] = []
    t0 = time.monotonic()
    try:
        for i in range(a.first, a.first + a.count):
            if stop.is_set():
                return 1
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
    finally:
        # Stop them side by side (each stop waits on its own threads), then leave.
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(32) as ex:
            list(ex.map(lambda d: d.stop(grace_s=0.2, reason="fleet stopping"), daemons))
    return 0


if __name__ == "__main__":
    sys.exit(main())
