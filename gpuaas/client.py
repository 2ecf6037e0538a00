"""Python client for the gpuaas gRPC API (PlacementService, AdminService)."""
from __future__ import annotations

import time
from typing import Iterable, Iterator

import grpc

from gpuaas.v1 import admin_pb2, admin_pb2_grpc, common_pb2, placement_pb2, placement_pb2_grpc

State = common_pb2.AllocationState


def health_status(address: str, service: str = "gpuaas.v1.PlacementService", timeout_s: float = 5.0) -> str:
    """The control plane's gRPC health status for ``service`` (no token needed): "SERVING",
    "NOT_SERVING", …, or the call's status code name when nothing answers ("UNAVAILABLE")."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                        timeout=timeout_s)
        except grpc.RpcError as err:
            return err.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def state_name(value: int) -> str:
    return common_pb2.AllocationState.Name(value).removeprefix("ALLOCATION_STATE_")


class Client:
    """Blocking client. ``token`` is a bearer token from ``gpuaas admin tokens create``."""

    def __init__(self, address: str, token: str, *, timeout_s: float = 30.0):
        self.address, self.timeout_s = address, timeout_s
        self._md = (("authorization", f"Bearer {token}"),)
        self.channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024)])
        self.placement = placement_pb2_grpc.PlacementServiceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ placement

    @staticmethod
    def request(request_id: str, **fields) -> common_pb2.PlacementRequest:
        return common_pb2.PlacementRequest(request_id=request_id, **fields)

    def place(self, request_id: str, **fields) -> common_pb2.Allocation:
        resp = self.placement.Place(placement_pb2.PlaceRequest(request=self.request(request_id, **fields)),
                                    metadata=self._md, timeout=self.timeout_s)
        return resp.allocation

    def place_batch(self, requests: Iterable[common_pb2.PlacementRequest]) -> placement_pb2.PlaceBatchResponse:
        return self.placement.PlaceBatch(placement_pb2.PlaceBatchRequest(requests=list(requests)),
                                         metadata=self._md, timeout=self.timeout_s)

    def release(self, allocation_id: str) -> common_pb2.Allocation:
        return self.placement.Release(placement_pb2.ReleaseRequest(allocation_id=allocation_id), metadata=self._md,
                                      timeout=self.timeout_s).allocation

    def release_batch(self, allocation_ids: Iterable[str]) -> placement_pb2.ReleaseBatchResponse:
        return self.placement.ReleaseBatch(placement_pb2.ReleaseBatchRequest(allocation_ids=list(allocation_ids)),
                                           metadata=self._md, timeout=self.timeout_s)

    def get(self, allocation_id: str) -> common_pb2.Allocation:
        return self.placement.GetAllocation(placement_pb2.GetAllocationRequest(allocation_id=allocation_id),
                                            metadata=self._md, timeout=self.timeout_s)

    def list(self, states: Iterable[int] = (), page_size: int = 100) -> Iterator[common_pb2.Allocation]:
        token = ""
        while True:
            resp = self.placement.ListAllocations(placement_pb2.ListAllocationsRequest(
                page_size=page_size, page_token=token, states=list(states)), metadata=self._md,
                timeout=self.timeout_s)
            yield from resp.allocations
            token = resp.next_page_token
            if not token:
                return

    def watch(self, allocation_ids: Iterable[str] = (), after_event_id: int = 0, timeout_s: float | None = None):
        return self.placement.WatchAllocations(placement_pb2.WatchAllocationsRequest(
            allocation_ids=list(allocation_ids), after_event_id=after_event_id), metadata=self._md,
            timeout=timeout_s)

    def wait_state(self, allocation_id: str, states: set[int], timeout_s: float = 30.0) -> common_pb2.Allocation:
        deadline = time.monotonic() + timeout_s
        while True:
            a = self.get(allocation_id)
            if a.state in states:
                return a
            if time.monotonic() > deadline:
                raise TimeoutError(f"allocation {allocation_id} is {state_name(a.state)} after {timeout_s}s")
            time.sleep(0.05)

    # ------------------------------------------------------------ admin

    def create_tenant(self, tenant_id: str, name: str = "") -> admin_pb2.Tenant:
        return self.admin.CreateTenant(admin_pb2.CreateTenantRequest(tenant_id=tenant_id, name=name),
                                       metadata=self._md, timeout=self.timeout_s)

    def create_token(self, tenant_id: str, scopes=("placement",), ttl_s: int = 0) -> str:
        return self.admin.CreateToken(admin_pb2.CreateTokenRequest(tenant_id=tenant_id, scopes=list(scopes),
                                                                   ttl_s=ttl_s),
                                      metadata=self._md, timeout=self.timeout_s).secret

    def set_quota(self, tenant_id: str, gpu_model: str, gpu_milli_max: int) -> admin_pb2.Quota:
        return self.admin.SetQuota(admin_pb2.SetQuotaRequest(quota=admin_pb2.Quota(
            tenant_id=tenant_id, gpu_model=gpu_model, gpu_milli_max=gpu_milli_max)), metadata=self._md,
            timeout=self.timeout_s)

    def list_nodes(self) -> list:
        return list(self.admin.ListNodes(admin_pb2.ListNodesRequest(), metadata=self._md,
                                         timeout=self.timeout_s).nodes)

    def node_action(self, action: str, node_id: str, reason: str = ""):
        method = {"cordon": self.admin.CordonNode, "uncordon": self.admin.UncordonNode,
                  "drain": self.admin.DrainNode, "clear": self.admin.ClearNode}[action]
        return method(admin_pb2.NodeActionRequest(node_id=node_id, reason=reason), metadata=self._md,
                      timeout=self.timeout_s)

    def clear_gpu(self, node_id: str, gpu_index: int, reason: str = ""):
        """An UNHEALTHY GPU back to READY, once an operator has reset or replaced it."""
        return self.admin.ClearGpu(admin_pb2.ClearGpuRequest(node_id=node_id, gpu_index=gpu_index, reason=reason),
                                   metadata=self._md, timeout=self.timeout_s)

    def resolve(self, allocation_id: str, note: str = "") -> common_pb2.Allocation:
        return self.admin.ResolveAllocation(admin_pb2.ResolveAllocationRequest(allocation_id=allocation_id,
                                                                               note=note),
                                            metadata=self._md, timeout=self.timeout_s)
