"""A release that overtakes its allocation's hand-off is settled by the placement actor
(PlacementCore.release_before_handoff): PLACED → RELEASING → RELEASED in one commit, the hand-off
withdrawn, the capacity back at once. Real Postgres and the real capacity view; the core runs
without shards, with a hand-off window long enough that nothing leaves during a test."""
from __future__ import annotations

import concurrent.futures as cf
import time

import psycopg
import pytest

from actors import store
from actors.placement import PlacementCore
from gpuaas.config import ControlPlaneConfig
from gpuaas.errors import Unavailable
from gpuaas.lifecycle import AllocEvent, AllocState
from gpuaas.v1 import common_pb2
from tests.test_shard_addresses import add_node

GPUS = [(i, "H100", 81920, 0, "READY") for i in range(8)]


@pytest.fixture
def core(fresh_db):
    c = PlacementCore(app_url=fresh_db.app, config=ControlPlaneConfig(reconcile_s=0, dispatch_linger_s=600),
                      alloc_shards=[], node_shards=[])
    c.node_registered("n1", "127.0.0.1:1", "READY", 64_000, 512_000, {}, GPUS)
    yield c
    c.shutdown()


def place(core: PlacementCore, name: str, gpus: int = 2) -> store.AllocRow:
    [fut] = core.submit("acme", [common_pb2.PlacementRequest(request_id=name, gpu_count=gpus)])
    kind, row = fut.result(30)
    assert kind == "new" and row.state is AllocState.PLACED
    assert core.handoff_waits(row.allocation_id)
    return row


def free_gpus(core: PlacementCore) -> int:
    with core.lock:
        return sum(1 for g in range(8) if g not in {i for al in core.engine.allocs.values()
                                                     for a in al.assignments for i in a.gpu_indices})


def events(url: str, aid: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT from_state, to_state, event, version FROM control.allocation_events"
                            " WHERE allocation_id = %s ORDER BY event_id", (aid,)).fetchall()


def test_a_release_before_the_hand_off_is_one_commit_and_frees_the_capacity(fresh_db, core):
    a = place(core, "r-a", gpus=8)
    assert free_gpus(core) == 0
    # Another tenant's release of it, and an id this actor never placed: not settled here, nothing moves.
    assert core.release_before_handoff([(a.allocation_id, "other"), ("not-placed-here", "acme")]) == [None, None]
    assert core.handoff_waits(a.allocation_id)
    [row] = core.release_before_handoff([(a.allocation_id, "acme")])
    assert row.state is AllocState.RELEASED and row.version == 4 and row.running_since is None
    assert events(fresh_db.app, a.allocation_id) == [
        (None, "QUEUED", "accepted", 1), ("QUEUED", "PLACED", "placed", 2),
        ("PLACED", "RELEASING", "release_requested", 3), ("RELEASING", "RELEASED", "cleanup_ok", 4)]
    with psycopg.connect(fresh_db.app) as conn:
        assert store.load_allocation(conn, a.allocation_id) == row
    # The hand-off is gone (no shard will ever prepare it), the capacity and the ownership entry too.
    assert not core.handoff_waits(a.allocation_id) and core.handoffs_waiting() == 0
    assert free_gpus(core) == 8 and a.allocation_id not in core.owner_tenant
    assert core.stats["released_before_handoff"] == 1
    # A second release finds nothing waiting: the shard's path answers it (with the row as it is).
    assert core.release_before_handoff([(a.allocation_id, "acme")]) == [None]
    # The capacity is placeable again at once.
    place(core, "r-b", gpus=8)


def test_a_row_that_moved_since_its_commit_is_left_to_whoever_moved_it(fresh_db, core):
    """A shard that resumed the allocation from Postgres (its own restart) moved the row: the version
    check refuses this release, the hand-off is not sent again, and the capacity stays held."""
    a = place(core, "r-a")
    with psycopg.connect(fresh_db.app, autocommit=True) as conn:
        store.transition_allocation(conn, a, AllocEvent.PREPARE_OK)
    assert core.release_before_handoff([(a.allocation_id, "acme")]) == [None]
    assert core.handoffs_waiting() == 0
    assert free_gpus(core) == 6 and core.stats["released_before_handoff"] == 0
    with psycopg.connect(fresh_db.app) as conn:
        assert store.load_allocation(conn, a.allocation_id).state is AllocState.RUNNING


