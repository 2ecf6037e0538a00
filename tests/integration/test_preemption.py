"""Preemption through the running control plane: real Postgres, Ray, gRPC and simulated daemons.

A higher-priority wait=true request that does not fit evicts lower-priority
RUNNING allocations (RUNNING → RELEASING, event ``preempted``, billing stopped
at the decision), their capacity is held for it until cleanup returns it, and
it is placed there: all replicas or none. Who may preempt whom is
actors.placement.may_preempt.
"""
from __future__ import annotations

import contextlib
import time

import pytest

from gpuaas.client import Client
from gpuaas.v1 import common_pb2 as pb
from tests.faults.harness import HOLDS_SQL, flush_ledger
from tests.integration.conftest import GPUS, NODES, give_back, q, rid, tenant_fixture

QUEUED, RUNNING, RELEASED = pb.ALLOCATION_STATE_QUEUED, pb.ALLOCATION_STATE_RUNNING, pb.ALLOCATION_STATE_RELEASED
ZONE = {"zone": "sim-a"}   # the session's simulated nodes only (fault scenarios add other pools)
CAPACITY = NODES * GPUS


# ---------------------------------------------------------------- helpers

other_tenant = tenant_fixture()


def fill(c: Client, n: int, priority: int, **fields) -> list[pb.Allocation]:
    out = [c.place(rid(), gpu_count=1, priority=priority, node_selector=ZONE, **fields) for _ in range(n)]
    return [c.wait_state(a.allocation_id, {RUNNING}, 30) for a in out]


def preempted_events(cp, tenant_id: str) -> dict[str, tuple]:
    """allocation id → (from_state, to_state, reason, at) of its ``preempted`` event."""
    return {str(a): (f, t, r, at) for a, f, t, r, at in q(
        cp, "SELECT allocation_id, from_state, to_state, reason, at FROM control.allocation_events"
            " WHERE tenant_id = %s AND event = 'preempted'", tenant_id)}


def double_booked(cp) -> list:
    return q(cp, "SELECT a->>'node_id', g::int, sum((a->>'gpu_milli')::int) FROM control.allocations al,"
                 " jsonb_array_elements(al.assignments) a, jsonb_array_elements_text(a->'gpu_indices') g"
                 " WHERE " + HOLDS_SQL + " GROUP BY 1, 2 HAVING sum((a->>'gpu_milli')::int) > 1000")


def gpus_of(a: pb.Allocation) -> set[tuple[str, int]]:
    return {(x.node_id, g) for x in a.assignments for g in x.gpu_indices}


