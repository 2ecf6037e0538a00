"""The placement actor's intake (actors.placement._Intake): tenants take turns, so one tenant's large
PlaceBatch does not hold up another tenant's request behind it; each tenant's own order is kept; and
admission is bounded in total and per tenant. Unit tests of the intake, and the real PlacementCore on
real Postgres deciding a big batch of one tenant and a single request of another."""
from __future__ import annotations

import threading

from actors.placement import _Intake, PlacementCore
from gpuaas.config import ControlPlaneConfig
from gpuaas.errors import Unavailable
from gpuaas.v1 import common_pb2


def _items(tenant: str, n: int, start: int = 0) -> list[tuple[str, int]]:
    return [(tenant, i) for i in range(start, start + n)]


def _admit(intake: _Intake, items: list[tuple[str, int]]) -> str:
    return intake.admit(items[0][0], items)


def test_tenants_take_turns_in_slices_and_keep_their_order():
    intake = _Intake(total_max=10_000, tenant_max=10_000, slice_items=3)
    assert _admit(intake, _items("a", 10)) == ""
    assert _admit(intake, _items("b", 2)) == ""
    assert _admit(intake, _items("c", 4)) == ""
    first = intake.take(max_items=8, timeout_s=0)
    # a's slice, b's two, c's slice, then a again until the take is full
    assert first == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("c", 0), ("c", 1), ("c", 2)]
    rest = intake.take(max_items=100, timeout_s=0)
    # b is done; a and c go on in turn, each in its own order
    assert rest == [("a", 3), ("a", 4), ("a", 5), ("c", 3), ("a", 6), ("a", 7), ("a", 8), ("a", 9)]
    assert intake.waiting == 0 and intake.take(max_items=5, timeout_s=0) == []


def test_a_tenant_arriving_late_is_served_in_the_next_take():
    intake = _Intake(total_max=100_000, tenant_max=100_000, slice_items=256)
    assert _admit(intake, _items("big", 10_000)) == ""
    assert len(intake.take(max_items=4096, timeout_s=0)) == 4096
    assert _admit(intake, _items("small", 1)) == ""
    nxt = intake.take(max_items=4096, timeout_s=0)
    assert ("small", 0) in nxt[:257]  # after at most one slice of the big batch
    assert [x for x in nxt if x[0] == "big"] == _items("big", 4095, start=4096)


def test_admission_is_bounded_in_total_and_per_tenant_all_or_nothing():
    intake = _Intake(total_max=10, tenant_max=6, slice_items=4)
    assert _admit(intake, _items("a", 5)) == ""
    why = _admit(intake, _items("a", 2, start=5))
    assert "tenant 'a' has 5 placement requests waiting" in why and "at most 6" in why
    assert intake.waiting == 5  # nothing of the refused call was queued
    assert _admit(intake, _items("b", 5)) == ""  # another tenant still gets in
    assert _admit(intake, _items("c", 1)) == "placement queue is full; retry shortly"
    intake.take(max_items=10, timeout_s=0)
    assert _admit(intake, _items("a", 6, start=5)) == ""  # room again once taken
    assert intake.refused == {"total": 1, "tenant": 1}


def test_an_empty_call_leaves_no_turn_behind():
    intake = _Intake(total_max=10, tenant_max=10, slice_items=4)
    assert intake.admit("a", []) == ""
    assert intake.waiting == 0 and not intake._turns and not intake._by_tenant


def test_take_waits_for_the_first_request():
    intake = _Intake(total_max=10, tenant_max=10, slice_items=4)
    got: list = []
    t = threading.Thread(target=lambda: got.extend(intake.take(max_items=10, timeout_s=10)))
    t.start()
    assert _admit(intake, _items("a", 3)) == ""
    t.join(10)
    assert got == _items("a", 3)


GPUS = [(i, "H100", 81920, 0, "READY") for i in range(8)]


def test_the_core_answers_another_tenants_request_before_a_big_batch_ahead_of_it(fresh_db):
    """Tenant "big" sends 3,000 fractional requests in one call, then tenant "small" one request: with
    decisions of at most 256 requests, "small" is decided and answered while most of "big" still
    waits, and every request of both is placed, "big"'s answered in its own order."""
    core = PlacementCore(app_url=fresh_db.app, alloc_shards=[], node_shards=[],
                         config=ControlPlaneConfig(reconcile_s=0, dispatch_linger_s=600, batch_size_max=256))
    try:
        for n in range(4):
            core.node_registered(f"n{n}", f"127.0.0.1:{20000 + n}", "READY", 10**9, 10**9, {}, GPUS)
        done: list[str] = []
        lock = threading.Lock()

        def record(name):
            def cb(_f):
                with lock:
                    done.append(name)
            return cb

        big = core.submit("big", [common_pb2.PlacementRequest(request_id=f"b{i}", gpu_milli=1) for i in range(3000)])
        [small] = core.submit("small", [common_pb2.PlacementRequest(request_id="s0", gpu_milli=1)])
        for i, f in enumerate(big):
            f.add_done_callback(record(f"b{i}"))
        small.add_done_callback(record("s0"))
        assert all(f.result(60)[0] == "new" for f in [*big, small])
        order = list(done)
        # A callback added to a future already done runs at once, so "small" may be recorded among the
        # first few of "big" at the earliest; it must not come after the bulk of "big".
        assert order.index("s0") < 3000 // 2, f"small answered at position {order.index('s0')}"
        big_order = [int(x[1:]) for x in order if x.startswith("b")]
        assert big_order == sorted(big_order)
    finally:
        core.shutdown()


def test_a_tenant_over_its_share_is_refused_while_others_are_admitted(fresh_db):
    core = PlacementCore(app_url=fresh_db.app, alloc_shards=[], node_shards=[],
                         config=ControlPlaneConfig(reconcile_s=0, dispatch_linger_s=600))
    try:
        core.node_registered("n0", "127.0.0.1:20000", "READY", 10**9, 10**9, {}, GPUS)
        # Nothing is decided while the committer's intake is held: fill tenant "a" up to its share.
        core.intake.tenant_max = 3
        with core.intake._cv:
            fa = core.submit("a", [common_pb2.PlacementRequest(request_id=f"a{i}", gpu_milli=1) for i in range(3)])
            [refused] = core.submit("a", [common_pb2.PlacementRequest(request_id="a3", gpu_milli=1)])
            [fb] = core.submit("b", [common_pb2.PlacementRequest(request_id="b0", gpu_milli=1)])
        assert isinstance(refused.exception(5), Unavailable) and "tenant 'a' has 3" in str(refused.exception())
        assert all(f.result(30)[0] == "new" for f in [*fa, fb])
    finally:
        core.shutdown()