def test_a_failed_commit_releases_nothing_and_puts_the_hand_off_back(fresh_db, core):
    a, b = place(core, "r-a"), place(core, "r-b")
    with core._group_lock:
        pid = core._group_writer().info.backend_pid  # the connection the release will use
    # The commit fails while it runs: its statement waits for a row lock held elsewhere, and its backend
    # is ended there. (An idle connection ended beforehand is no failure: the writer sees it is closed
    # and connects anew before sending anything, ledger.db.usable.)
    with psycopg.connect(fresh_db.app) as blocker, psycopg.connect(fresh_db.app, autocommit=True) as admin:
        blocker.execute("SELECT 1 FROM control.allocations WHERE allocation_id = %s FOR UPDATE", (a.allocation_id,))
        with cf.ThreadPoolExecutor(1) as ex:
            release = ex.submit(core.release_before_handoff, [(a.allocation_id, "acme"), (b.allocation_id, "acme")])
            deadline = time.monotonic() + 10
            while admin.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                                (pid,)).fetchone() != ("Lock",):
                assert time.monotonic() < deadline, "the release never waited for the row lock"
                time.sleep(0.01)
            admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
            with pytest.raises(Unavailable):
                release.result(10)
        blocker.rollback()
    assert core.handoff_waits(a.allocation_id) and core.handoff_waits(b.allocation_id)
    assert free_gpus(core) == 4 and core.stats["released_before_handoff"] == 0
    with psycopg.connect(fresh_db.app) as conn:
        assert {store.load_allocation(conn, x.allocation_id).state for x in (a, b)} == {AllocState.PLACED}
    # The retry (on a fresh connection) goes through, both in one commit.
    rows = core.release_before_handoff([(a.allocation_id, "acme"), (b.allocation_id, "acme")])
    assert [r.state for r in rows] == [AllocState.RELEASED] * 2
    assert free_gpus(core) == 8 and core.stats["released_before_handoff"] == 2


def test_group_writes_keep_one_plan_and_reads_plan_with_their_values(core):
    """The connections that only run group writes (new allocations; releases before the hand-off) reuse
    one plan per statement instead of planning each commit again; the readers, whose queries may
    depend on their values, keep the server's default."""
    show = lambda c: c.execute("SHOW plan_cache_mode").fetchone()[0]  # noqa: E731
    assert show(core._pipe_writer()) == "force_generic_plan"
    with core._group_lock:
        assert show(core._group_writer()) == "force_generic_plan"
    assert show(core.reader()) == "auto"


def test_a_window_whose_hand_offs_were_all_released_closes_with_them(fresh_db):
    """A hand-off that comes after every hand-off of the open window was withdrawn opens a window of
    its own, the whole dispatch_linger_s long. Before, it joined the emptied window and went to its
    shard when that window closed, a few ms later, so a release sent right after its answer (a client
    placing and releasing in waves) found it gone and took the shard's longer path."""
    import time

    linger = 2.0
    c = PlacementCore(app_url=fresh_db.app, config=ControlPlaneConfig(reconcile_s=0, dispatch_linger_s=linger),
                      alloc_shards=[], node_shards=[])
    c.node_registered("n1", "127.0.0.1:1", "READY", 64_000, 512_000, {}, GPUS)
    try:
        t0 = time.monotonic()
        a = place(c, "r-a")  # opens a window, closing at t0 + linger
        time.sleep(0.2)  # the dispatcher has seen it (a client's release comes a round trip later)
        [row] = c.release_before_handoff([(a.allocation_id, "acme")])
        assert row.state is AllocState.RELEASED and c.handoffs_waiting() == 0
        time.sleep(max(0.0, t0 + 0.75 * linger - time.monotonic()))
        b = place(c, "r-b")
        t_b = time.monotonic()
        # Past the first window's end, well before b's own window ends.
        time.sleep(max(0.0, t0 + 1.1 * linger - time.monotonic()))
        assert time.monotonic() < t_b + 0.9 * linger, "the test thread was held too long to tell"
        assert c.handoff_waits(b.allocation_id)
        # Its release is still this actor's to settle.
        [row] = c.release_before_handoff([(b.allocation_id, "acme")])
        assert row.state is AllocState.RELEASED
    finally:
        c.shutdown()


def test_a_hand_off_sent_again_after_a_restart_is_released_by_its_shard(fresh_db, core):
    """After a restart the placement actor sends the hand-offs of PLACED rows again; its previous
    incarnation may have sent them already and a shard may be preparing them, so their releases are
    not settled here (the shard's path, which cleans up what it prepared, takes them)."""
    a = place(core, "r-a")
    core.shutdown()
    # The node as the registry keeps it, which the new incarnation's rebuild reads.
    add_node(fresh_db.owner, "n1", "127.0.0.1:1")
    with psycopg.connect(fresh_db.owner, autocommit=True) as conn:
        for i, model, mem, island, state in GPUS:
            conn.execute("INSERT INTO control.gpus (node_id, gpu_index, uuid, model, memory_mib, nvlink_island, state)"
                         " VALUES ('n1', %s, %s, %s, %s, %s, %s)", (i, f"GPU-{i}", model, mem, island, state))
    again = PlacementCore(app_url=fresh_db.app, config=ControlPlaneConfig(reconcile_s=0, dispatch_linger_s=600),
                          alloc_shards=[], node_shards=[])
    try:
        assert again.handoffs_waiting() == 1  # sent again (the window is long: it is still waiting)
        assert not again.handoff_waits(a.allocation_id)
        assert again.release_before_handoff([(a.allocation_id, "acme")]) == [None]
        assert again.stats["released_before_handoff"] == 0
        with psycopg.connect(fresh_db.app) as conn:
            assert store.load_allocation(conn, a.allocation_id).state is AllocState.PLACED
        # A placement of this incarnation is still its own to settle.
        b = place(again, "r-b")
        [row] = again.release_before_handoff([(b.allocation_id, "acme")])
        assert row.state is AllocState.RELEASED
    finally:
        again.shutdown()
