"""NodeDaemon: wires the backend, health view, telemetry hub, allocations, the
gRPC server, registration and fault injection; explicit start() / stop().

    DaemonConfig ──► open_backend (auto: NVML, else SIMULATED + a log line)
                         │
                         ├─► HealthView ◄── TelemetryHub (sampler, XID poller)
                         ├─► AllocationTable (Prepare / Cleanup)
                         ├─► gRPC server: NodeAgent + grpc.health.v1
                         ├─► Registrar ──► control plane NodeRegistry
                         └─► FaultWatcher (--fault-dir)
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import os
import pathlib
import socket
import threading
import time

from node_daemon import convert
from node_daemon.allocations import AllocationTable
from node_daemon.backend import GpuBackend, Inventory
from node_daemon.faults import FaultWatcher
from node_daemon.health import HealthView
from node_daemon.registration import Registrar, RegistrationConfig
from node_daemon.server import build_server
from node_daemon.sim_backend import SimulatedBackend
from node_daemon.telemetry import TelemetryHub

log = logging.getLogger("gpuaas.node_daemon")


class BackendChoice(enum.Enum):
    AUTO = "auto"
    NVML = "nvml"
    SIMULATED = "simulated"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DaemonConfig:
    node_name: str
    listen: str = "127.0.0.1:0"
    # Address the control plane dials; default: the bound address (hostname if listening on all interfaces).
    advertise_address: str = ""
    control_plane: str | None = "127.0.0.1:50051"  # None: standalone, no registration
    token: str = ""
    backend: BackendChoice = BackendChoice.AUTO
    gpus: int = 8
    gpu_model: str = "H100"
    # GPUs per NVLink island on the simulated backend; 0 = all GPUs in one island.
    island_size: int = 0
    seed: int = 0
    labels: dict = dataclasses.field(default_factory=dict)
    cpu_milli: int = 0
    memory_mib: int = 0
    fault_dir: pathlib.Path | None = None
    port_file: pathlib.Path | None = None
    cleanup_grace_s: float = 5.0
    shutdown_grace_s: float = 5.0
    reregister_after_s: float = 10.0
    backoff_base_s: float = 0.2
    backoff_max_s: float = 5.0


def open_backend(cfg: DaemonConfig, *, nvml_module=None) -> GpuBackend:
    """The backend the config asks for. AUTO: NVML when it initializes and sees a GPU,
    else the simulated backend, saying so in the log."""
    if cfg.backend is not BackendChoice.SIMULATED:
        from node_daemon.nvml_backend import NvmlBackend, NvmlUnavailable
        try:
            backend = NvmlBackend.open(nvml_module=nvml_module)
            log.info("NVML backend: driver %s, %d GPU(s)", backend.inventory().driver_version,
                     len(backend.inventory().gpus))
            return backend
        except NvmlUnavailable as exc:
            if cfg.backend is BackendChoice.NVML:
                raise
            log.warning("NVML unavailable (%s); using the SIMULATED backend: %d x %s", exc, cfg.gpus, cfg.gpu_model)
    else:
        log.info("SIMULATED backend forced by --backend simulated: %d x %s", cfg.gpus, cfg.gpu_model)
    return SimulatedBackend(gpus=cfg.gpus, model=cfg.gpu_model, island_size=cfg.island_size, seed=cfg.seed,
                            node_name=cfg.node_name)


class NodeDaemon:
    def __init__(self, config: DaemonConfig, *, backend: GpuBackend | None = None, nvml_module=None):
        self.config = config
        self.backend = backend or open_backend(config, nvml_module=nvml_module)
        self.inventory: Inventory = self.backend.inventory()
        indices = [g.index for g in self.inventory.gpus]
        self.health = HealthView(indices)
        self.hub = TelemetryHub(self.backend, self.health)
        self.allocations = AllocationTable(self.backend, self.health, indices)
        self.hostname = socket.gethostname()
        self.closing = False
        from node_daemon.faults import CallFaults
        self.call_faults = CallFaults()
        self.server = None
        self.servicer = None
        self.port = 0
        self.address = ""
        self.registrar: Registrar | None = None
        self.faults: FaultWatcher | None = None
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    @property
    def sim_backend(self) -> SimulatedBackend | None:
        return self.backend if isinstance(self.backend, SimulatedBackend) else None

    def inventory_pb(self):
        c = self.config
        return convert.inventory_pb(self.inventory, node_name=c.node_name, hostname=self.hostname,
                                    cpu_milli=c.cpu_milli, memory_mib=c.memory_mib, labels=dict(c.labels))

    # ------------------------------------------------------------ start / stop

    def start(self) -> "NodeDaemon":
        c = self.config
        self.hub.start()
        self.server, self.port, self.servicer, self.health_servicer = build_server(self, c.listen)
        self.server.start()
        host = c.listen.rsplit(":", 1)[0].strip("[]")
        if c.advertise_address:
            self.address = c.advertise_address
        else:
            if host in ("", "0.0.0.0", "::"):
                host = self.hostname
            self.address = f"{host}:{self.port}"
        inv = self.inventory
        log.info("node %s serving NodeAgent on %s (backend %s%s, %d GPU(s) %s, driver %s)", c.node_name,
                 self.address, inv.backend.value, ", SIMULATED" if inv.simulated else "", len(inv.gpus),
                 ",".join(sorted({g.model for g in inv.gpus})), inv.driver_version)
        if c.port_file:
            _write_atomic(pathlib.Path(c.port_file), self.address + "\n")
        if c.fault_dir:
            self.faults = FaultWatcher(self, pathlib.Path(c.fault_dir))
            self.faults.start()
        if c.control_plane:
            self.registrar = Registrar(self, RegistrationConfig(
                control_plane=c.control_plane, token=c.token, backoff_base_s=c.backoff_base_s,
                backoff_max_s=c.backoff_max_s, reregister_after_s=c.reregister_after_s), self.address)
            self.registrar.start()
        else:
            log.info("standalone (--no-register): not registering with a control plane")
        return self

    def stop(self, *, grace_s: float | None = None, reason: str = "daemon stopping") -> None:
        """Graceful: stop advertising, deregister, let in-flight calls finish within grace, release the GPUs."""
        with self._stop_lock:
            if self.closing:
                self._stopped.wait(30)
                return
            self.closing = True
        grace_s = self.config.shutdown_grace_s if grace_s is None else grace_s
        t0 = time.monotonic()
        log.info("stopping (%s; grace %.1fs)", reason, grace_s)
        try:
            if self.server is not None:
                self.health_servicer.enter_graceful_shutdown()
                self.servicer.close_streams()
            if self.registrar is not None:
                self.registrar.stop(deregister=True, reason=reason)
            if self.faults is not None:
                self.faults.stop()
            if self.server is not None:
                self.server.stop(grace_s).wait(grace_s + 1)
                self.servicer.close_pool()
            self.hub.stop()
            self.backend.close()
            if self.config.port_file:
                pathlib.Path(self.config.port_file).unlink(missing_ok=True)
        finally:
            self._stopped.set()
        log.info("stopped in %.2fs", time.monotonic() - t0)

    def wait(self, timeout_s: float | None = None) -> bool:
        return self._stopped.wait(timeout_s)


def _write_atomic(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
