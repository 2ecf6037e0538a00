"""Registration with the control plane's NodeRegistry.

    start ──► Register(inventory, agent_address)  ── fails ──► sleep U(0, min(5 s, 0.2 s·2^n)), again
                 │ ok: clean up orphaned_allocation_ids
                 ▼
             registered ── no telemetry consumer for reregister_after_s ──► Register again
                 │
    SIGTERM ──► Deregister(node_id, reason) (bounded wait), then the server stops

How a control-plane restart is detected: the control plane's node shard holds a
telemetry stream open to every node it watches (the stream is the heartbeat).
When no stream has been open for `reregister_after_s` since the last
registration, the control plane has lost this node (restarted without it, or
declared it OFFLINE and stopped watching), so the daemon registers again, with
backoff, until it succeeds. A periodic blind re-Register is not used: on the
control side each Register rewrites the node row and restarts its telemetry
consumer, so it is not cheap, and it is refused for CORDONED/DRAINING nodes.

While the daemon is frozen (fault injection) the loop is paused too: a frozen
daemon does nothing on its own.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from typing import TYPE_CHECKING

import grpc

from gpuaas.errors import GpuaasError
from gpuaas.v1 import node_pb2, node_pb2_grpc

if TYPE_CHECKING:
    from node_daemon.daemon import NodeDaemon

log = logging.getLogger("gpuaas.node_daemon.registration")

# Codes that will not fix themselves by retrying soon: retry at the cap and say so loudly.
_PERMANENT = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
              grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.UNIMPLEMENTED}
ORPHANS_MAX = 10_000


@dataclasses.dataclass(frozen=True, kw_only=True)
class RegistrationConfig:
    control_plane: str
    token: str = ""
    backoff_base_s: float = 0.2
    backoff_max_s: float = 5.0
    rpc_timeout_s: float = 5.0
    deregister_timeout_s: float = 2.0
    reregister_after_s: float = 10.0
    check_interval_s: float = 0.25


def backoff_s(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: U(0, min(max, base·2^(attempt-1)))."""
    return rng.uniform(0, min(max_s, base_s * (2 ** max(0, min(attempt, 32) - 1))))


class Registrar:
    def __init__(self, daemon: "NodeDaemon", cfg: RegistrationConfig, agent_address: str,
                 rng: random.Random | None = None):
        self.daemon, self.cfg, self.agent_address = daemon, cfg, agent_address
        self.rng = rng or random.Random()
        self._channel = grpc.insecure_channel(cfg.control_plane, options=[
            ("grpc.initial_reconnect_backoff_ms", int(cfg.backoff_base_s * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(cfg.backoff_base_s * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(cfg.backoff_max_s * 1000))])
        self._stub = node_pb2_grpc.NodeRegistryStub(self._channel)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.registered = threading.Event()
        self.node_id = ""
        self.telemetry_interval_ms = 0
        self.registrations = 0
        self.attempts = 0
        self.last_error = ""
        self._registered_mono = 0.0
        if not cfg.token:
            log.warning("no node token (--token / GPUAAS_NODE_TOKEN): the control plane will refuse to register us")

    def _metadata(self):
        return [("authorization", f"Bearer {self.cfg.token}")] if self.cfg.token else []

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="registrar", daemon=True)
        self._thread.start()

    def stop(self, *, deregister: bool = True, reason: str = "daemon stopping") -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.cfg.rpc_timeout_s + 1)
        if deregister and self.registered.is_set() and self.node_id:
            try:
                self._stub.Deregister(node_pb2.DeregisterNodeRequest(node_id=self.node_id, reason=reason),
                                      timeout=self.cfg.deregister_timeout_s, metadata=self._metadata())
                log.info("deregistered node %s (%s)", self.node_id, reason)
            except grpc.RpcError as exc:
                log.warning("deregister failed (%s: %s); the control plane will notice the silence",
                            exc.code().name, exc.details())
        self._channel.close()

    # ------------------------------------------------------------ loop

    def _loop(self) -> None:
        attempt = 0
        need = True
        hub = self.daemon.hub
        while not self._stop.is_set():
            if hub.frozen:
                self._stop.wait(0.1)
                continue
            if need:
                self.attempts += 1
                try:
                    resp = self._stub.Register(node_pb2.RegisterNodeRequest(
                        inventory=self.daemon.inventory_pb(), agent_address=self.agent_address),
                        timeout=self.cfg.rpc_timeout_s, metadata=self._metadata())
                except grpc.RpcError as exc:
                    attempt += 1
                    code = exc.code()
                    self.last_error = f"{code.name}: {exc.details()}"
                    if code in _PERMANENT:
                        delay = self.cfg.backoff_max_s
                        log.error("register refused by %s (%s); retrying in %.1fs", self.cfg.control_plane,
                                  self.last_error, delay)
                    else:
                        delay = backoff_s(attempt, self.cfg.backoff_base_s, self.cfg.backoff_max_s, self.rng)
                        log.log(logging.WARNING if attempt <= 3 or attempt % 20 == 0 else logging.DEBUG,
                                "register with %s failed (attempt %d, %s); retrying in %.2fs",
                                self.cfg.control_plane, attempt, self.last_error, delay)
                    self._stop.wait(delay)
                    continue
                attempt, need = 0, False
                self._on_registered(resp)
                continue
            idle_s = time.monotonic() - max(hub.last_stream_change_mono, self._registered_mono)
            if hub.streams_active == 0 and idle_s > self.cfg.reregister_after_s:
                log.warning("no telemetry consumer for %.1fs: the control plane lost this node; re-registering",
                            idle_s)
                need = True
                continue
            self._stop.wait(self.cfg.check_interval_s)

    def _on_registered(self, resp) -> None:
        self.node_id = resp.node_id or self.daemon.config.node_name
        self.telemetry_interval_ms = resp.telemetry_interval_ms
        self.registrations += 1
        self._registered_mono = time.monotonic()
        self.last_error = ""
        self.registered.set()
        orphans = list(resp.orphaned_allocation_ids)[:ORPHANS_MAX]
        log.info("registered with %s as %s (state %s, telemetry every %d ms, %d orphaned allocation(s))",
                 self.cfg.control_plane, self.node_id, _state_name(resp.state), resp.telemetry_interval_ms,
                 len(orphans))
        for aid in orphans:
            try:
                r = self.daemon.allocations.cleanup(aid, grace_s=self.daemon.config.cleanup_grace_s)
                log.info("orphan %s cleaned up: %s", aid, r.message)
            except GpuaasError as err:
                log.info("orphan %s: nothing to clean here (%s)", aid, err.message)
            except Exception as exc:  # noqa: BLE001 - one bad orphan must not stop the others
                log.warning("orphan %s cleanup failed: %s", aid, exc)


def _state_name(value: int) -> str:
    from gpuaas.v1 import common_pb2
    try:
        return common_pb2.NodeState.Name(value)
    except ValueError:
        return str(value)
