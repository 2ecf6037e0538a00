"""The default (indexed) policy's numpy mirrors, used off its fast path (gangs, NVLink-island requests,
explaining a failure): refreshed on use with only the nodes changed since, never stale, and not rebuilt
for every such request."""
from __future__ import annotations

import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler import PolicyName, Request
from scheduler.types import Topology
from tests.scheduler.sched_helpers import engine, node

SHAPES = [dict(num_gpu=1), dict(num_gpu=2), dict(gpu_milli=300), dict(num_gpu=8),
          dict(num_gpu=2, replicas=2, topology=Topology.SAME_RACK),
          dict(num_gpu=4, replicas=2, topology=Topology.SPREAD),
          dict(num_gpu=2, topology=Topology.SAME_NVLINK_ISLAND),
          dict(num_gpu=2, replicas=2, topology=Topology.SAME_NODE),
          dict(num_gpu=16)]  # never fits a node: the failure is explained from the mirrors


def _nodes(n):
    return [node(f"n{i}", islands=2, labels={"rack": f"r{i // 2}"}) for i in range(n)]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), steps=st.integers(20, 120))
def test_mirrors_match_the_lists_after_every_step(seed, steps):
    rng = random.Random(seed)
    e = engine(PolicyName.FAST_BEST_FIT, _nodes(6))
    live: list[str] = []
    for i in range(steps):
        op = rng.random()
        if op < 0.55:
            d = e.place(Request(key=f"r{i}", cpu_milli=1000, memory_mib=1024, **rng.choice(SHAPES)))
            if d.placed:
                live.append(d.key)
        elif op < 0.85 and live:
            e.release(live.pop(rng.randrange(len(live))))
        elif op < 0.92:
            e.set_node_schedulable(f"n{rng.randrange(6)}", rng.random() < 0.7)
        elif op < 0.97:
            e.set_gpu_healthy(f"n{rng.randrange(6)}", rng.randrange(8), rng.random() < 0.7)
        else:
            e.add_node(node(f"x{i}", labels={"rack": "rx"}))  # a new node changes the mirrors' shape
        # check() compares the mirrors, brought up to date, with a fresh build from the lists.
        e.check_invariants()


def test_a_gang_refreshes_the_mirrors_instead_of_rebuilding_them():
    e = engine(PolicyName.FAST_BEST_FIT, _nodes(64))
    gang = dict(num_gpu=2, replicas=2, topology=Topology.SAME_RACK, cpu_milli=1000, memory_mib=1024)
    assert e.place(Request(key="g0", **gang)).placed
    mirrors = e.cluster.arrays()
    for i in range(1, 20):
        assert e.place(Request(key=f"one{i}", num_gpu=1, cpu_milli=1000, memory_mib=1024)).placed  # fast path
        assert e.place(Request(key=f"g{i}", **gang)).placed
        assert e.cluster.arrays() is mirrors  # the same arrays, rows rewritten where nodes changed
    fresh = e.cluster._build_arrays()
    assert all(np.array_equal(fresh[k], mirrors[k]) for k in ("cpu_free", "mem_free", "gfree", "sched", "gusable"))
