"""prepare_fail / cleanup_fail: the next N Prepare or Cleanup calls answer UNAVAILABLE, then work again."""
from __future__ import annotations

import grpc
import pytest

from gpuaas.v1 import node_pb2
from tests.node_daemon.conftest import drop_fault, stub_for


def _prepare(stub, aid):
    return stub.Prepare(node_pb2.PrepareRequest(allocation_id=aid, gpu_indices=[0], gpu_milli=1000,
                                                tenant_id="t"), timeout=5)


def test_prepare_fail_n_times_then_succeeds(sim_daemon):
    stub = stub_for(sim_daemon)
    drop_fault(sim_daemon, {"fault": "prepare_fail", "times": 2}, "p")
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as err:
            _prepare(stub, "a-1")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _prepare(stub, "a-1").cuda_visible_devices


def test_cleanup_fail_n_times_then_succeeds(sim_daemon):
    stub = stub_for(sim_daemon)
    _prepare(stub, "a-2")
    drop_fault(sim_daemon, {"fault": "cleanup_fail", "times": 3}, "c")
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as err:
            stub.Cleanup(node_pb2.CleanupRequest(allocation_id="a-2"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    stub.Cleanup(node_pb2.CleanupRequest(allocation_id="a-2"), timeout=5)


def test_bad_times_is_rejected(sim_daemon):
    import pathlib
    import time

    d = pathlib.Path(sim_daemon.config.fault_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / ".x.tmp").write_text('{"fault": "cleanup_fail", "times": -1}')
    (d / ".x.tmp").rename(d / "x.json")
    deadline = time.monotonic() + 5
    while not (d / "x.json.rejected").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
