"""Release racing prepare: an allocation released while its PrepareBatch is queued or on
the wire must not leave anything behind on the node (no orphan holding GPU share).

The probe is the node itself: after everything settled, every GPU the control plane
does not hold must take a whole-GPU Prepare. An orphan share makes the node refuse it
("GPU n held by …")."""
from __future__ import annotations

import grpc

from gpuaas.client import Client
from gpuaas.v1 import common_pb2 as pb
from gpuaas.v1 import node_pb2, node_pb2_grpc
from tests.integration.conftest import q, rid

ZONE = {"zone": "sim-a"}   # the session's simulated nodes only


def test_release_while_preparing_leaves_nothing_on_the_nodes(control_plane, tenant):
    for _ in range(3):
        resp = tenant.place_batch([Client.request(rid(), gpu_milli=10, node_selector=ZONE) for _ in range(40)])
        ids = [r.allocation.allocation_id for r in resp.results if r.HasField("allocation")]
        assert len(ids) == 40, resp
        for a in ids:  # at once: most are still PLACED, their Prepare queued or in flight
            tenant.release(a)
        for a in ids:
            assert tenant.wait_state(a, {pb.ALLOCATION_STATE_RELEASED}, 60).state == pb.ALLOCATION_STATE_RELEASED
    held = set()
    for (assignments,) in q(control_plane, "SELECT assignments FROM control.allocations WHERE state IN"
                                           " ('PLACED','RUNNING','RELEASING','FAILED','RELEASE_FAILED')"):
        held |= {(a["node_id"], g) for a in assignments for g in a["gpu_indices"]}
    nodes = q(control_plane, "SELECT n.node_id, n.address, array_agg(g.gpu_index ORDER BY g.gpu_index)"
                             " FROM control.nodes n JOIN control.gpus g USING (node_id)"
                             " WHERE n.state = 'READY' AND n.labels->>'zone' = 'sim-a' AND g.state = 'READY'"
                             " GROUP BY n.node_id, n.address")
    assert nodes
    probed = 0
    for node_id, address, gpus in nodes:
        free = [g for g in gpus if (node_id, g) not in held]
        if not free:
            continue
        with grpc.insecure_channel(address) as ch:
            stub = node_pb2_grpc.NodeAgentStub(ch)
            probes = [node_pb2.PrepareRequest(allocation_id=f"probe-{rid()}", gpu_indices=[g], gpu_milli=0)
                      for g in free]
            out = stub.PrepareBatch(node_pb2.PrepareBatchRequest(requests=probes), timeout=10)
            try:
                refused = [(p.gpu_indices[0], r.error.message) for p, r in zip(probes, out.results)
                           if r.HasField("error")]
                assert not refused, f"{node_id}: orphan share left behind: {refused}"
                probed += len(probes)
            finally:
                for p, r in zip(probes, out.results):
                    if not r.HasField("error"):
                        stub.Cleanup(node_pb2.CleanupRequest(allocation_id=p.allocation_id), timeout=10)
    assert probed > 0
