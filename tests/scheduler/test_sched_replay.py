"""A short replay of the real trace (one seed, a slice of `default`) with its accounting checked."""
from __future__ import annotations

from scheduler import PolicyName, replay
from scheduler.trace import load_nodes, load_pods


def test_arrivals_resize_to_1_3x_and_keep_order_per_seed():
    """The arrival list is seeded, reproducible, and its GPU demand lands just under 1.3× the cluster."""
    pods = tuple(load_pods(replay.resolve_workload("default")))
    total = sum(len(n.gpus) for n in load_nodes(replay.NODES_DEFAULT)) * 1000
    a = replay.arrivals(pods, 42, total)
    b = replay.arrivals(pods, 42, total)
    assert [p.name for p in a] == [p.name for p in b]
    demand = sum(p.gpu_demand_milli for p in a)
    assert demand <= 1.3 * total
    assert demand > 1.3 * total - max(p.gpu_demand_milli for p in pods)
    assert [p.name for p in replay.arrivals(pods, 43, total)] != [p.name for p in a]


def test_short_replay_accounting_matches_the_engine():
    """Allocated GPU milli counted by the replay equals what the engine holds; the curve is a percentage."""
    job = (str(replay.resolve_workload("default")), str(replay.NODES_DEFAULT), (), PolicyName.BEST_FIT.value, 42,
           1500)
    r = replay.run_arrivals(job)
    assert r["tasks"] == 1500 and r["placed"] + r["failed"] == 1500
    assert r["allocated_milli"] == r["engine_allocated_milli"] <= r["arrived_milli"]
    filled = [v for v in r["curve"].values() if v is not None]
    assert all(0.0 <= v <= 100.0 for v in filled)
    assert r["decisions_per_s"] > 0


def test_cli_lists_policies(capsys):
    """--list-policies names every PolicyName."""
    assert replay.main(["--list-policies"]) == 0
    out = capsys.readouterr().out
    assert all(p.value in out for p in PolicyName)


def test_time_mode_with_added_nodes_runs_and_reports_waits():
    """--mode time replays arrivals and departures; added nodes enlarge the cluster."""
    job = (str(replay.resolve_workload("default")), str(replay.NODES_DEFAULT), ("10:G2",),
           PolicyName.FAST_BEST_FIT.value, 42, 800, 20)
    r = replay.run_time(job)
    assert r["nodes"] == 1213 + 10 and r["started"] + r["never_started"] == r["tasks"] == 800
    assert r["wait_s_p95"] >= r["wait_s_p50"] >= 0 and r["utilization"]


def test_fragmentation_fast_path_decides_exactly_like_the_full_pipeline():
    """fgd, fgd-plus, fgd-balanced: the memoised free-state path picks the same node and GPUs as filter → score."""
    from scheduler.types import MILLI

    pods = replay._pods(str(replay.resolve_workload("default")))
    nodes = replay._nodes(str(replay.NODES_DEFAULT), ())
    seq = replay.arrivals(pods, 42, sum(len(n.gpus) for n in nodes) * MILLI)[:600]
    for policy in (PolicyName.FGD, PolicyName.FGD_PLUS, PolicyName.FGD_BALANCED):
        fast = replay.make_engine(policy, 42, nodes, pods)
        full = replay.make_engine(policy, 42, nodes, pods)
        full.fragindex = None
        assert fast.fragindex is not None
        for i, p in enumerate(seq):
            r = p.request(key=f"t{i}")
            a, b = fast.place(r), full.place(r)
            assert [(x.node_id, x.gpu_indices) for x in a.assignments] == \
                   [(x.node_id, x.gpu_indices) for x in b.assignments], (policy, i)
        fast.check_invariants()
