"""Property tests over random clusters and request streams, for every policy."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler import PolicyName, Reason, Request, Topology
from sched_helpers import engine, node

MODELS = ("H100", "A100")


@st.composite
def clusters(draw):
    k = draw(st.integers(1, 5))
    return [node(f"n{i}", gpus=draw(st.sampled_from([1, 2, 4, 8])), model=draw(st.sampled_from(MODELS)),
                 cpu=draw(st.integers(1, 8)) * 8000, mem=draw(st.integers(1, 8)) * 32_000,
                 islands=draw(st.sampled_from([1, 2])), labels={"rack": f"r{i % 2}"}) for i in range(k)]


@st.composite
def requests(draw, i):
    share = draw(st.booleans())
    return Request(
        key=f"r{i}", tenant=draw(st.sampled_from(["t1", "t2"])),
        num_gpu=1 if share else draw(st.sampled_from([0, 1, 2, 4, 8])),
        gpu_milli=draw(st.integers(1, 999)) if share else 1000,
        cpu_milli=draw(st.integers(0, 16_000)), memory_mib=draw(st.integers(0, 64_000)),
        gpu_models=draw(st.sampled_from([(), ("H100",), ("A100",), MODELS])),
        replicas=draw(st.integers(1, 3)), topology=draw(st.sampled_from(list(Topology))),
        priority=draw(st.integers(0, 2)))


@st.composite
def scripts(draw):
    n = draw(st.integers(1, 25))
    ops = []
    for i in range(n):
        if i and draw(st.integers(0, 3)) == 0:
            ops.append(("release", f"r{draw(st.integers(0, i - 1))}"))
        ops.append(("place", draw(requests(i))))
    return ops


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run(policy, cl, ops, quotas=()):
    e = engine(policy, cl)
    for t, m, q in quotas:
        e.set_quota(t, m, q)
    decisions = {}
    for op, arg in ops:
        if op == "release":
            e.release(arg)
            decisions.pop(arg, None)
        else:
            before = e.snapshot_free()
            d = e.place(arg)
            decisions[arg.key] = d
            if not d.placed:
                assert e.snapshot_free() == before, "a failed placement changed the free state"
            e.check_invariants()
    return e, decisions


@SETTINGS
@given(cl=clusters(), ops=scripts(), policy=st.sampled_from(list(PolicyName)))
def test_never_overcommits_and_gangs_are_all_or_nothing(cl, ops, policy):
    """No policy ever over-commits CPU, memory or GPU milli, and a gang gets all its replicas or none."""
    e, decisions = run(policy, cl, ops)
    for key, d in decisions.items():
        if d.placed:
            req = e.allocs[key].req
            assert len(d.assignments) == req.replicas
            for a in d.assignments:
                assert len(a.gpu_indices) == req.gpus_per_replica()
            if req.topology is Topology.SAME_NODE and req.replicas > 1:
                assert len({a.node_id for a in d.assignments}) == 1
            if req.topology is Topology.SPREAD:
                assert len({a.node_id for a in d.assignments}) == req.replicas
            if req.gpu_models and d.assignments[0].gpu_indices:
                for a in d.assignments:
                    spec = e.cluster.specs[e.cluster.index[a.node_id]]
                    assert all(spec.gpus[g].model in req.gpu_models for g in a.gpu_indices)
        else:
            assert d.assignments == () and d.reasons


@SETTINGS
@given(cl=clusters(), ops=scripts(), q1=st.integers(0, 8000), q2=st.integers(0, 8000),
       policy=st.sampled_from([PolicyName.FAST_BEST_FIT, PolicyName.BEST_FIT, PolicyName.FGD]))
def test_quotas_hold(cl, ops, q1, q2, policy):
    """Per-model and all-model quotas are never exceeded, whatever the request stream."""
    e, _ = run(policy, cl, ops, quotas=[("t1", "H100", q1), ("t1", "*", q2)])
    assert e.used.get(("t1", e.cluster.model_id.get("H100", -1)), 0) <= q1
    assert e.used_total.get("t1", 0) <= q2


@SETTINGS
@given(cl=clusters(), ops=scripts(), policy=st.sampled_from(list(PolicyName)))
def test_release_restores_exact_prior_free_state(cl, ops, policy):
    """Placing a request and releasing it returns the free state to exactly what it was."""
    e, _ = run(policy, cl, [o for o in ops if o[0] == "place"][:-1])
    last = [o for o in ops if o[0] == "place"][-1][1]
    last = Request(**{**last.__dict__, "key": "probe"})
    before = e.snapshot_free()
    d = e.place(last)
    e.release("probe")
    assert e.snapshot_free() == before
    assert e.release("probe") is False
    e.check_invariants()
    if not d.placed:
        assert all(isinstance(r, Reason) for r in d.reasons)


@SETTINGS
@given(cl=clusters(), ops=scripts(), policy=st.sampled_from(list(PolicyName)))
def test_explanations_name_a_real_reason(cl, ops, policy):
    """Every unplaced decision counts rejections against Reason members and its text names one of them."""
    _, decisions = run(policy, cl, ops)
    for d in decisions.values():
        if d.placed:
            continue
        assert d.reasons and all(isinstance(r, Reason) and c > 0 for r, c in d.reasons.items())
        assert d.explanation.startswith(("needs ", "invalid request", "allocation"))
        named = [r for r in d.reasons if r.value in d.explanation]
        assert named or Reason.NO_NODES in d.reasons or Reason.DUPLICATE_KEY in d.reasons, d.explanation
