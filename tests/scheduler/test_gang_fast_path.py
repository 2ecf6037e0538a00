"""Gangs with no topology constraint under the default policy go through its index: each replica is
placed best fit, reserving as it goes, all or nothing, and a gang the index cannot complete is given
back in full and left to the pipeline, which places it or explains why not."""
from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler import PolicyName, Request
from scheduler.types import Reason, Topology
from tests.scheduler.sched_helpers import engine, node


def _nodes(rng: random.Random):
    return [node(f"n{i}", gpus=rng.choice([4, 8]), cpu=rng.choice([16_000, 64_000]),
                 model=rng.choice(["H100", "H100", "A100"])) for i in range(rng.randint(2, 10))]


def _shape(rng: random.Random) -> dict:
    if rng.random() < 0.3:
        return dict(num_gpu=1, gpu_milli=rng.choice([250, 500, 700]))
    return dict(num_gpu=rng.choice([1, 2, 4, 8]), gpu_milli=1000)


def _best_fit_replicas(before: dict, nodes, assignments, num: int, cpu: int, models) -> None:
    """Replay the gang's assignments on the free state before it, in order: each whole-GPU replica is on
    a node with the fewest entirely free GPUs among the nodes that could take it at that point."""
    free = {n: dict(v, gpu_milli=list(v["gpu_milli"])) for n, v in before.items()}
    model = {spec.node_id: spec.gpus[0].model for spec in nodes}
    for a in assignments:
        def whole(n):
            return sum(1 for f in free[n]["gpu_milli"] if f == 1000)
        fits = [n for n in free if whole(n) >= num and free[n]["cpu_milli"] >= cpu
                and (not models or model[n] in models)]
        assert a.node_id in fits and whole(a.node_id) == min(whole(n) for n in fits), (a, fits)
        for g in a.gpu_indices:
            assert free[a.node_id]["gpu_milli"][g] == 1000
            free[a.node_id]["gpu_milli"][g] = 0
        free[a.node_id]["cpu_milli"] -= cpu


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_gangs_are_best_fit_replica_by_replica_and_all_or_nothing(seed):
    rng = random.Random(seed)
    nodes = _nodes(rng)
    e = engine(PolicyName.FAST_BEST_FIT, nodes)
    live: list[str] = []
    placed_gangs = 0
    for i in range(120):
        if live and rng.random() < 0.35:
            assert e.release(live.pop(rng.randrange(len(live))))
            continue
        shape = dict(_shape(rng), cpu_milli=rng.choice([0, 1000, 8000]), memory_mib=1024)
        replicas = rng.randint(1, 4)
        models = rng.choice([(), ("H100",), ("A100",)])
        before = e.snapshot_free()
        d = e.place(Request(key=f"g{i}", replicas=replicas, gpu_models=models, **shape))
        if d.placed:
            assert len(d.assignments) == replicas
            live.append(f"g{i}")
            placed_gangs += replicas > 1
            if shape["gpu_milli"] == 1000:
                _best_fit_replicas(before, nodes, d.assignments, shape["num_gpu"], shape["cpu_milli"], models)
        else:
            assert d.assignments == () and e.snapshot_free() == before  # nothing held back
            assert d.explanation and d.reasons
            if replicas > 1 and Reason.GANG_INCOMPLETE in d.reasons:
                assert "replicas fit" in d.explanation
            # The pipeline agrees: another policy's exhaustive search finds no room for the whole gang.
            probe = engine(PolicyName.BEST_FIT, nodes)
            for key, al in e.allocs.items():
                probe.restore(key, al.req, al.assignments)
            assert not probe.place(Request(key="probe", replicas=replicas, gpu_models=models, **shape)).placed
        e.check_invariants()
    assert placed_gangs > 0


def test_a_gang_the_index_cannot_complete_is_given_back_and_explained():
    e = engine(PolicyName.FAST_BEST_FIT, [node("a", gpus=4), node("b", gpus=4)])
    assert e.place(Request(key="x", num_gpu=2, gpu_milli=1000)).placed
    before = e.snapshot_free()
    d = e.place(Request(key="g", num_gpu=4, gpu_milli=1000, replicas=2))
    assert not d.placed and e.snapshot_free() == before
    assert Reason.GANG_INCOMPLETE in d.reasons and "only 1 of 2 replicas fit" in d.explanation
    ok = e.place(Request(key="g2", num_gpu=2, gpu_milli=1000, replicas=3, topology=Topology.ANY))
    assert ok.placed and sorted(a.node_id for a in ok.assignments) == ["a", "b", "b"]
    e.check_invariants()
