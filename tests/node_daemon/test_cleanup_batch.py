"""CleanupBatch: each item answers exactly what its own Cleanup would; a malformed batch is refused whole."""
from __future__ import annotations

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status

from gpuaas.v1 import node_pb2
from tests.node_daemon.conftest import drop_fault, stub_for


def _prepare(stub, aid, gpus, milli=0):
    stub.Prepare(node_pb2.PrepareRequest(allocation_id=aid, gpu_indices=gpus, gpu_milli=milli, tenant_id="t"),
                 timeout=5)


def _batch(stub, *aids):
    return stub.CleanupBatch(node_pb2.CleanupBatchRequest(
        requests=[node_pb2.CleanupRequest(allocation_id=a) for a in aids]), timeout=10)


def _live(daemon) -> set[str]:
    return {a.allocation_id for a in daemon.allocations.live()}


@pytest.mark.parametrize("side_by_side", [False, True], ids=["inline", "side-by-side"])
def test_batch_items_succeed_and_fail_on_their_own(daemon_factory, side_by_side):
    daemon = daemon_factory()
    # The simulated backend's processes end at once, so its batches run inline. A backend whose
    # process ends may wait (NVML) cleans a batch's items up side by side; the same answers either way.
    daemon.backend.process_end_waits = side_by_side
    stub = stub_for(daemon)
    _prepare(stub, "a1", [0])
    _prepare(stub, "a2", [1], milli=300)
    _prepare(stub, "a3", [1], milli=300)
    _prepare(stub, "keep", [2])
    resp = _batch(stub, "a1", "never", "a2", "a3")
    assert [r.allocation_id for r in resp.results] == ["a1", "never", "a2", "a3"]
    a1, never, a2, a3 = resp.results
    # A whole GPU: its simulated process (one per GPU) is ended.
    assert not a1.HasField("error") and a1.response.processes_ended == 1
    # Never prepared here: NOT_FOUND, exactly as its own Cleanup answers.
    assert never.error.code == code_pb2.NOT_FOUND and not never.HasField("response")
    with pytest.raises(grpc.RpcError) as e:
        stub.Cleanup(node_pb2.CleanupRequest(allocation_id="never"), timeout=5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and e.value.details() == never.error.message
    # Two shares of GPU 1: the first cleaned up leaves the other's process running, the second ends it.
    assert not a2.HasField("error") and not a3.HasField("error")
    assert _live(daemon) == {"keep"}
    # Idempotent per item: again → OK, "already cleaned up", as Cleanup answers.
    again = _batch(stub, "a1", "a3")
    assert all(not r.HasField("error") and "already cleaned up" in r.response.message for r in again.results)
    # The freed GPUs take new allocations.
    _prepare(stub, "b1", [0])
    _prepare(stub, "b2", [1])


@pytest.mark.parametrize("aids,field", [([], "requests"), (["d", "e", "d"], "requests[2].allocation_id")])
def test_malformed_batch_is_invalid_argument_and_cleans_nothing(sim_daemon, aids, field):
    stub = stub_for(sim_daemon)
    _prepare(stub, "d", [0])
    _prepare(stub, "e", [1])
    with pytest.raises(grpc.RpcError) as e:
        _batch(stub, *aids)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    br = error_details_pb2.BadRequest()
    assert rpc_status.from_call(e.value).details[0].Unpack(br) and br.field_violations[0].field == field
    assert _live(sim_daemon) == {"d", "e"}


def test_injected_failure_takes_one_item(sim_daemon):
    """cleanup_fail counts each item as a Cleanup: the first item is refused UNAVAILABLE and stays
    prepared, the second is cleaned up; the refused one goes through on the next call."""
    stub = stub_for(sim_daemon)
    _prepare(stub, "f1", [0])
    _prepare(stub, "f2", [1])
    drop_fault(sim_daemon, {"fault": "cleanup_fail", "times": 1}, "c")
    r1, r2 = _batch(stub, "f1", "f2").results
    assert r1.error.code == code_pb2.UNAVAILABLE and not r2.HasField("error")
    assert _live(sim_daemon) == {"f1"}
    assert not _batch(stub, "f1").results[0].HasField("error")
    assert _live(sim_daemon) == set()


def test_overlapping_cleanups_of_one_gpu_end_its_processes(sim_daemon):
    """Two allocations share GPU 1 and their cleanups overlap (two calls at once, or a batch's items side
    by side). The later one sees the GPU as its own and ends its processes; before, each saw the other
    still holding it and both left the processes running. The overlap is made certain by holding the
    simulated backend's lock, so the first cleanup waits inside the backend after it has begun."""
    import threading
    import time

    stub = stub_for(sim_daemon)
    _prepare(stub, "s1", [1], milli=300)
    _prepare(stub, "s2", [1], milli=300)
    table, results = sim_daemon.allocations, {}

    def clean(aid):
        results[aid] = table.cleanup(aid, grace_s=0.1)

    with sim_daemon.backend._lock:  # the first cleanup blocks in on_release, already begun
        first = threading.Thread(target=clean, args=("s1",))
        first.start()
        time.sleep(0.3)  # it has decided that GPU 1 is shared and now waits for the backend
        assert first.is_alive() and "s1" not in results
        second = threading.Thread(target=clean, args=("s2",))
        second.start()
        second.join(0.2)  # it waits for the backend too, after deciding whose GPU 1 is
    first.join(5)
    second.join(5)
    assert "shared" in results["s1"].message
    assert "ended" in results["s2"].message and "[1]" in results["s2"].message
    assert _live(sim_daemon) == set()
