"""The allocation shards' per-node batching of Prepare and Cleanup (actors.runtime.NodeBatcher), against
real daemons on loopback: what is queued together goes in one batch call, each item gets its own
answer, and a daemon from before the batch calls gets one call per item."""
from __future__ import annotations

import asyncio
from concurrent import futures

import grpc
import pytest

from actors import runtime
from gpuaas.v1 import node_pb2, node_pb2_grpc


def _prep(aid, gpu, milli=0):
    return node_pb2.PrepareRequest(allocation_id=aid, gpu_indices=[gpu], gpu_milli=milli, tenant_id="t")


def _batchers(agents):
    kw = dict(max_items=4096, timeout_s=5.0)
    return (runtime.NodeBatcher(agents, single="Prepare", batch="PrepareBatch",
                                batch_request=node_pb2.PrepareBatchRequest, **kw),
            runtime.NodeBatcher(agents, single="Cleanup", batch="CleanupBatch",
                                batch_request=node_pb2.CleanupBatchRequest, **kw))


async def _round(address: str):
    """Prepare four allocations (one refused), then clean up three and one never prepared, each group
    queued in one loop turn; the answers per item and the calls each group took."""
    agents = runtime.AgentStubs()
    prepares, cleanups = _batchers(agents)
    try:
        # d names a GPU the node does not have: refused whatever order the single calls arrive in.
        reqs = [_prep("a", 0), _prep("b", 1, 500), _prep("c", 1, 500), _prep("d", 99)]
        prepared = await asyncio.gather(*[prepares.queue(address, r) for r in reqs], return_exceptions=True)
        aids = ["a", "b", "nope", "c"]
        cleaned = await asyncio.gather(*[cleanups.queue(address, node_pb2.CleanupRequest(allocation_id=a))
                                         for a in aids], return_exceptions=True)
        return prepared, cleaned, prepares.calls, cleanups.calls
    finally:
        await agents.drop(address)


def _check(daemon, prepared, cleaned):
    a, b, c, d = prepared
    assert a.cuda_visible_devices == "0" and b.cuda_visible_devices == "1" and c.cuda_visible_devices == "1"
    assert isinstance(d, (runtime.ItemRefused, grpc.RpcError))
    assert d.code() == grpc.StatusCode.INVALID_ARGUMENT
    ca, cb, nope, cc = cleaned
    assert isinstance(ca, node_pb2.CleanupResponse) and ca.processes_ended == 1
    assert isinstance(cb, node_pb2.CleanupResponse) and isinstance(cc, node_pb2.CleanupResponse)
    assert isinstance(nope, (runtime.ItemRefused, grpc.RpcError)) and nope.code() == grpc.StatusCode.NOT_FOUND
    assert daemon.allocations.live() == []


def test_items_queued_together_go_in_one_batch_call(sim_daemon):
    prepared, cleaned, prep_calls, cleanup_calls = asyncio.run(_round(sim_daemon.address))
    assert all(not isinstance(x, grpc.RpcError) for x in prepared + cleaned)  # refusals are per item
    _check(sim_daemon, prepared, cleaned)
    assert (prep_calls, cleanup_calls) == (1, 1)


class _BeforeBatchCalls(node_pb2_grpc.NodeAgentServicer):
    """A daemon of the version before the batch calls: the generated servicer base answers
    PrepareBatch and CleanupBatch UNIMPLEMENTED; Prepare and Cleanup are the real daemon's."""

    def __init__(self, real):
        self.Prepare, self.Cleanup = real.Prepare, real.Cleanup


@pytest.fixture
def old_daemon_address(sim_daemon):
    server = grpc.server(futures.ThreadPoolExecutor(4))
    node_pb2_grpc.add_NodeAgentServicer_to_server(_BeforeBatchCalls(sim_daemon.servicer), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_a_daemon_without_batch_calls_gets_one_call_per_item(sim_daemon, old_daemon_address):
    prepared, cleaned, prep_calls, cleanup_calls = asyncio.run(_round(old_daemon_address))
    _check(sim_daemon, prepared, cleaned)
    # One refused batch call each, then one call per item.
    assert (prep_calls, cleanup_calls) == (1 + 4, 1 + 4)
