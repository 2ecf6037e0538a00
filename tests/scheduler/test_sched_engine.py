"""Engine API behaviour: placement, gangs, topology, quotas, health, explanations, restore, queue, preemption."""
from __future__ import annotations


import pytest

from scheduler import Assignment, PolicyName, Reason, Request, SchedulerError, Topology
from sched_helpers import engine, node

ALL = list(PolicyName)


@pytest.mark.parametrize("policy", ALL)
def test_whole_gpu_request_gets_distinct_free_gpus(policy):
    """Every policy gives a 4-GPU request four distinct, entirely free GPUs on one node."""
    e = engine(policy, [node("a"), node("b")])
    d = e.place(Request(key="k", num_gpu=4, gpu_milli=1000, cpu_milli=1000, memory_mib=10))
    assert d.placed and len(d.assignments) == 1
    a = d.assignments[0]
    assert len(set(a.gpu_indices)) == 4 and a.gpu_milli == 1000
    free = e.snapshot_free()[a.node_id]["gpu_milli"]
    assert sorted(free[g] for g in a.gpu_indices) == [0, 0, 0, 0]
    e.check_invariants()


@pytest.mark.parametrize("policy", ALL)
def test_gang_is_all_or_nothing(policy):
    """A gang that cannot fully fit leaves the free state exactly as it was."""
    e = engine(policy, [node("a", gpus=4), node("b", gpus=4)])
    before = e.snapshot_free()
    d = e.place(Request(key="g", num_gpu=4, gpu_milli=1000, replicas=3))
    assert not d.placed and d.assignments == ()
    assert e.snapshot_free() == before
    assert Reason.GANG_INCOMPLETE in d.reasons
    ok = e.place(Request(key="g2", num_gpu=4, gpu_milli=1000, replicas=2))
    assert ok.placed and {a.node_id for a in ok.assignments} == {"a", "b"}
    e.check_invariants()


def test_same_node_and_spread_topologies():
    """SAME_NODE keeps all replicas on one node; SPREAD puts each on a different node."""
    e = engine(PolicyName.BEST_FIT, [node("a"), node("b"), node("c")])
    d = e.place(Request(key="s", num_gpu=2, gpu_milli=1000, replicas=3, topology=Topology.SAME_NODE))
    assert d.placed and len({a.node_id for a in d.assignments}) == 1
    assert len({g for a in d.assignments for g in a.gpu_indices}) == 6
    d2 = e.place(Request(key="p", num_gpu=1, gpu_milli=1000, replicas=3, topology=Topology.SPREAD))
    assert d2.placed and len({a.node_id for a in d2.assignments}) == 3
    d3 = e.place(Request(key="q", num_gpu=1, gpu_milli=1000, replicas=4, topology=Topology.SPREAD))
    assert not d3.placed and Reason.TOPOLOGY in d3.reasons


def test_same_rack_gang_stays_in_one_rack():
    """SAME_RACK places every replica on nodes sharing one rack label."""
    e = engine(PolicyName.BEST_FIT, [node("a", labels={"rack": "r1"}), node("b", labels={"rack": "r1"}),
                                     node("c", labels={"rack": "r2"})])
    d = e.place(Request(key="r", num_gpu=8, gpu_milli=1000, replicas=2, topology=Topology.SAME_RACK))
    assert d.placed and {a.node_id for a in d.assignments} == {"a", "b"}