def wait_preempted(cp, tenant_id: str, n: int, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        ev = preempted_events(cp, tenant_id)
        if len(ev) >= n or time.monotonic() > deadline:
            return ev
        time.sleep(0.1)


def assert_billing_stopped_at_preemption(cp, victims: dict[str, tuple]) -> None:
    """Ledger: the stop meter is at the preempted event's time, and usage = gpu_milli × RUNNING interval."""
    flush_ledger(cp.ledger)
    time.sleep(cp.cfg.meter_interval_s * 1.5)   # a metering tick later, nothing more is billed
    flush_ledger(cp.ledger)
    for aid, (_, _, _, at) in victims.items():
        (since, stopped, milli), = q(cp, "SELECT running_since, stopped_at, gpu_milli_total FROM"
                                         " control.allocations WHERE allocation_id = %s", aid)
        assert stopped == at, f"{aid}: stopped_at {stopped} is not the preemption time {at}"
        stop_meter = q(cp, "SELECT at, event FROM ledger.meter_events WHERE allocation_id = %s AND kind = 2", aid)
        assert stop_meter == [(at, "preempted")], f"{aid}: stop meter {stop_meter}, preempted at {at}"
        # Net of reversals: an interval closed past the stop before the stop arrived is reversed and
        # re-issued up to the stop (the ledger's late-stop correction).
        billed, last = q(cp, "SELECT coalesce(sum(gpu_milli_us), 0), max(interval_end) FILTER (WHERE kind <> 1"
                             " AND NOT EXISTS (SELECT 1 FROM ledger.usage_entries r WHERE r.reverses_id = u.id))"
                             " FROM ledger.usage_entries u WHERE allocation_id = %s", aid)[0]
        ran_us = round((stopped - since).total_seconds() * 1_000_000)
        assert billed == milli * ran_us, f"{aid}: billed {billed} GPU-milli-µs, ran {milli} × {ran_us} µs"
        assert last == at, f"{aid}: usage until {last}, billing stopped at {at}"


# ---------------------------------------------------------------- engine (no control plane)

@pytest.mark.parametrize("policy", ["FAST_BEST_FIT", "BEST_FIT"])
def test_engine_holds_the_free_part_of_a_preemptors_plan(policy):
    """The free capacity a preemptor's plan counts on is held at once, not only its victims' capacity:
    what is placed while the victims are cleaned up cannot make the preemptor miss, and giving the hold
    up returns everything exactly."""
    from scheduler import PolicyName, Request
    from tests.scheduler.sched_helpers import engine, node

    def one(key, prio=1, milli=1000):
        return Request(key=key, tenant="t", num_gpu=1, gpu_milli=milli, cpu_milli=1000, memory_mib=1024,
                       priority=prio)

    e = engine(PolicyName[policy], [node("a", gpus=4, cpu=8000, mem=8192)])
    for k in ("lo1", "lo2"):
        assert e.place(one(k), now_s=0).placed
    hi = Request(key="hi", tenant="t", num_gpu=4, gpu_milli=1000, cpu_milli=4000, memory_mib=4096, priority=10)
    d = e.place(hi, preempt=True, now_s=10)
    assert not d.placed and set(d.victims) == {"lo1", "lo2"}
    e.check_invariants()
    assert not e.place(one("thief", prio=100, milli=250)).placed, "the two free GPUs are held for the preemptor"
    assert e.place(Request(key="cpu-only", tenant="t", cpu_milli=2000, memory_mib=2048)).placed, \
        "what the preemptor does not need stays free"
    for k in ("lo1", "lo2"):
        e.release(k)
        e.check_invariants()
    assert e.place(hi, now_s=20).placed
    e.check_invariants()
    e.release("hi")
    e.release("cpu-only")
    # giving a hold up returns the held free part too
    for k in ("lo1", "lo2"):
        assert e.place(one(k), now_s=30).placed
    assert e.place(hi, preempt=True, now_s=40).victims
    e.dequeue("hi")
    e.release("lo1")
    e.release("lo2")
    e.check_invariants()
    assert all(f == 1000 for f in e.snapshot_free()["a"]["gpu_milli"])
    assert e.snapshot_free()["a"]["cpu_milli"] == 8000


@pytest.mark.parametrize("policy", ["FAST_BEST_FIT", "BEST_FIT"])
def test_engine_rebuilds_a_preemption_hold_after_a_restart(policy):
    """A fresh engine (the placement actor restarted) restored from the allocations, with the preemptor
    queued again and ``rehold``: the free part of its plan is held again at once and its victims'
    capacity joins the hold as they are released, exactly as in the engine that chose them."""
    from scheduler import PolicyName, Request
    from tests.scheduler.sched_helpers import engine, node

    def one(key):
        return Request(key=key, tenant="t", num_gpu=1, gpu_milli=1000, cpu_milli=1000, memory_mib=1024, priority=1)

    hi = Request(key="hi", tenant="t", num_gpu=4, gpu_milli=1000, cpu_milli=4000, memory_mib=4096, priority=10)
    before = engine(PolicyName[policy], [node("a", gpus=4, cpu=8000, mem=8192)])
    for k in ("lo1", "lo2"):
        assert before.place(one(k), now_s=0).placed
    victims = before.place(hi, preempt=True, now_s=10).victims
    assert set(victims) == {"lo1", "lo2"}

    after = engine(PolicyName[policy], [node("a", gpus=4, cpu=8000, mem=8192)])
    for k in ("lo1", "lo2"):  # still RELEASING: they hold their capacity
        after.restore(k, one(k), before.allocs[k].assignments, now_s=0)
    after.enqueue(hi)
    assert after.rehold(hi, victims)
    assert not after.rehold(hi, victims), "a second rehold of the same preemptor changes nothing"
    after.check_invariants()
    assert after.snapshot_free() == before.snapshot_free()
    assert not after.place(Request(key="thief", tenant="t", num_gpu=1, gpu_milli=250, priority=100)).placed
    for k in victims:
        after.release(k)
        after.check_invariants()
    assert after.place(hi, now_s=20).placed
    after.check_invariants()


# ---------------------------------------------------------------- tests

def test_preemptor_runs_on_freed_gpus_victims_released_billing_stops(control_plane, tenant):
    """A 4-GPU priority-10 request evicts exactly one node's priority-1 allocations, runs on their GPUs;
    an earlier-queued equal-priority request never gets the held capacity; billing stops at the preemption."""
    cp = control_plane
    low = fill(tenant, CAPACITY, priority=1)
    assert not double_booked(cp)
    time.sleep(0.5)   # let the fillers accrue some billed time
    # Equal priority may not preempt; queued first, it must not take the capacity held for the preemptor.
    peer = tenant.place(rid(), gpu_count=1, priority=1, wait=True, queue_timeout_s=120, node_selector=ZONE)
    assert peer.state == QUEUED
    hi = tenant.place(rid(), gpu_count=GPUS, priority=10, wait=True, queue_timeout_s=120, node_selector=ZONE)
    assert hi.state == QUEUED
    got = tenant.wait_state(hi.allocation_id, {RUNNING}, 60)

    victims = preempted_events(cp, tenant.tenant_id)
    assert len(victims) == GPUS, f"expected one node's {GPUS} allocations to be preempted, got {len(victims)}"
    by_id = {a.allocation_id: a for a in low}
    assert set(victims) <= set(by_id)
    assert set().union(*(gpus_of(by_id[v]) for v in victims)) == gpus_of(got), \
        "the preemptor must run on exactly the GPUs its victims gave up"
    for v, (src, dst, reason, _) in victims.items():
        assert (src, dst) == ("RUNNING", "RELEASING") and reason.startswith("preempted by "), (v, src, dst, reason)
        assert tenant.get(v).state == RELEASED
    (placed_reason,), = q(cp, "SELECT reason FROM control.allocation_events WHERE allocation_id = %s"
                              " AND event = 'placed'", hi.allocation_id)
    assert all(v in placed_reason for v in victims), placed_reason
    # nobody else was touched, and the held capacity did not go to the peer queued before the preemptor
    for a in low:
        if a.allocation_id not in victims:
            assert tenant.get(a.allocation_id).state == RUNNING
    time.sleep(2.5)   # a few queue passes
    assert tenant.get(peer.allocation_id).state == QUEUED
    assert tenant.get(hi.allocation_id).state == RUNNING
    assert not preempted_events(cp, tenant.tenant_id).keys() - victims.keys(), "preemption must not loop"
    assert not double_booked(cp)
    assert_billing_stopped_at_preemption(cp, victims)
    assert ray_invariants(cp)


def test_gang_preemptor_gets_every_replica_or_evicts_nobody(control_plane, tenant):
    """A 2×4-GPU spread gang: while no eviction could make it whole nobody is evicted; once it can, it evicts
    exactly the allocations on two nodes and gets both replicas."""
    cp = control_plane
    guard = tenant.place(rid(), gpu_count=1, replicas=NODES, topology=pb.TOPOLOGY_SPREAD, priority=20,
                         node_selector=ZONE)   # one higher-priority GPU on every node
    tenant.wait_state(guard.allocation_id, {RUNNING}, 30)
    low = fill(tenant, CAPACITY - NODES, priority=1)
    gang = tenant.place(rid(), gpu_count=GPUS, replicas=2, topology=pb.TOPOLOGY_SPREAD, priority=10, wait=True,
                        queue_timeout_s=120, node_selector=ZONE)
    assert gang.state == QUEUED
    time.sleep(4.0)   # two victim searches at least
    assert not preempted_events(cp, tenant.tenant_id), "a gang that cannot be made whole must evict nobody"
    assert all(tenant.get(a.allocation_id).state == RUNNING for a in low)
    why = tenant.get(gang.allocation_id)
    assert why.state == QUEUED and "would not make room" in why.pending_explanation, why.pending_explanation

    tenant.release(guard.allocation_id)   # now two whole nodes can be freed
    got = tenant.wait_state(gang.allocation_id, {RUNNING}, 60)
    assert len(got.assignments) == 2 and len({x.node_id for x in got.assignments}) == 2
    assert all(len(x.gpu_indices) == GPUS for x in got.assignments)
    victims = preempted_events(cp, tenant.tenant_id)
    per_node = GPUS - 1
    assert len(victims) == 2 * per_node, f"expected {2 * per_node} victims, got {len(victims)}"
    by_id = {a.allocation_id: a for a in low}
    victim_nodes = {x.node_id for v in victims for x in by_id[v].assignments}
    assert victim_nodes == {x.node_id for x in got.assignments}
    for a in low:
        if a.allocation_id not in victims:
            assert tenant.get(a.allocation_id).state == RUNNING
    assert not double_booked(cp)
    assert_billing_stopped_at_preemption(cp, victims)


def test_who_may_preempt_across_tenants(control_plane, tenant, other_tenant):
    """Across tenants only the preemptible tier (priority < 0) is evicted, only for priority >= 0 work, and the
    victim is the one losing least GPU-time; another tenant's priority-0 work is never touched."""
    cp = control_plane
    ondemand = fill(tenant, CAPACITY - 2, priority=0)
    spot_old = fill(tenant, 1, priority=-2)[0]
    time.sleep(1.0)
    spot_new = fill(tenant, 1, priority=-2)[0]

    # spot does not evict another tenant's spot, whatever the numbers
    s = other_tenant.place(rid(), gpu_count=1, priority=-1, wait=True, queue_timeout_s=60, node_selector=ZONE)
    # a bigger number does not evict another tenant's on-demand work: 3 GPUs on one node need more than spot
    big = other_tenant.place(rid(), gpu_count=3, priority=900, wait=True, queue_timeout_s=60, node_selector=ZONE)
    time.sleep(4.0)
    assert not preempted_events(cp, tenant.tenant_id)
    assert other_tenant.get(s.allocation_id).state == QUEUED
    assert other_tenant.get(big.allocation_id).state == QUEUED
    other_tenant.release(s.allocation_id)
    other_tenant.release(big.allocation_id)

    hi = other_tenant.place(rid(), gpu_count=1, priority=5, wait=True, queue_timeout_s=60, node_selector=ZONE)
    got = other_tenant.wait_state(hi.allocation_id, {RUNNING}, 60)
    victims = preempted_events(cp, tenant.tenant_id)
    assert list(victims) == [spot_new.allocation_id], "the spot allocation that ran least is the victim"
    assert gpus_of(got) == gpus_of(spot_new)
    assert tenant.get(spot_old.allocation_id).state == RUNNING
    assert all(tenant.get(a.allocation_id).state == RUNNING for a in ondemand)
    assert not double_booked(cp)
    assert_billing_stopped_at_preemption(cp, victims)


def ray_invariants(cp) -> bool:
    """The placement actor's own check: per GPU allocated + held + free = capacity, quotas held."""
    import ray

    return ray.get(cp.placement.check_invariants.remote(), timeout=30)


@contextlib.contextmanager
def pool_node_for(cp, tenant):
    """A fresh pool node for one test; afterwards its cleanups succeed again, the tenant gives back what it
    holds and the node goes away."""
    from tests.faults.scenarios import inject, start_pool_node, stop_pool_node

    node = start_pool_node(cp)
    try:
        yield node
    finally:
        try:
            inject(cp, node, {"fault": "cleanup_fail", "times": 0})
        except Exception:  # noqa: BLE001 - the daemon may be gone already
            pass
        give_back(tenant)
        stop_pool_node(cp, node)


def clean_up_by_hand_and_resolve(cp, admin, tenant, node: str, victims) -> None:
    """The operator's way out of RELEASE_FAILED: cleanups work again, the leftovers are cleaned up on the node
    by hand, then each allocation is resolved (→ RELEASED, its GPUs back)."""
    import grpc

    from gpuaas.v1 import node_pb2, node_pb2_grpc
    from tests.faults.scenarios import inject

    inject(cp, node, {"fault": "cleanup_fail", "times": 0})
    (address,), = q(cp, "SELECT address FROM control.nodes WHERE node_id = %s", node)
    with grpc.insecure_channel(address) as ch:
        for v in victims:
            node_pb2_grpc.NodeAgentStub(ch).Cleanup(node_pb2.CleanupRequest(allocation_id=v), timeout=10)
    for v in victims:
        admin.resolve(v, "cleaned by hand")
        tenant.wait_state(v, {RELEASED}, 30)


def test_preemptor_waiting_on_failed_cleanup_is_cancelled_and_its_hold_returned(control_plane, tenant, admin):
    """Victims whose cleanup keeps failing end RELEASE_FAILED: the preemptor waits (nothing else gets the
    capacity), a cancel returns its hold, and the operator's resolve returns the victims' GPUs to the pool."""
    from tests.faults.scenarios import inject, wait_for

    cp = control_plane
    with pool_node_for(cp, tenant) as node:
        pool = {"pool": node}
        low = [tenant.place(rid(), gpu_count=1, priority=1, node_selector=pool) for _ in range(4)]
        for a in low:
            tenant.wait_state(a.allocation_id, {RUNNING}, 30)
        # every cleanup attempt of both victims fails (each retries up to release_attempts_max times)
        inject(cp, node, {"fault": "cleanup_fail", "times": 4 * cp.cfg.release_attempts_max + 10})
        hi = tenant.place(rid(), gpu_count=2, priority=10, wait=True, queue_timeout_s=120, node_selector=pool)
        wait_for(lambda: len(preempted_events(cp, tenant.tenant_id)) == 2, 30, "two victims")
        victims = preempted_events(cp, tenant.tenant_id)
        for v in victims:
            wait_for(lambda: q(cp, "SELECT state FROM control.allocations WHERE allocation_id = %s", v)[0][0]
                     in ("RELEASE_FAILED", "RELEASED"), 30, f"victim {v} out of RELEASING")
            history = q(cp, "SELECT event, to_state, reason FROM control.allocation_events WHERE allocation_id = %s"
                            " ORDER BY event_id", v)
            assert history[-1][1] == "RELEASE_FAILED", history
        waiting = tenant.get(hi.allocation_id)
        assert waiting.state == QUEUED and "preempting 2" in waiting.pending_explanation, waiting.pending_explanation
        assert ray_invariants(cp)

        assert tenant.release(hi.allocation_id).state == pb.ALLOCATION_STATE_CANCELLED
        assert ray_invariants(cp)
        clean_up_by_hand_and_resolve(cp, admin, tenant, node, victims)
        wait_for(lambda: q(cp, "SELECT count(*) FROM control.gpus WHERE node_id = %s AND state = 'READY'", node)
                 == [(4,)], 30, "the quarantined GPUs back in service")
        # the two GPUs are free again, for anyone: an ordinary request takes them without preempting
        again = tenant.place(rid(), gpu_count=2, priority=1, node_selector=pool)
        got = tenant.wait_state(again.allocation_id, {RUNNING}, 30)
        assert gpus_of(got) == set().union(*(gpus_of(a) for a in low if a.allocation_id in victims))
        assert len(preempted_events(cp, tenant.tenant_id)) == 2
        assert not double_booked(cp)
        assert ray_invariants(cp)


def test_preemption_in_flight_survives_a_placement_actor_restart(control_plane, tenant, admin):
    """The placement actor dies while its victim still holds the capacity (its cleanup keeps failing): the
    restarted actor rebuilds the preemption from Postgres (the victim's ``preempted`` event names the
    preemptor), so the preemptor still waits on that capacity, and it runs there once the victim is back."""
    import grpc
    import ray

    from tests.faults.scenarios import inject, wait_for

    cp = control_plane
    with pool_node_for(cp, tenant) as node:
        pool = {"pool": node}
        low = tenant.place(rid(), gpu_count=2, priority=1, node_selector=pool)
        tenant.wait_state(low.allocation_id, {RUNNING}, 30)
        inject(cp, node, {"fault": "cleanup_fail", "times": 4 * cp.cfg.release_attempts_max + 10})
        hi = tenant.place(rid(), gpu_count=4, priority=10, wait=True, queue_timeout_s=120, node_selector=pool)
        ev = wait_preempted(cp, tenant.tenant_id, 1, 30)
        assert list(ev) == [low.allocation_id] and hi.allocation_id in ev[low.allocation_id][2]
        state = lambda: q(cp, "SELECT state FROM control.allocations WHERE allocation_id = %s",  # noqa: E731
                          low.allocation_id)[0][0]
        wait_for(lambda: state() == "RELEASE_FAILED", 30, "the victim to hold its GPUs (cleanup failing)")
        assert "preempting 1" in tenant.get(hi.allocation_id).pending_explanation

        ray.kill(ray.get_actor("placement", namespace="gpuaas"), no_restart=False)

        def explanation():
            try:
                return tenant.get(hi.allocation_id).pending_explanation
            except grpc.RpcError:
                return None  # restarting
        wait_for(lambda: explanation() is None, 10, "the old placement actor to be gone")
        wait_for(lambda: explanation() is not None, 90, "the placement actor to serve again")
        assert "preempting 1" in explanation(), explanation()
        assert ray_invariants(cp)

        # the operator cleans up on the node by hand and resolves: the capacity goes to the preemptor
        clean_up_by_hand_and_resolve(cp, admin, tenant, node, [low.allocation_id])
        got = tenant.wait_state(hi.allocation_id, {RUNNING}, 60)
        assert len(gpus_of(got)) == 4
        assert not double_booked(cp)
        assert ray_invariants(cp)


def test_quota_is_not_bypassed_by_preemption(control_plane, tenant, admin):
    """A tenant at its quota cannot preempt its way past it: the higher-priority request is refused for quota
    (RESOURCE_EXHAUSTED, not queued) and nothing is evicted."""
    import grpc

    cp = control_plane
    admin.set_quota(tenant.tenant_id, "H100", 2000)
    low = fill(tenant, 2, priority=1)
    with pytest.raises(grpc.RpcError) as err:
        tenant.place(rid(), gpu_count=1, priority=10, wait=True, queue_timeout_s=60, node_selector=ZONE)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    time.sleep(1.5)
    assert not preempted_events(cp, tenant.tenant_id)
    assert all(tenant.get(a.allocation_id).state == RUNNING for a in low)
    assert ray_invariants(cp)
