"""fgd-balanced: its CPU-stranding term, its online workload model, and the placements they lead to."""
from __future__ import annotations

import numpy as np
import pytest

from scheduler import Assignment, PolicyName, Request
from scheduler.frag import OnlineWorkload, TaskShape, typical_shapes
from scheduler.plugins import score_fgd_balanced as balanced
from sched_helpers import engine, node

K12 = 1000 / 12_000          # one GPU per 12 CPU cores


@pytest.mark.parametrize("gpu_free, cpu_free, gpu_taken, cpu_taken, k, expected", [
    # CPU taken from a node whose 8 free GPUs need all of its 96 cores: 12 cores strand one GPU
    (8000, 96_000, 0, 12_000, K12, 1000.0),
    # the same CPU from a node with no free GPU strands nothing
    (0, 20_000, 0, 12_000, K12, 0.0),
    # a whole GPU with exactly its share of CPU keeps the node balanced
    (8000, 96_000, 1000, 12_000, K12, 0.0),
    # a GPU task with little CPU on a node short of CPU uses GPU that would have been stranded: negative
    (2000, 12_000, 1000, 3000, K12, -750.0),
    # plenty of CPU left: nothing strands either way
    (2000, 104_000, 1000, 24_000, K12, 0.0),
    # a CPU-heavy task on a node at the margin strands GPU beyond what it takes
    (8000, 96_000, 1000, 24_000, K12, 1000.0),
])
def test_stranding_growth_table(gpu_free, cpu_free, gpu_taken, cpu_taken, k, expected):
    """ΔS = growth of the GPU milli that the node's free CPU cannot feed, per the table."""
    got = balanced.stranding_growth(np.array([gpu_free]), np.array([cpu_free]), gpu_taken, cpu_taken, k)
    assert got[0] == pytest.approx(expected)


def _engine(nodes, used, order, policy=PolicyName.FGD_BALANCED, history=()):
    """Engine over ``nodes`` with ``used`` = {node: (whole GPUs, CPU milli)} already allocated and
    ``history`` = task shapes observed before (the arrivals the policy has seen)."""
    e = engine(policy, nodes)
    e.set_node_order(order)
    for nid, (gpus, cpu) in used.items():
        e.restore(f"pre-{nid}", Request(key=f"pre-{nid}", num_gpu=max(gpus, 0), cpu_milli=cpu),
                  [Assignment(nid, tuple(range(gpus)), 1000 if gpus else 0, cpu, 0)])
    w = balanced.workload(e)
    for s in history:
        w.observe(s)
    return e


GPU12 = TaskShape(12_000, 1, 1000)


@pytest.mark.parametrize("case, nodes, used, order, req, fgd_node, ours_node", [
    ("CPU-only task goes where no free GPU needs the CPU",
     [node("free", gpus=8, cpu=96_000), node("full", gpus=8, cpu=96_000)], {"full": (8, 76_000)},
     ["free", "full"], Request(key="r", cpu_milli=16_000), "free", "full"),
    ("CPU-heavy GPU task goes to the CPU-rich node",
     [node("g2", gpus=8, cpu=96_000), node("t4", gpus=2, cpu=104_000)], {},
     ["g2", "t4"], Request(key="r", num_gpu=1, cpu_milli=24_000), "g2", "t4"),
    ("GPU task with little CPU goes to the node short of CPU (FGD agrees: its GPUs fit no typical task)",
     [node("rich", gpus=2, cpu=104_000), node("poor", gpus=2, cpu=8000)], {},
     ["rich", "poor"], Request(key="r", num_gpu=1, cpu_milli=3000), "poor", "poor"),
])
def test_placements_table(case, nodes, used, order, req, fgd_node, ours_node):
    """Where FGD (same history) and fgd-balanced put a task, per the table."""
    hist = [GPU12] * 20
    ours = _engine(nodes, used, order, history=hist).place(req)
    assert ours.placed and ours.assignments[0].node_id == ours_node, case
    # FGD's gradient against the same typical tasks (λ = 0): where they differ, the term made the choice
    e = _engine(nodes, used, order, history=hist)
    e.policy_options = {"strand": 0.0}
    d = e.place(req)
    assert d.placed and d.assignments[0].node_id == fgd_node, case


def test_online_workload_learns_only_what_arrived_and_refreshes_rarely():
    """The typical tasks are those of the arrivals so far; the model is rebuilt at 1, g, g², … arrivals."""
    w = OnlineWorkload(refresh_growth=2, refresh_max=8)
    a, b = TaskShape(4000, 1, 500), TaskShape(12_000, 1, 1000)
    w.observe(a)
    m1 = w.model({"H100": 0}, 8)
    assert [s for s, _ in m1.typical] == [a]
    w.observe(b)                                  # arrival 2: a refresh point
    m2 = w.model({"H100": 0}, 8)
    assert m2 is not m1 and {s for s, _ in m2.typical} == {s for s, _ in typical_shapes([a, b])}
    w.observe(b)                                  # arrival 3: not a refresh point, the model is kept
    assert w.model({"H100": 0}, 8) is m2
    for _ in range(13):                           # arrivals 4, 8 and 16 refresh (16 = 8 + refresh_max)
        w.observe(b)
    assert w._next_refresh == 24
    assert w.model({"H100": 0, "A100": 1}, 8) is not m2    # a new GPU model also rebuilds
    d = OnlineWorkload()                          # default: 1, 8, 64, 512, 4096, then every 4096
    points = []
    for i in range(1, 9000):
        before = d._next_refresh
        d.observe(a)
        if d._next_refresh != before:
            points.append(i)
    assert points == [1, 8, 64, 512, 4096, 8192]


def test_gpu_per_cpu_counts_part_of_the_cpu_only_demand():
    """k = GPU milli of GPU tasks / (their CPU + α·CPU of CPU-only tasks); 0 before any GPU task."""
    w = OnlineWorkload()
    w.observe(TaskShape(10_000, 0, 0))
    assert w.gpu_per_cpu(0.4) == 0.0
    w.observe(TaskShape(8000, 2, 1000))
    assert w.gpu_per_cpu(0.0) == pytest.approx(2000 / 8000)
    assert w.gpu_per_cpu(0.4) == pytest.approx(2000 / 12_000)


def test_policy_is_chosen_by_configuration_and_learns_from_its_own_arrivals():
    """'fgd-balanced' parses as a policy, is the best-quality default, and each engine learns separately."""
    from scheduler import BEST_QUALITY_POLICY

    assert PolicyName.parse("fgd-balanced") is PolicyName.FGD_BALANCED is BEST_QUALITY_POLICY
    e1 = engine(PolicyName.FGD_BALANCED, [node("n0"), node("n1")])
    e2 = engine(PolicyName.FGD_BALANCED, [node("n0"), node("n1")])
    for i in range(5):
        assert e1.place(Request(key=f"t{i}", num_gpu=1, cpu_milli=4000)).placed
    assert balanced.workload(e1).arrived == 5 and balanced.workload(e2).arrived == 0
    e1.check_invariants()
