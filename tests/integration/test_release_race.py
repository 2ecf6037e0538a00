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
from tests.integration.conftest import q, rid, tenant_fixture, wait_capacity_back

ZONE = {"zone": "sim-a"}   # the session's simulated nodes only
other = tenant_fixture()


def _settled_before_handoff(cp) -> int:
    import ray
    return ray.get(cp.placement.stats.remote())["released_before_handoff"]


def test_release_while_preparing_leaves_nothing_on_the_nodes(control_plane, tenant):
    settled_before = _settled_before_handoff(control_plane)
    for _ in range(3):
        resp = tenant.place_batch([Client.request(rid(), gpu_milli=10, node_selector=ZONE) for _ in range(40)])
        ids = [r.allocation.allocation_id for r in resp.results if r.HasField("allocation")]
        assert len(ids) == 40, resp
        for a in ids:  # at once: most are still PLACED, their hand-off waiting or their Prepare in flight
            # Each answer is the row after the release, whether or not the shard held it yet.
            assert tenant.release(a).state in (pb.ALLOCATION_STATE_RELEASING, pb.ALLOCATION_STATE_RELEASED)
        for a in ids:
            assert tenant.wait_state(a, {pb.ALLOCATION_STATE_RELEASED}, 60).state == pb.ALLOCATION_STATE_RELEASED
    # The first releases of each round came before their hand-off: the placement actor settled them
    # itself (no shard, no Prepare, so no Cleanup). Later ones raced the shard's Prepare. The probe
    # below shows that nothing was left behind either way.
    assert _settled_before_handoff(control_plane) > settled_before
    _nothing_left_on_the_nodes(control_plane)


def _nothing_left_on_the_nodes(control_plane) -> None:
    """Every GPU of the session's simulated nodes that the control plane does not hold takes a
    whole-GPU Prepare: an orphan share left behind would make its node refuse it."""
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


def test_a_late_hand_off_of_a_stale_row_changes_nothing(control_plane, tenant):
    """The placement actor hands its committed PLACED row to the shard. A hand-off that arrives late
    (queued for a shard that was restarting, which has since resumed the allocation from Postgres)
    carries a stale row: the shard must not prepare the allocation again, nor for a released one."""
    import ray

    from actors import store
    from actors.placement import shard_of

    running = tenant.place(rid(), gpu_milli=10, node_selector=ZONE)
    released = tenant.place(rid(), gpu_milli=10, node_selector=ZONE)
    for a in (running, released):
        tenant.wait_state(a.allocation_id, {pb.ALLOCATION_STATE_RUNNING}, 30)
    tenant.release(released.allocation_id)
    tenant.wait_state(released.allocation_id, {pb.ALLOCATION_STATE_RELEASED}, 30)
    shards = control_plane.alloc_shards
    for a in (running, released):
        [(version, state)] = q(control_plane, "SELECT version, state FROM control.allocations WHERE allocation_id"
                                              " = %s", a.allocation_id)
        stale = store.AllocRow(allocation_id=a.allocation_id, tenant_id=a.tenant_id, request_id=a.request_id,
                               request_hash=b"", request=a.request.SerializeToString(), state=store.AllocState.PLACED,
                               version=2, assignments=[{"node_id": x.node_id, "gpu_indices": list(x.gpu_indices),
                                                        "gpu_milli": x.gpu_milli, "gpu_model": x.gpu_model}
                                                       for x in a.assignments])
        addrs = {x.node_id: x.node_address for x in a.assignments}
        shard = shards[shard_of(a.allocation_id, len(shards))]
        assert ray.get(shard.adopt.remote([(a.allocation_id, addrs, stale)])) == 0
        assert q(control_plane, "SELECT version, state FROM control.allocations WHERE allocation_id = %s",
                 a.allocation_id) == [(version, state)]
    assert tenant.get(running.allocation_id).state == pb.ALLOCATION_STATE_RUNNING


def test_concurrent_releases_each_get_their_own_answer_and_capacity_comes_back(control_plane, tenant, other):
    """Unary Releases arriving together share actor calls to their shard (runtime.Combiner). Each
    caller still gets its own row after the release, another tenant's id is refused on its own, and
    every released allocation's capacity leaves the placement actor's capacity view."""
    import concurrent.futures as cf

    import ray

    resp = tenant.place_batch([Client.request(rid(), gpu_milli=10, node_selector=ZONE) for _ in range(48)])
    ids = [r.allocation.allocation_id for r in resp.results if r.HasField("allocation")]
    assert len(ids) == 48, resp
    for a in ids[:24]:  # half RUNNING, half released while their hand-off may still wait
        tenant.wait_state(a, {pb.ALLOCATION_STATE_RUNNING}, 30)
    theirs = other.place(rid(), gpu_milli=10).allocation_id
    stats = ray.get(control_plane.placement.stats.remote())
    before, settled_before = stats["release_calls"], stats["released_before_handoff"]

    def release(a):
        try:
            return a, tenant.release(a)
        except grpc.RpcError as err:
            return a, err.code()

    with cf.ThreadPoolExecutor(16) as ex:
        answers = dict(ex.map(release, ids + [theirs]))
    assert answers.pop(theirs) == grpc.StatusCode.NOT_FOUND
    for a, got in answers.items():
        assert got.allocation_id == a and got.state in (pb.ALLOCATION_STATE_RELEASING, pb.ALLOCATION_STATE_RELEASED)
    stats = ray.get(control_plane.placement.stats.remote())
    after, settled = stats["release_calls"], stats["released_before_handoff"] - settled_before
    # Every release of the caller's own was settled by the placement actor (its hand-off still waiting)
    # or went through the shard calls (the other tenant's id does neither: the ownership check refuses
    # it first). The 24 RUNNING ones went to their shard.
    shard_items = sum(x["items"] for x in after) - sum(x["items"] for x in before)
    assert shard_items + settled == len(ids) and shard_items >= 24
    for a in ids:
        tenant.wait_state(a, {pb.ALLOCATION_STATE_RELEASED}, 60)
    held = wait_capacity_back(control_plane, ids)
    assert held == [], f"capacity of {len(held)} released allocation(s) still held"
    assert other.get(theirs).state in (pb.ALLOCATION_STATE_PLACED, pb.ALLOCATION_STATE_RUNNING)