def test_nvlink_island_explanation_names_largest_island():
    """An island request that cannot fit says how large the largest free island is and why nodes failed."""
    e = engine(PolicyName.BEST_FIT, [node("a", islands=2), node("b", model="A100")])
    d = e.place(Request(key="i", num_gpu=8, gpu_milli=1000, gpu_models=("H100",),
                        topology=Topology.SAME_NVLINK_ISLAND))
    assert not d.placed
    assert "largest free NVLink island has 4" in d.explanation
    assert d.reasons[Reason.GPU_MODEL] == 1 and d.reasons[Reason.NVLINK_ISLAND] == 1
    assert "1 node rejected for" in d.explanation
    d2 = e.place(Request(key="j", num_gpu=4, gpu_milli=1000, topology=Topology.SAME_NVLINK_ISLAND,
                         gpu_models=("H100",)))
    islands = {g // 4 for g in d2.assignments[0].gpu_indices}
    assert d2.placed and len(islands) == 1


def test_fractional_shares_pack_one_gpu():
    """Shares that sum to at most 1000 land on the same GPU under best fit; a 1001st milli does not fit."""
    e = engine(PolicyName.BEST_FIT, [node("a", gpus=1)])
    for i, m in enumerate([500, 300, 200]):
        assert e.place(Request(key=f"s{i}", gpu_milli=m, num_gpu=1)).placed
    d = e.place(Request(key="x", gpu_milli=1, num_gpu=1))
    assert not d.placed and d.reasons == {Reason.GPU_SHARE: 1}
    e.release("s1")
    assert e.place(Request(key="y", gpu_milli=300, num_gpu=1)).placed
    e.check_invariants()

def test_random_policy_spreads_shares_over_the_gpus_that_fit():
    """Random picks the GPU of a sharing task at random among those with room (the paper's Random runs with
    random GPU selection); best fit stacks the same shares onto the fullest GPU that fits."""
    placed_gpus = {}
    for policy in (PolicyName.RANDOM, PolicyName.BEST_FIT):
        e = engine(policy, [node("a", gpus=8)], seed=7)
        big = e.place(Request(key="big", gpu_milli=900, num_gpu=1)).assignments[0].gpu_indices[0]
        gpus = [e.place(Request(key=f"s{i}", gpu_milli=200, num_gpu=1)).assignments[0].gpu_indices[0]
                for i in range(12)]
        assert big not in gpus  # 100 free there: too small for 200
        e.check_invariants()
        placed_gpus[policy] = gpus
    assert len(set(placed_gpus[PolicyName.RANDOM])) >= 4
    assert len(set(placed_gpus[PolicyName.BEST_FIT])) == 3  # five shares of 200 fill a GPU, then the next



@pytest.mark.parametrize("policy", [PolicyName.FAST_BEST_FIT, PolicyName.BEST_FIT])
def test_quota_per_model_and_star(policy):
    """A tenant never exceeds its per-model quota nor its all-model quota; other tenants are unaffected."""
    e = engine(policy, [node("a", model="H100"), node("b", model="A100")])
    e.set_quota("t", "H100", 2000)
    e.set_quota("t", "*", 3000)
    assert e.place(Request(key="1", tenant="t", num_gpu=2, gpu_milli=1000, gpu_models=("H100",))).placed
    d = e.place(Request(key="2", tenant="t", num_gpu=1, gpu_milli=1000, gpu_models=("H100",)))
    assert not d.placed and Reason.QUOTA_EXCEEDED in d.reasons
    assert e.place(Request(key="3", tenant="t", num_gpu=1, gpu_milli=1000)).placed  # lands on A100
    assert not e.place(Request(key="4", tenant="t", gpu_milli=10, num_gpu=1)).placed
    assert e.place(Request(key="5", tenant="other", num_gpu=6, gpu_milli=1000)).placed
    e.check_invariants()


def test_unschedulable_node_and_unhealthy_gpu_are_not_offered():
    """A cordoned node and a quarantined GPU receive no new placements."""
    e = engine(PolicyName.FAST_BEST_FIT, [node("a", gpus=2), node("b", gpus=2)])
    e.set_node_schedulable("a", False)
    e.set_gpu_healthy("b", 0, False)
    d = e.place(Request(key="x", num_gpu=1, gpu_milli=1000))
    assert d.placed and d.assignments[0].node_id == "b" and d.assignments[0].gpu_indices == (1,)
    d2 = e.place(Request(key="y", num_gpu=1, gpu_milli=1000))
    assert not d2.placed and d2.reasons[Reason.NODE_UNSCHEDULABLE] == 1
    e.check_invariants()


def test_add_remove_node_rules():
    """Re-adding the same spec is a no-op, a conflicting spec raises, and only an empty node can be removed."""
    e = engine(PolicyName.BEST_FIT, [node("a")])
    e.add_node(node("a"))
    with pytest.raises(SchedulerError):
        e.add_node(node("a", gpus=4))
    e.place(Request(key="k", num_gpu=1, gpu_milli=1000))
    with pytest.raises(SchedulerError):
        e.remove_node("a")
    assert e.release("k") is True and e.release("k") is False
    e.remove_node("a")
    assert e.snapshot_free() == {}


def test_explain_reserves_nothing():
    """explain() answers what place() would do without changing the free state."""
    e = engine(PolicyName.FGD, [node("a")])
    before = e.snapshot_free()
    d = e.explain(Request(key="k", num_gpu=3, gpu_milli=1000))
    assert d.placed and e.snapshot_free() == before and "k" not in e.allocs


def test_restore_rebuilds_100k_allocations_exactly():
    """100k restores of known allocations rebuild the exact free state (its time: benchmarks/recovery.py)."""
    nodes = [node(f"n{i}") for i in range(12_500)]
    e = engine(PolicyName.FAST_BEST_FIT, nodes)
    for i in range(100_000):
        n, g = divmod(i, 8)
        e.restore(f"a{i}", Request(key=f"a{i}", num_gpu=1, gpu_milli=1000, cpu_milli=100),
                  (Assignment(f"n{n}", (g,), 1000, 100, 0),))
    free = e.snapshot_free()
    assert all(f["gpu_milli"] == [0] * 8 for f in free.values()), "every GPU of the 12,500 nodes is taken"
    assert e.place(Request(key="x", num_gpu=1, gpu_milli=1000)).placed is False
    with pytest.raises(SchedulerError):
        e.restore("a0", Request(key="a0", num_gpu=1, gpu_milli=1000), (Assignment("n0", (0,), 1000, 0, 0),))


def test_queue_orders_by_priority_then_fair_share():
    """schedule_pending serves higher priority first, then the tenant with the smaller share."""
    e = engine(PolicyName.BEST_FIT, [node("a", gpus=2)])
    assert e.place(Request(key="hog", tenant="t1", num_gpu=1, gpu_milli=1000)).placed
    e.enqueue(Request(key="t1-next", tenant="t1", num_gpu=1, gpu_milli=1000))
    e.enqueue(Request(key="t2-first", tenant="t2", num_gpu=1, gpu_milli=1000))
    e.enqueue(Request(key="vip", tenant="t1", num_gpu=1, gpu_milli=1000, priority=5))
    ds = e.schedule_pending()
    assert [d.key for d in ds if d.placed] == ["vip"]
    e.release("hog")
    ds = e.schedule_pending()
    assert [d.key for d in ds if d.placed] == ["t2-first"]
    assert e.pending() == ["t1-next"]
    assert e.dequeue("t1-next") and e.pending() == []


def test_preemption_picks_least_lost_gpu_time_and_holds_capacity():
    """Victims are the lower-priority allocations losing least GPU-time; their capacity waits for the preemptor."""
    e = engine(PolicyName.BEST_FIT, [node("a", gpus=2)])
    assert e.place(Request(key="old", num_gpu=1, gpu_milli=1000), now_s=0).placed
    assert e.place(Request(key="new", num_gpu=1, gpu_milli=1000), now_s=90).placed
    hi = Request(key="hi", num_gpu=1, gpu_milli=1000, priority=10)
    d = e.place(hi, preempt=True, now_s=100)
    assert not d.placed and d.victims == ("new",)
    e.release("new")
    # the freed GPU is held: another request cannot take it
    assert not e.place(Request(key="thief", num_gpu=1, gpu_milli=1000, priority=100)).placed
    e.check_invariants()
    d2 = e.place(hi, now_s=101)
    assert d2.placed and "hi" not in e.holds
    e.check_invariants()
    same = e.place(Request(key="peer", num_gpu=1, gpu_milli=1000, priority=10), preempt=True, now_s=102)
    assert not same.placed and same.victims == ("old",)


def test_invalid_and_duplicate_requests_are_answered_not_raised():
    """Bad requests and reused keys come back as decisions with a named reason."""
    e = engine(PolicyName.BEST_FIT, [node("a")])
    assert e.place(Request(key="b", num_gpu=2, gpu_milli=500)).reasons == {Reason.INVALID_REQUEST: 1}
    assert e.place(Request(key="k", num_gpu=1, gpu_milli=1000)).placed
    assert e.place(Request(key="k", num_gpu=1, gpu_milli=1000)).reasons == {Reason.DUPLICATE_KEY: 1}
