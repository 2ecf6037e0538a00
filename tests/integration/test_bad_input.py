"""Bad input gets the documented status and field violations, and writes nothing."""
from __future__ import annotations

import grpc
import psycopg
import pytest

from gpuaas.client import Client
from gpuaas.errors import from_rpc_error
from gpuaas.v1 import common_pb2 as pb

from tests.integration.conftest import GPUS, rid


def _rows(cp):
    with psycopg.connect(cp.urls.app) as conn:
        return (conn.execute("SELECT count(*) FROM control.allocations").fetchone()[0],
                conn.execute("SELECT count(*) FROM control.outbox").fetchone()[0])


CASES = [
    ("zero GPUs", dict(gpu_count=0), "request.gpu_count"),
    ("negative GPUs", dict(gpu_count=-2), "request.gpu_count"),
    ("negative share", dict(gpu_milli=-5), "request.gpu_milli"),
    ("share of 1000+", dict(gpu_milli=1500), "request.gpu_milli"),
    ("both count and share", dict(gpu_count=1, gpu_milli=500), "request.gpu_milli"),
    ("more GPUs than any node", dict(gpu_count=GPUS + 1), "request.gpu_count"),
    ("unknown model", dict(gpu_count=1, gpu_models=["Z9000"]), "request.gpu_models"),
    ("too many models", dict(gpu_count=1, gpu_models=["H100"] * 17), "request.gpu_models"),
    ("oversized selector", dict(gpu_count=1, node_selector={f"k{i}": "v" for i in range(33)}), "request.node_selector"),
    ("label value too long", dict(gpu_count=1, labels={"team": "x" * 300}), "request.labels"),
    ("negative lease", dict(gpu_count=1, lease_s=-1), "request.lease_s"),
    ("negative cpu", dict(gpu_count=1, cpu_milli=-1), "request.cpu_milli"),
    ("unknown topology", dict(gpu_count=1, topology=42), "request.topology"),
    ("absurd priority", dict(gpu_count=1, priority=10**6), "request.priority"),
    ("too many replicas", dict(gpu_count=1, replicas=5000), "request.replicas"),
]


