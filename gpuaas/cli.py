"""The `gpuaas` command.

    gpuaas up          start the control plane (and simulated nodes) in the foreground
    gpuaas demo        bring everything up, run a scripted workload, print a summary
    gpuaas migrate     apply database migrations
    gpuaas simulate    replay an openb trace through the placement engine
    gpuaas bench NAME  run benchmarks/NAME.py
    gpuaas analytics   capacity-planner reports and SQL over the DuckDB copy
    gpuaas admin       operator commands (nodes, allocations, tokens, ledger verify)
"""
from __future__ import annotations

import argparse
import logging
import os
import pathlib
import runpy
import signal
import sys
import threading

REPO = pathlib.Path(__file__).resolve().parent.parent


class CliError(Exception):
    """A failure the user can act on: printed as one line, exit code 1."""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _config(ns):
    from gpuaas.config import ControlPlaneConfig

    return ControlPlaneConfig(listen=ns.listen, policy=ns.policy, node_shards=ns.node_shards,
                              allocation_shards=ns.allocation_shards,
                              metrics_listen=getattr(ns, "metrics_listen", "127.0.0.1:0"),
                              allow_non_durable_database=getattr(ns, "allow_non_durable_database", False))


def cmd_up(ns) -> int:
    from actors.bootstrap import ControlPlane, SimNodes

    cp = ControlPlane(config=_config(ns), ray_address=ns.ray_address,
                      sim=SimNodes(ns.sim_nodes, ns.gpus_per_node, ns.gpu_model))
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        cp.start()
        print(f"gpuaas control plane listening on {cp.address}")
        if cp.metrics_address:
            print(f"  metrics: http://{cp.metrics_address}/metrics")
        print(f"  admin token (shown once): {cp.admin_token}")
        print(f"  simulated nodes: {ns.sim_nodes} × {ns.gpus_per_node} {ns.gpu_model}")
        print("  Ctrl-C to stop", flush=True)
        stop.wait()
        print("stopping…")
    finally:
        cp.stop()
    return 0


def cmd_demo(ns) -> int:
    from gpuaas import demo

    return demo.run(sim_nodes=ns.sim_nodes, gpus_per_node=ns.gpus_per_node, gpu_model=ns.gpu_model,
                    verbose=ns.verbose)


def cmd_migrate(ns) -> int:
    from ledger import db as dbmod
    from ledger.migrate import apply_migrations

    urls = dbmod.resolve()
    applied = apply_migrations(urls.owner)
    print(f"{len(applied)} migration(s) applied" + (": " + ", ".join(applied) if applied else ""))
    return 0


def cmd_simulate(ns, rest) -> int:
    from scheduler import replay

    return replay.main(rest)


def cmd_bench(ns, rest) -> int:
    script = REPO / "benchmarks" / f"{ns.name}.py"
    if not script.exists():
        names = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py"))
        raise CliError(f"no benchmark {ns.name!r}; choose from {', '.join(names)}")
    sys.argv = [str(script)] + rest
    runpy.run_path(str(script), run_name="__main__")
    return 0


def cmd_analytics(ns, rest) -> int:
    from ledger.analytics import cli as acli

    return acli.main(rest)


def _admin_client(ns):
    from gpuaas.client import Client

    token = ns.token or os.environ.get("GPUAAS_TOKEN")
    if not token:
        raise CliError("an admin token is needed: --token or GPUAAS_TOKEN (printed by `gpuaas up`)")
    return Client(ns.address, token)


def _health(address: str) -> int:
    """The control plane's gRPC health status, for a probe: prints it, 0 when SERVING (its database
    answers), 1 otherwise, including when nothing answers at ``address``."""
    from gpuaas.client import health_status

    status = health_status(address)
    print(f"{address}: {status}")
    return 0 if status == "SERVING" else 1


