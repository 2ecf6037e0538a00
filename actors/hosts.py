"""The Ray actors: thin hosts around the plain cores.

Every long-lived control-plane component is a named, restartable actor in
namespace ``gpuaas``. The cores hold the logic; these classes only host them,
start the gRPC server, and expose the methods other actors call.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import pickle

import grpc
import ray
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gpuaas.config import ControlPlaneConfig

log = logging.getLogger("gpuaas.actors")


def _logging(component: str = ""):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if component:
        name_connections(component)


def name_connections(component: str) -> None:
    """Every Postgres connection this actor's process opens names its component (libpq reads
    PGAPPNAME), so an operator sees in pg_stat_activity which component holds a lock or runs a
    slow statement. An application_name the operator set in the environment or URL wins."""
    os.environ.setdefault("PGAPPNAME", f"gpuaas-{component}")


@ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=64, num_cpus=0)
class PlacementActor:
    """Hosts PlacementCore and the control plane's gRPC server."""

    def __init__(self, app_url: str, owner_url: str | None, config: ControlPlaneConfig, alloc_shards: list,
                 node_shards: list):
        _logging("placement")
        from actors.placement import PlacementCore
        from actors.servicers import AdminServicer, NodeRegistryServicer, PlacementServicer, WatchHub
        from gpuaas import auth
        from gpuaas.v1 import admin_pb2_grpc, node_pb2_grpc, placement_pb2_grpc
        import psycopg

        self.core = PlacementCore(app_url=app_url, config=config, alloc_shards=alloc_shards, node_shards=node_shards)
        authn = auth.Authenticator(lambda: psycopg.connect(app_url, autocommit=True, connect_timeout=5))
        self.hub = WatchHub(self.core)
        opts = [("grpc.max_receive_message_length", config.grpc_message_bytes_max),
                ("grpc.max_send_message_length", config.grpc_message_bytes_max),
                ("grpc.so_reuseport", 0)]
        self.server = grpc.server(cf.ThreadPoolExecutor(max_workers=config.grpc_workers), options=opts,
                                  maximum_concurrent_rpcs=config.grpc_workers * 64)
        self.placement_servicer = PlacementServicer(self.core, authn, self.hub)
        placement_pb2_grpc.add_PlacementServiceServicer_to_server(self.placement_servicer, self.server)
        node_pb2_grpc.add_NodeRegistryServicer_to_server(NodeRegistryServicer(self.core, authn), self.server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(self.core, authn, owner_url), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(config.listen)
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {config.listen}")
        self.server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set("gpuaas.v1.PlacementService", health_pb2.HealthCheckResponse.SERVING)
        from actors.runtime import Readiness

        # NOT_SERVING while the database does not answer: every write is committed before its answer.
        self.readiness = Readiness(app_url, self._set_serving, interval_s=config.readiness_probe_s)
        log.info("control plane listening on %s (policy %s)", config.listen, config.policy)
        self._metrics_address, self._metrics_server = "", None
        if config.metrics_listen:
            from actors import metrics, runtime

            def ledger():
                try:
                    return ray.get_actor(runtime.LEDGER, namespace=runtime.NAMESPACE)
                except ValueError:
                    return None

            self._metrics_address, self._metrics_server = metrics.serve(
                config.metrics_listen, metrics.ControlPlaneCollector(self.core, ledger, self.readiness))

    def _set_serving(self, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", "gpuaas.v1.PlacementService"):
            self.health.set(service, status)

    def metrics_address(self) -> str:
        """host:port of the Prometheus endpoint (/metrics); "" when it is off."""
        return self._metrics_address

    def address(self) -> str:
        host = self.core.cfg.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def capacity_freed(self, allocation_ids: list[str], requeue: bool = False) -> None:
        self.core.capacity_freed(allocation_ids, requeue)

    def set_node_state(self, node_id: str, state_name: str) -> None:
        self.core.set_node_state(node_id, state_name)

    def set_gpu_healthy(self, node_id: str, gpu_index: int, healthy: bool) -> None:
        self.core.set_gpu_healthy(node_id, gpu_index, healthy)

    def stats(self) -> dict:
        return dict(self.core.stats, queued_now=len(self.core.queued), nodes=len(self.core.nodes),
                    gc=dict(self.core.gc.stats), pauses=self.core.pauses.stats,
                    release_calls=[dict(c.stats) for c in self.placement_servicer.release_calls],
                    release_before_handoff_calls=dict(self.placement_servicer.release_before_handoff.stats))

    def thread_cpu(self) -> dict[str, float]:
        """CPU seconds so far of this process's threads, by name (runtime.thread_cpu_s)."""
        from actors.runtime import thread_cpu_s

        return thread_cpu_s()

    def place_latency(self, clear: bool = True) -> list[float]:
        """Unary Place handler latencies (s) recorded since the last clear, oldest first."""
        lat = self.core.place_latency
        out = list(lat)
        if clear:
            lat.clear()
        return out

    def commit_log(self, clear: bool = True) -> list[tuple[float, float, int]]:
        """The group commits of new allocations since the last clear, oldest first: (wall-clock time
        at its end, seconds, rows)."""
        log_ = self.core.commit_log
        out = list(log_)
        if clear:
            log_.clear()
        return out

    def reconcile(self) -> int:
        return self.core.reconcile_released()

    def held(self, allocation_ids: list[str]) -> list[str]:
        """Those of ``allocation_ids`` whose capacity the capacity view still holds (its capacity_freed
        has not arrived yet)."""
        with self.core.lock:
            return [a for a in allocation_ids if a in self.core.engine.allocs]

    def check_invariants(self) -> bool:
        with self.core.lock:
            self.core.engine.check_invariants()
        return True

    def rebuild_stats(self) -> dict:
        return self.core.rebuild_info if hasattr(self.core, "rebuild_info") else {}

    def stop(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        self.readiness.stop()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace=1.0).wait(2.0)
        self.core.shutdown()


@ray.remote(max_restarts=-1, max_task_retries=0, num_cpus=0)
class AllocationShardActor:
    def __init__(self, index: int, count: int, app_url: str, config: ControlPlaneConfig):
        _logging(f"allocation-shard-{index}")
        from actors.allocation_shard import AllocationShardCore

        self.core = AllocationShardCore(index=index, count=count, app_url=app_url, config=config)
        self._started = False

    async def start(self) -> dict:
        """Idempotent; also called by the placement actor's supervisor tick, so a
        restarted shard resumes its in-flight work from Postgres."""
        if self._started:
            return {}
        self._started = True
        return await self.core.start()

    async def _ensure(self):
        if not self._started:
            await self.start()

    async def adopt(self, items):
        """``items``: a list of hand-offs, or the placement actor's pickled list of them (bytes)."""
        await self._ensure()
        return await self.core.adopt(pickle.loads(items) if isinstance(items, bytes) else items)

    async def release(self, aid: str, event_name: str = "release_requested", at_iso: str | None = None,
                      reason: str | None = None):
        await self._ensure()
        return await self.core.release(aid, event_name, at_iso, reason)

    async def release_owned_many(self, items):
        await self._ensure()
        return await self.core.release_owned_many(items)

    async def release_many(self, aids, event_name: str = "release_requested", at_iso: str | None = None):
        await self._ensure()
        return await self.core.release_many(aids, event_name, at_iso)

    async def fail_on_node(self, node_id, gpu_index, event_name, at_iso):
        await self._ensure()
        return await self.core.fail_on_node(node_id, gpu_index, event_name, at_iso)

    async def node_ready(self, node_id, address):
        await self._ensure()
        return await self.core.node_ready(node_id, address)

    async def resolve(self, aid, note):
        await self._ensure()
        return await self.core.resolve(aid, note)

    async def snapshot(self):
        await self._ensure()
        return await self.core.snapshot()


@ray.remote(max_restarts=-1, max_task_retries=0, num_cpus=0)
class NodeShardActor:
    def __init__(self, index: int, count: int, app_url: str, config: ControlPlaneConfig):
        _logging(f"node-shard-{index}")
        from actors.node_shard import NodeShardCore

        self.core = NodeShardCore(index=index, count=count, app_url=app_url, config=config)
        self._started = False

    async def start(self) -> dict:
        """Idempotent; also called by the placement actor's supervisor tick, so a
        restarted shard resumes its in-flight work from Postgres."""
        if self._started:
            return {}
        self._started = True
        return await self.core.start()

    async def _ensure(self):
        if not self._started:
            await self.start()

    async def register(self, node_id, address, inventory_bytes):
        await self._ensure()
        return await self.core.register(node_id, address, inventory_bytes)

    async def deregister(self, node_id, reason):
        await self._ensure()
        return await self.core.deregister(node_id, reason)

    async def operator(self, node_id, action, reason):
        await self._ensure()
        return await self.core.operator(node_id, action, reason)

    async def clear_gpu(self, node_id, gpu_index, reason):
        await self._ensure()
        return await self.core.clear_gpu(node_id, gpu_index, reason)

    async def quarantine(self, node_id, gpu_indices, on, reason):
        await self._ensure()
        return await self.core.quarantine(node_id, gpu_indices, on, reason)

    async def telemetry_stats(self):
        await self._ensure()
        return await self.core.telemetry_stats()
