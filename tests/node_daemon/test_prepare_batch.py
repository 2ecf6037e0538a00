"""PrepareBatch: each item answers exactly what its own Prepare would; a malformed batch is refused whole."""
from __future__ import annotations

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status

from gpuaas.v1 import node_pb2
from tests.node_daemon.conftest import stub_for


def _req(aid, gpus, milli=0, tenant="t1"):
    return node_pb2.PrepareRequest(allocation_id=aid, gpu_indices=gpus, gpu_milli=milli, tenant_id=tenant)


def test_batch_items_succeed_and_fail_on_their_own(sim_daemon):
    stub = stub_for(sim_daemon)
    resp = stub.PrepareBatch(node_pb2.PrepareBatchRequest(requests=[
        _req("a1", [0]),                 # whole GPU 0
        _req("a2", [0], milli=10),       # GPU 0 is full: refused like its own Prepare
        _req("a3", [1], milli=400),
        _req("a4", [1], milli=600),      # exactly fills GPU 1
        _req("a5", [99]),                # no such GPU: INVALID_ARGUMENT for this item only
    ]), timeout=5)
    by_id = {r.allocation_id: r for r in resp.results}
    assert [r.allocation_id for r in resp.results] == ["a1", "a2", "a3", "a4", "a5"]
    assert by_id["a1"].response.cuda_visible_devices == "0" and not by_id["a1"].HasField("error")
    assert by_id["a3"].response.cuda_visible_devices == "1" and by_id["a4"].response.cuda_visible_devices == "1"
    assert by_id["a2"].error.code == code_pb2.FAILED_PRECONDITION
    assert "GPU 0" in by_id["a2"].error.message
    pf = error_details_pb2.PreconditionFailure()
    assert by_id["a2"].error.details[0].Unpack(pf) and pf.violations[0].subject == "gpu/0"
    assert by_id["a5"].error.code == code_pb2.INVALID_ARGUMENT
    live = {a.allocation_id for a in sim_daemon.allocations.live()}
    assert live == {"a1", "a3", "a4"}


def test_batch_is_idempotent_per_item(sim_daemon):
    stub = stub_for(sim_daemon)
    first = stub.PrepareBatch(node_pb2.PrepareBatchRequest(requests=[_req("b1", [1]), _req("b2", [2])]), timeout=5)
    again = stub.PrepareBatch(node_pb2.PrepareBatchRequest(requests=[_req("b1", [1]), _req("b2", [3])]), timeout=5)
    assert all(not r.HasField("error") for r in first.results)
    assert not again.results[0].HasField("error")            # same body: the earlier answer
    assert again.results[1].error.code == code_pb2.ALREADY_EXISTS  # same id, other GPUs: refused
    # The single-item RPC sees the same state.
    with pytest.raises(grpc.RpcError) as e:
        stub.Prepare(_req("b2", [0]), timeout=5)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize("items,field", [([], "requests"),
                                         ([("d", [0]), ("d", [1])], "requests[1].allocation_id")])
def test_malformed_batch_is_invalid_argument_and_prepares_nothing(sim_daemon, items, field):
    stub = stub_for(sim_daemon)
    with pytest.raises(grpc.RpcError) as e:
        stub.PrepareBatch(node_pb2.PrepareBatchRequest(requests=[_req(a, g) for a, g in items]), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    st = rpc_status.from_call(e.value)
    br = error_details_pb2.BadRequest()
    assert st.details[0].Unpack(br) and br.field_violations[0].field == field
    assert sim_daemon.allocations.live() == []


def test_fractional_shares_fill_a_gpu_exactly(sim_daemon):
    """1,000 one-thousandth shares fit on one GPU; the next is refused; cleanup frees exactly one."""
    stub = stub_for(sim_daemon)
    reqs = [_req(f"f{i}", [3], milli=1) for i in range(1001)]
    resp = stub.PrepareBatch(node_pb2.PrepareBatchRequest(requests=reqs), timeout=10)
    errors = [r for r in resp.results if r.HasField("error")]
    assert len(errors) == 1 and errors[0].allocation_id == "f1000"
    assert errors[0].error.code == code_pb2.FAILED_PRECONDITION
    stub.Cleanup(node_pb2.CleanupRequest(allocation_id="f0"), timeout=5)
    again = stub.PrepareBatch(node_pb2.PrepareBatchRequest(requests=[_req("f1000", [3], milli=1),
                                                                     _req("f1001", [3], milli=1)]), timeout=5)
    assert not again.results[0].HasField("error")
    assert again.results[1].error.code == code_pb2.FAILED_PRECONDITION