def test_a_shard_releases_what_no_node_saw_in_one_commit(control_plane, tenant):
    """A release that reaches the shard before the allocation's hand-off (the API sends it there when
    the placement actor cannot settle it itself) finds no Prepare sent and none on its way: PLACED →
    RELEASING → RELEASED in one commit, no Cleanup, and the capacity goes back."""
    import ray

    from actors.placement import shard_of

    shards = control_plane.alloc_shards
    chained, ids = [], []
    for _ in range(3):
        resp = tenant.place_batch([Client.request(rid(), gpu_milli=10, node_selector=ZONE) for _ in range(20)])
        batch = [r.allocation for r in resp.results if r.HasField("allocation")]
        assert len(batch) == 20, resp
        ids += [a.allocation_id for a in batch]
        groups: dict[int, list] = {}
        for a in batch:
            groups.setdefault(shard_of(a.allocation_id, len(shards)), []).append((a.allocation_id, a.tenant_id))
        # Straight to the shards, at once: most hand-offs are still waiting in the placement actor.
        refs = {k: shards[k].release_owned_many.remote(items) for k, items in groups.items()}
        for k, ref in refs.items():
            for (aid, _), row in zip(groups[k], ray.get(ref)):
                assert row.state.name in ("RELEASING", "RELEASED"), row
                if row.state.name == "RELEASED":
                    chained.append((aid, row.version))
    assert chained, "no release reached a shard before its hand-off"
    for aid, version in chained:
        evs = q(control_plane, "SELECT from_state, to_state, version FROM control.allocation_events"
                               " WHERE allocation_id = %s AND version > 2 ORDER BY event_id", aid)
        assert evs == [("PLACED", "RELEASING", version - 1), ("RELEASING", "RELEASED", version)]
    for a in ids:
        tenant.wait_state(a, {pb.ALLOCATION_STATE_RELEASED}, 60)
    held = wait_capacity_back(control_plane, ids)
    assert held == [], f"capacity of {len(held)} released allocation(s) still held"


def test_releases_racing_each_other_and_the_hand_off_release_each_allocation_once(control_plane, tenant):
    """Unary Releases (two per allocation) and a ReleaseBatch of the same allocations, all at once,
    while their hand-offs wait, go out or land: the placement actor's settling, the shards' one-commit
    release and their usual path race for each allocation. Each is released exactly once (one event
    into RELEASING, one into RELEASED), every answer is a released row or a clean conflict answer,
    the capacity comes back and nothing is left on a node."""
    import concurrent.futures as cf

    resp = tenant.place_batch([Client.request(rid(), gpu_milli=10, node_selector=ZONE) for _ in range(60)])
    ids = [r.allocation.allocation_id for r in resp.results if r.HasField("allocation")]
    assert len(ids) == 60, resp

    def one(a):
        try:
            return tenant.release(a).state
        except grpc.RpcError as err:
            return err.code()

    def batch():
        return [r.allocation.state if r.HasField("allocation") else r.error.code
                for r in tenant.release_batch(ids).results]

    with cf.ThreadPoolExecutor(16) as ex:
        futs = [ex.submit(batch)] + [ex.submit(one, a) for a in ids + ids[::-1]]
        answers = futs[0].result() + [f.result() for f in futs[1:]]
    done = {pb.ALLOCATION_STATE_RELEASING, pb.ALLOCATION_STATE_RELEASED}
    assert all(x in done for x in answers), sorted({str(x) for x in answers if x not in done})
    for a in ids:
        tenant.wait_state(a, {pb.ALLOCATION_STATE_RELEASED}, 60)
    counts = dict(q(control_plane, "SELECT to_state, count(*) FROM control.allocation_events"
                                   " WHERE allocation_id = ANY(%s::uuid[]) AND to_state IN ('RELEASING', 'RELEASED')"
                                   " GROUP BY to_state", ids))
    assert counts == {"RELEASING": 60, "RELEASED": 60}
    assert wait_capacity_back(control_plane, ids) == []
    _nothing_left_on_the_nodes(control_plane)
