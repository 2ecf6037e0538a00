"""NVLink-island requests under the default policy go through its index: every placement lands on one
island of one node, a request is refused only when no node has that many free GPUs on one island
(with the CPU and memory), and the refusal is still explained by the pipeline."""
from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler import PolicyName, Request
from scheduler.types import MILLI, Reason, Topology
from tests.scheduler.sched_helpers import engine, node


def _fits_somewhere(e, num: int, cpu: int) -> bool:
    """Brute force over the lists: a schedulable node with ``num`` free healthy GPUs on one island."""
    c = e.cluster
    for n in range(len(c.ids)):
        if not (c.alive[n] and c.schedulable[n]) or c.cpu_free[n] < cpu:
            continue
        per: dict[int, int] = {}
        for g, f in enumerate(c.gpu_free[n]):
            if f == MILLI and c.gpu_healthy[n][g]:
                per[c.gpu_island[n][g]] = per.get(c.gpu_island[n][g], 0) + 1
        if max(per.values(), default=0) >= num:
            return True
    return False


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_island_requests_land_on_one_island_and_are_refused_only_when_none_fits(seed):
    rng = random.Random(seed)
    nodes = [node(f"n{i}", gpus=8, islands=rng.choice([1, 2, 4]), cpu=rng.choice([8_000, 64_000]))
             for i in range(rng.randint(2, 12))]
    e = engine(PolicyName.FAST_BEST_FIT, nodes)
    live: list[str] = []
    for i in range(150):
        r = rng.random()
        if r < 0.25 and live:
            e.release(live.pop(rng.randrange(len(live))))
            continue
        if r < 0.3:
            e.set_gpu_healthy(f"n{rng.randrange(len(nodes))}", rng.randrange(8), rng.random() < 0.6)
            continue
        if r < 0.6:  # background load that fragments the islands
            d = e.place(Request(key=f"b{i}", num_gpu=rng.choice([1, 1, 2, 3]), cpu_milli=1000, memory_mib=1024))
        else:
            num = rng.choice([2, 3, 4, 8])
            feasible = _fits_somewhere(e, num, 1000)
            d = e.place(Request(key=f"i{i}", num_gpu=num, cpu_milli=1000, memory_mib=1024,
                                topology=Topology.SAME_NVLINK_ISLAND))
            assert d.placed == feasible, (num, d.explanation)
            if d.placed:
                (a,) = d.assignments
                n = e.cluster.index[a.node_id]
                assert len(a.gpu_indices) == num
                assert len({e.cluster.gpu_island[n][g] for g in a.gpu_indices}) == 1
            else:
                assert Reason.NVLINK_ISLAND in d.reasons or Reason.GPU_COUNT in d.reasons, d.reasons
                assert "NVLink island" in d.explanation or "GPU" in d.explanation
        if d.placed:
            live.append(d.key)
        e.check_invariants()


def test_the_smallest_fitting_island_is_used():
    """On a node whose islands hold 3 and 4 free GPUs, a 3-GPU island request takes the island of 3."""
    e = engine(PolicyName.FAST_BEST_FIT, [node("a", gpus=8, islands=2)])  # islands {0..3}, {4..7}
    assert e.place(Request(key="x", num_gpu=1, cpu_milli=1, memory_mib=1, gpu_models=("H100",))).placed
    d = e.place(Request(key="y", num_gpu=3, cpu_milli=1, memory_mib=1, topology=Topology.SAME_NVLINK_ISLAND))
    assert d.placed
    taken = set(e.allocs["x"].assignments[0].gpu_indices)
    island_of_x = {0, 1, 2, 3} if taken <= {0, 1, 2, 3} else {4, 5, 6, 7}
    assert set(d.assignments[0].gpu_indices) <= island_of_x