def cmd_admin(ns, rest) -> int:
    from gpuaas.client import state_name

    what = ns.what
    if what == ["ledger", "verify"]:
        from ledger import verify

        return verify.main(rest)
    if what == ["health"]:
        return _health(ns.address)
    with _admin_client(ns) as c:
        if what == ["nodes", "list"]:
            from gpuaas.v1 import common_pb2
            for n in c.list_nodes():
                gpus = " ".join(f"{g.index}:{common_pb2.GpuState.Name(g.state).removeprefix('GPU_STATE_')}"
                                for g in n.gpus)
                print(f"{n.node_id:20} {common_pb2.NodeState.Name(n.state).removeprefix('NODE_STATE_'):12} "
                      f"{n.address:22} {'sim' if n.simulated else 'nvml'}  {gpus}")
            return 0
        if len(what) == 4 and what[:2] == ["gpus", "clear"]:
            from gpuaas.v1 import common_pb2
            try:
                index = int(what[3])
            except ValueError:
                print(f"GPU index must be a number, got {what[3]!r}", file=sys.stderr)
                return 2
            st = c.clear_gpu(what[2], index, reason=ns.reason)
            g = next((g for g in st.gpus if g.index == index), None)
            print(f"{st.node_id}/{index}: {common_pb2.GpuState.Name(g.state).removeprefix('GPU_STATE_') if g else '?'}")
            return 0
        if len(what) == 3 and what[0] == "nodes" and what[1] in ("cordon", "uncordon", "drain", "clear"):
            from gpuaas.v1 import common_pb2
            st = c.node_action(what[1], what[2], reason=ns.reason)
            print(f"{st.node_id}: {common_pb2.NodeState.Name(st.state).removeprefix('NODE_STATE_')}")
            return 0
        if len(what) == 3 and what[:2] == ["allocations", "resolve"]:
            a = c.resolve(what[2], note=ns.reason)
            print(f"{a.allocation_id}: {state_name(a.state)}")
            return 0
        if len(what) == 3 and what[:2] == ["tenants", "create"]:
            c.create_tenant(what[2])
            print(f"tenant {what[2]} created")
            return 0
        if len(what) == 3 and what[:2] == ["tokens", "create"]:
            print(c.create_token(what[2], scopes=ns.scopes.split(",")))
            return 0
    raise CliError(f"unknown admin command: {' '.join(what)}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gpuaas", description="GPU-as-a-Service control plane")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def cp_args(p, sim_default: int):
        p.add_argument("--listen", default="127.0.0.1:50051")
        p.add_argument("--ray-address", default=None, help="join a Ray cluster instead of starting a local Ray")
        p.add_argument("--policy", default="default")
        p.add_argument("--node-shards", type=int, default=1)
        p.add_argument("--allocation-shards", type=int, default=2)
        p.add_argument("--sim-nodes", type=int, default=sim_default)
        p.add_argument("--gpus-per-node", type=int, default=8)
        p.add_argument("--gpu-model", default="H100")
        p.add_argument("--metrics-listen", default="127.0.0.1:9464",
                       help="Prometheus endpoint HOST:PORT (/metrics); empty to turn it off")
        p.add_argument("--allow-non-durable-database", action="store_true",
                       help="start even if the database may lose acknowledged commits (fsync, synchronous_commit "
                            "or full_page_writes off); for throwaway databases only")

    cp_args(sub.add_parser("up", help="run the control plane in the foreground"), 4)
    d = sub.add_parser("demo", help="run the end-to-end demo")
    d.add_argument("--sim-nodes", type=int, default=4)
    d.add_argument("--gpus-per-node", type=int, default=8)
    d.add_argument("--gpu-model", default="H100")
    sub.add_parser("migrate", help="apply database migrations")
    sub.add_parser("simulate", help="replay a trace (see `gpuaas simulate --help`)", add_help=False)
    b = sub.add_parser("bench", help="run a benchmark script")
    b.add_argument("name")
    sub.add_parser("analytics", help="reports and SQL over the analytics copy", add_help=False)
    a = sub.add_parser("admin", help="operator commands")
    a.add_argument("what", nargs="+", help="health | nodes list | nodes cordon|uncordon|drain|clear NODE"
                                          " | gpus clear NODE INDEX"
                                          " | allocations resolve ID"
                                          " | tenants create ID | tokens create TENANT | ledger verify")
    a.add_argument("--address", default=os.environ.get("GPUAAS_ADDRESS", "127.0.0.1:50051"))
    a.add_argument("--token", default=None)
    a.add_argument("--reason", default="")
    a.add_argument("--scopes", default="placement")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = build_parser()
    ns, rest = ap.parse_known_args(argv)
    _setup_logging(ns.verbose)
    passthrough = {"simulate": cmd_simulate, "bench": cmd_bench, "analytics": cmd_analytics, "admin": cmd_admin}
    try:
        if ns.cmd in passthrough:
            return passthrough[ns.cmd](ns, rest)
        if rest:
            ap.error(f"unrecognized arguments: {' '.join(rest)}")
        return {"up": cmd_up, "demo": cmd_demo, "migrate": cmd_migrate}[ns.cmd](ns)
    except CliError as exc:
        print(f"gpuaas: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - a readable line, not a stack trace
        import grpc
        if isinstance(exc, grpc.RpcError):
            print(f"gpuaas: {exc.code().name}: {exc.details()}", file=sys.stderr)
        else:
            print(f"gpuaas: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        if ns.verbose:
            raise
        return 1


if __name__ == "__main__":
    sys.exit(main())