@pytest.mark.parametrize("name,fields,field", CASES, ids=[c[0] for c in CASES])
def test_invalid_place_is_rejected_with_field_violation(control_plane, tenant, name, fields, field):
    """Each malformed Place answers INVALID_ARGUMENT naming the field, and no row is written."""
    before = _rows(control_plane)
    with pytest.raises(grpc.RpcError) as err:
        tenant.place(rid(), **fields)
    code, _, violations = from_rpc_error(err.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in [f for f, _ in violations], violations
    assert _rows(control_plane) == before


def test_missing_request_id(control_plane, tenant):
    """A request without an idempotency key is refused."""
    with pytest.raises(grpc.RpcError) as err:
        tenant.place("", gpu_count=1)
    code, _, violations = from_rpc_error(err.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and violations[0][0] == "request.request_id"


def test_oversized_and_empty_batches(control_plane, tenant):
    """PlaceBatch refuses 0 items and more than the maximum, writing nothing."""
    before = _rows(control_plane)
    for n in (0, control_plane.cfg.place_batch_items_max + 1):
        with pytest.raises(grpc.RpcError) as err:
            tenant.place_batch([Client.request(f"b{i}", gpu_milli=1) for i in range(n)])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _rows(control_plane) == before


def test_batch_items_fail_on_their_own(control_plane, tenant):
    """In a batch, a bad item gets its own error status while good items are placed."""
    resp = tenant.place_batch([Client.request(rid(), gpu_milli=100), Client.request(rid(), gpu_count=-1)])
    assert resp.results[0].HasField("allocation")
    assert resp.results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_fail_fast_without_capacity_is_resource_exhausted(control_plane, tenant):
    """No capacity and wait=false answers RESOURCE_EXHAUSTED with an explanation, writing nothing."""
    before = _rows(control_plane)
    with pytest.raises(grpc.RpcError) as err:
        tenant.place(rid(), gpu_count=GPUS, replicas=50)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.details()
    assert _rows(control_plane) == before


def test_authentication_and_tenant_isolation(control_plane, tenant, admin):
    """No token / unknown token → UNAUTHENTICATED; another tenant's allocation → NOT_FOUND."""
    for token in ("", "gpa_nope_nope"):
        c = Client(control_plane.address, token)
        with pytest.raises(grpc.RpcError) as err:
            c.place(rid(), gpu_count=1)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        c.close()
    mine = tenant.place(rid(), gpu_milli=50)
    admin.create_tenant("other-" + tenant.tenant_id[2:])
    other = Client(control_plane.address, admin.create_token("other-" + tenant.tenant_id[2:]))
    for call in (other.get, other.release):
        with pytest.raises(grpc.RpcError) as err:
            call(mine.allocation_id)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        other.get("not-a-uuid")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    other.close()


def test_placement_token_cannot_administer(control_plane, tenant):
    """A placement-only token is refused by AdminService with PERMISSION_DENIED."""
    with pytest.raises(grpc.RpcError) as err:
        tenant.list_nodes()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_resolve_of_a_running_allocation_is_failed_precondition(control_plane, tenant, admin):
    """The state machine forbids resolving an allocation that is not RELEASE_FAILED."""
    a = tenant.place(rid(), gpu_milli=50)
    tenant.wait_state(a.allocation_id, {pb.ALLOCATION_STATE_RUNNING}, 30)
    with pytest.raises(grpc.RpcError) as err:
        admin.resolve(a.allocation_id)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def _inventory(**over):
    from gpuaas.v1 import node_pb2
    gpus = over.pop("gpus", [dict(index=i, uuid=f"GPU-bad-{i}", model="H100", memory_mib=81920, nvlink_island=0)
                             for i in range(2)])
    inv = node_pb2.NodeInventory(node_name=over.pop("node_name", "bad-input-node"), cpu_milli=8000,
                                 memory_mib=65536, gpus=[node_pb2.GpuInfo(**g) for g in gpus])
    for k, val in over.items():
        setattr(inv, k, val)
    return inv


REGISTER_CASES = [
    ("bad node name", dict(node_name="no spaces allowed"), "inventory.node_name"),
    ("no GPUs", dict(gpus=[]), "inventory.gpus"),
    ("duplicate GPU index", dict(gpus=[dict(index=0, model="H100"), dict(index=0, model="H100")]),
     "inventory.gpus.index"),
    ("GPU without a model", dict(gpus=[dict(index=0, model="")]), "inventory.gpus.model"),
    ("negative NVLink island", dict(gpus=[dict(index=0, model="H100", nvlink_island=-1)]),
     "inventory.gpus.nvlink_island"),
    ("NVLink island past the GPUs", dict(gpus=[dict(index=0, model="H100", nvlink_island=3)]),
     "inventory.gpus.nvlink_island"),
    ("negative memory", dict(memory_mib=-1), "inventory.cpu_milli"),
]


@pytest.mark.parametrize("name,over,field", REGISTER_CASES, ids=[c[0] for c in REGISTER_CASES])
def test_invalid_registration_is_rejected_with_field_violation(control_plane, name, over, field):
    """A node's Register with a malformed inventory answers INVALID_ARGUMENT naming the field, and no
    node row is written; without the node token it is UNAUTHENTICATED."""
    from gpuaas.v1 import node_pb2, node_pb2_grpc

    def nodes():
        with psycopg.connect(control_plane.urls.app) as conn:
            return conn.execute("SELECT count(*) FROM control.nodes").fetchone()[0]

    before = nodes()
    req = node_pb2.RegisterNodeRequest(inventory=_inventory(**over), agent_address="127.0.0.1:1")
    with grpc.insecure_channel(control_plane.address) as ch:
        stub = node_pb2_grpc.NodeRegistryStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Register(req, metadata=[("authorization", f"Bearer {control_plane.node_token}")], timeout=10)
        code, _, violations = from_rpc_error(err.value)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert field in [f for f, _ in violations], violations
        with pytest.raises(grpc.RpcError) as err:
            stub.Register(node_pb2.RegisterNodeRequest(inventory=_inventory(), agent_address="127.0.0.1:1"),
                          timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert nodes() == before
