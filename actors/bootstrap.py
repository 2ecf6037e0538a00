"""Bring the control plane up (and down): database, migrations, Ray, actors,
and, for a one-machine run, simulated node daemons.

    ControlPlane.start()
      1. database: embedded pgserver (or GPUAAS_DATABASE_URL), migrations as owner
      2. Ray: local, or the cluster at --ray-address
      3. actors (namespace gpuaas): node shards, allocation shards, ledger, placement (+ gRPC server)
      4. bootstrap tenant "system" with an admin token and a node token
      5. N node daemons (gpuaas-node-daemon, simulated backend) that register over gRPC
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psycopg
import ray

from actors import runtime
from gpuaas import auth
from gpuaas.config import ControlPlaneConfig
from ledger import db as dbmod
from ledger.migrate import apply_migrations

log = logging.getLogger("gpuaas.up")


@dataclasses.dataclass
class SimNodes:
    count: int = 0
    gpus_per_node: int = 8
    gpu_model: str = "H100"


def _free_port(host: str) -> int:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET) as s:
        s.bind((host.strip("[]"), 0))
        return s.getsockname()[1]


class ControlPlane:
    def __init__(self, *, config: ControlPlaneConfig, ray_address: str | None = None,
                 data_dir: pathlib.Path | None = None, sim: SimNodes | None = None, scratch_data: bool = False):
        """``scratch_data``: an embedded database in ``data_dir`` that is deleted when this process exits."""
        self.cfg = config
        self.ray_address = ray_address
        self.data_dir = data_dir
        self.scratch_data = scratch_data
        self.sim = sim or SimNodes()
        self.urls: dbmod.DatabaseUrls | None = None
        self.placement = None
        self.alloc_shards: list = []
        self.node_shards: list = []
        self.ledger = None
        self.address = ""
        self.admin_token = ""
        self.node_token = ""
        self.daemons: list[subprocess.Popen] = []
        self.daemon_by_name: dict[str, subprocess.Popen] = {}
        self.daemon_dir = pathlib.Path(tempfile.mkdtemp(prefix="gpuaas-nodes-"))
        self._owns_ray = False

    # ------------------------------------------------------------ start

    def start(self, *, wait_nodes_s: float = 60.0) -> "ControlPlane":
        t0 = time.perf_counter()
        self.urls = dbmod.resolve(self.data_dir, scratch=self.scratch_data)
        self._check_durable(self.urls.owner)
        applied = apply_migrations(self.urls.owner)
        self._check_durable(self.urls.app)  # the runtime role may carry settings of its own
        log.info("database ready (%s); %d migration(s) applied", "embedded" if self.urls.embedded else "external",
                 len(applied))
        self._seed()
        if not ray.is_initialized():
            if self.ray_address:
                ray.init(address=self.ray_address, namespace=runtime.NAMESPACE, log_to_driver=False)
            else:
                ray.init(namespace=runtime.NAMESPACE, include_dashboard=False, log_to_driver=False,
                         num_cpus=max(2, os.cpu_count() or 2))
                self._owns_ray = True
        self._start_actors()
        log.info("control plane up at %s in %.1fs", self.address, time.perf_counter() - t0)
        if self.sim.count:
            self.start_sim_nodes(self.sim.count, wait_s=wait_nodes_s)
        return self

    def _check_durable(self, url: str) -> None:
        """Refuse a database that would acknowledge commits it may lose, before anything is started
        on it (ControlPlaneConfig.allow_non_durable_database: warn and go on)."""
        problems = dbmod.durability_problems(url)
        if not problems:
            return
        if not self.cfg.allow_non_durable_database:
            raise dbmod.NonDurableDatabase(
                "refusing a database that may lose acknowledged commits: " + "; ".join(problems)
                + ". Turn the setting back on (ALTER SYSTEM, ALTER ROLE or ALTER DATABASE … RESET), or start "
                "with allow_non_durable_database (gpuaas up --allow-non-durable-database) for a throwaway database")
        for p in problems:
            log.warning("database not durable, started anyway (allow_non_durable_database): %s", p)

    def _seed(self) -> None:
        """System tenant + tokens for the operator and the node daemons; default prices."""
        with psycopg.connect(self.urls.owner, autocommit=True) as conn:
            auth.create_tenant(conn, "system", "gpuaas operators")
            with conn.transaction():
                _, self.admin_token = auth.create_token(conn, "system", ["admin", "placement"], ttl_s=7 * 24 * 3600)
                _, self.node_token = auth.create_token(conn, "system", ["node"], ttl_s=7 * 24 * 3600)
        try:
            from ledger import prices
            prices.ensure_default_prices(self.urls.owner)
        except ImportError:
            log.warning("ledger price book not available in this build")

    def _start_actors(self) -> None:
        from actors.hosts import AllocationShardActor, NodeShardActor, PlacementActor

        # A restarted placement actor must come back on the same address: resolve
        # port 0 to a concrete free port once, here, and pass it explicitly.
        host, _, port = self.cfg.listen.rpartition(":")
        if port == "0":
            self.cfg = dataclasses.replace(self.cfg, listen=f"{host}:{_free_port(host)}")

        ns = runtime.NAMESPACE
        app = self.urls.app
        for name in ([runtime.PLACEMENT, runtime.LEDGER]
                     + [runtime.alloc_shard_name(i) for i in range(self.cfg.allocation_shards)]
                     + [runtime.node_shard_name(i) for i in range(self.cfg.node_shards)]):
            try:
                ray.kill(ray.get_actor(name, namespace=ns), no_restart=True)
            except ValueError:
                pass
        self.node_shards = [NodeShardActor.options(name=runtime.node_shard_name(i), namespace=ns).remote(
            i, self.cfg.node_shards, app, self.cfg) for i in range(self.cfg.node_shards)]
        self.alloc_shards = [AllocationShardActor.options(name=runtime.alloc_shard_name(i), namespace=ns).remote(
            i, self.cfg.allocation_shards, app, self.cfg) for i in range(self.cfg.allocation_shards)]
        try:
            from actors.ledger_actor import LedgerActor
            self.ledger = LedgerActor.options(name=runtime.LEDGER, namespace=ns, max_restarts=-1).remote(
                app, meter_interval_s=self.cfg.meter_interval_s,
                # An interval closes only once the telemetry window covering its end has arrived.
                close_lag_s=max(2.0, self.cfg.usage_window_s + 1.0))
        except ImportError:
            log.warning("ledger actor not available in this build")
        self.placement = PlacementActor.options(name=runtime.PLACEMENT, namespace=ns).remote(
            app, self.urls.owner, self.cfg, self.alloc_shards, self.node_shards)
        self.address = ray.get(self.placement.address.remote(), timeout=120)
        ray.get([s.start.remote() for s in self.node_shards + self.alloc_shards], timeout=120)

    # ------------------------------------------------------------ simulated nodes

    def daemon_command(self, name: str, gpus: int, model: str, extra: list[str] | None = None) -> list[str]:
        exe = shutil.which("gpuaas-node-daemon") or ""
        base = [exe] if exe and os.access(exe, os.X_OK) else [sys.executable, "-m", "node_daemon.main"]
        return base + ["--name", name, "--listen", "127.0.0.1:0", "--control-plane", self.address,
                       "--backend", "simulated", "--gpus", str(gpus), "--gpu-model", model,
                       "--fault-dir", str(self.daemon_dir / name / "faults"),
                       "--port-file", str(self.daemon_dir / name / "port"),
                       # The simulated fleet ends with this process, even when it is killed before stop().
                       "--exit-with-pid", str(os.getpid())] + (extra or [])

    @property
    def metrics_address(self) -> str:
        """host:port of the placement actor's Prometheus endpoint ("" when off). Asked each time: a
        restarted placement actor with port 0 configured listens on a new port."""
        if self.placement is None:
            return ""
        return ray.get(self.placement.metrics_address.remote(), timeout=30)

    def start_daemon(self, name: str, gpus: int, model: str, extra: list[str] | None = None) -> subprocess.Popen:
        (self.daemon_dir / name / "faults").mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, GPUAAS_NODE_TOKEN=self.node_token)
        log_file = open(self.daemon_dir / name / "daemon.log", "ab")
        proc = subprocess.Popen(self.daemon_command(name, gpus, model, extra), env=env, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.daemons.append(proc)
        self.daemon_by_name[name] = proc
        return proc

    def start_sim_nodes(self, count: int, *, wait_s: float = 60.0, prefix: str = "sim-node") -> list[str]:
        names = [f"{prefix}-{i}" for i in range(count)]
        g = self.sim.gpus_per_node
        for i, n in enumerate(names):
            # A simulated node looks like a GPU server: 16 cores and 128 GiB per GPU, two nodes per rack.
            self.start_daemon(n, g, self.sim.gpu_model,
                              ["--cpu-milli", str(16000 * g), "--memory-mib", str(131072 * g),
                               "--labels", f"zone=sim-a,rack=rack-{i // 2}"])
        self.wait_nodes(names, wait_s)
        return names

    def wait_nodes(self, names: list[str], wait_s: float, state: str = "READY") -> None:
        deadline = time.monotonic() + wait_s
        with psycopg.connect(self.urls.app, autocommit=True) as conn:
            while True:
                rows = dict(conn.execute("SELECT node_id, state FROM control.nodes WHERE node_id = ANY(%s)",
                                         (names,)).fetchall())
                if all(rows.get(n) == state for n in names):
                    return
                dead = [self.daemon_by_name[n] for n in names
                        if n in self.daemon_by_name and self.daemon_by_name[n].poll() is not None]
                if dead:
                    logs = "".join((self.daemon_dir / n / "daemon.log").read_text(errors="replace")[-1500:]
                                   for n in names if (self.daemon_dir / n / "daemon.log").exists())
                    raise RuntimeError(f"a node daemon exited early (code {dead[0].returncode}):\n{logs}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nodes not {state} after {wait_s}s: {rows}")
                time.sleep(0.1)

    # ------------------------------------------------------------ stop

    def stop(self) -> None:
        for p in self.daemons:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.daemons:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        self.daemons.clear()
        if self.placement is not None:
            try:
                ray.get(self.placement.stop.remote(), timeout=10)
            except Exception:  # noqa: BLE001
                pass
        if self.ledger is not None:
            try:
                ray.get(self.ledger.stop.remote(), timeout=10)
            except Exception:  # noqa: BLE001
                pass
        for a in [self.placement, self.ledger] + self.alloc_shards + self.node_shards:
            if a is not None:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # noqa: BLE001
                    pass
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(self.daemon_dir, ignore_errors=True)
        if self.scratch_data and self.urls is not None and self.urls.embedded and self.data_dir is not None:
            dbmod.stop_embedded(self.data_dir)  # a scratch database lives as long as its control plane
