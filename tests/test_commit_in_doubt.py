"""A group commit of new allocations whose connection breaks is settled by what Postgres holds, never
by guessing. Real Postgres, the real capacity view, and a relay (tests/faults/pgproxy.py) that cuts
the placement actor's writer connection at the chosen moment:

- the answer is lost after the commit took effect: the placements stand, the client gets them, the
  capacity stays held, and a retry gets the same allocation;
- the statement is lost before the server saw it: nothing was booked, the capacity comes back, and
  a retry places it anew;
- the answer is lost and Postgres cannot be asked for a while: the capacity stays held (nothing
  else can take those GPUs), the client is told the outcome is not known yet, and once Postgres
  answers the batch is settled as it was committed, and a retry gets the same allocation;
- the server refuses a commit: the connection is closed, not leaked, however often it happens.

Before this, any failed commit was taken as "nothing written": a commit whose answer was lost kept
its rows in Postgres while the capacity view freed their GPUs (a double booking waiting to happen),
every retry of its requests then failed on the unique request id, and each failure leaked the
writer's connection until the server had none left."""
from __future__ import annotations

import time

import psycopg
import pytest

from actors.placement import PlacementCore
from gpuaas.config import ControlPlaneConfig
from gpuaas.errors import InvalidArgument, ResourceExhausted, Unavailable
from gpuaas.v1 import common_pb2
from tests.faults.pgproxy import PgProxy

GPUS = [(i, "H100", 81920, 0, "READY") for i in range(8)]


def _socket_dir(url: str) -> str:
    import urllib.parse as up

    if "://" in url:
        return dict(up.parse_qsl(up.urlsplit(url).query))["host"]
    return next(kv.split("=", 1)[1] for kv in url.split() if kv.startswith("host="))


@pytest.fixture
def proxied(fresh_db):
    """(core, proxy): a PlacementCore whose every connection goes through the relay; one commit done,
    so the writer's connection (and its first statements) exist before a test arms a fault."""
    proxy = PgProxy(_socket_dir(fresh_db.app))
    core = PlacementCore(app_url=proxy.url(fresh_db.app),
                         config=ControlPlaneConfig(reconcile_s=0, dispatch_linger_s=600),
                         alloc_shards=[], node_shards=[])
    core.node_registered("n1", "127.0.0.1:1", "READY", 64_000, 512_000, {}, GPUS)
    try:
        assert place(core, "warm-up", 1)[0] == "new"
        yield core, proxy
    finally:
        core.shutdown()
        proxy.close()


def place(core: PlacementCore, rid: str, gpus: int = 2):
    [fut] = core.submit("acme", [common_pb2.PlacementRequest(request_id=rid, gpu_count=gpus)])
    return fut.result(30)


def held(core: PlacementCore) -> set[str]:
    with core.lock:
        return set(core.engine.allocs)


def rows(url: str, rid: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [str(a) for (a,) in conn.execute(
            "SELECT allocation_id FROM control.allocations WHERE tenant_id = 'acme' AND request_id = %s", (rid,))]


def test_a_commit_whose_answer_is_lost_stands_and_is_answered(fresh_db, proxied):
    core, proxy = proxied
    proxy.arm("lose_answer")
    kind, row = place(core, "r-lost-answer")
    assert proxy.cuts == 1
    assert kind == "new" and rows(fresh_db.app, "r-lost-answer") == [row.allocation_id]
    assert row.allocation_id in held(core)
    assert core.stats["commit_failures"] == 0 and core.commits_held_in_doubt == 0
    # The retry is the same allocation, not a second one and not an error.
    assert place(core, "r-lost-answer") == ("existing", row.allocation_id)


def test_a_statement_lost_before_the_server_saw_it_books_nothing(fresh_db, proxied):
    core, proxy = proxied
    before = held(core)
    proxy.arm("lose_statement")
    with pytest.raises(Unavailable, match="nothing was booked"):
        place(core, "r-lost-statement", gpus=8 - 1)  # all the GPUs the warm-up left
    assert proxy.cuts == 1
    assert rows(fresh_db.app, "r-lost-statement") == [] and held(core) == before
    assert core.stats["commit_failures"] == 1
    kind, row = place(core, "r-lost-statement", gpus=7)  # the capacity came back: it fits again
    assert kind == "new" and rows(fresh_db.app, "r-lost-statement") == [row.allocation_id]


def test_a_commit_in_doubt_holds_its_capacity_until_postgres_says(fresh_db, proxied):
    core, proxy = proxied
    proxy.arm("lose_answer")
    proxy.refuse_for(2.5)  # the outcome check cannot connect at once
    # With a request refused outright in the same batch: its answer need not wait for the outcome.
    doubt, refused = core.submit("acme", [common_pb2.PlacementRequest(request_id="r-doubt", gpu_count=7),
                                          common_pb2.PlacementRequest(request_id="r-bad", gpu_count=-1)])
    with pytest.raises(Unavailable, match="outcome is not known"):
        doubt.result(30)
    assert refused.done()
    with pytest.raises(InvalidArgument):
        refused.result(0)
    assert core.commits_held_in_doubt == 1 and core.stats["commits_in_doubt"] == 1
    [(d, _)] = core._in_doubt
    [(row, _, _)] = d.new
    assert row.allocation_id in held(core)  # committed, as it turns out: its GPUs were never free
    with pytest.raises(ResourceExhausted):  # and nothing else can take them meanwhile
        place(core, "r-other", gpus=7)
    deadline = time.monotonic() + 15
    while core.commits_held_in_doubt and time.monotonic() < deadline:
        time.sleep(0.1)  # the tick (every second) asks again once the relay lets it in
    assert core.commits_held_in_doubt == 0
    assert rows(fresh_db.app, "r-doubt") == [row.allocation_id] and row.allocation_id in held(core)
    assert place(core, "r-doubt", gpus=7) == ("existing", row.allocation_id)


def test_refused_commits_close_their_connection(fresh_db, proxied):
    """A commit the server refuses (here: the request id was taken behind the actor's back) fails
    UNAVAILABLE without a check, and the writer's connection is closed each time."""
    core, _ = proxied
    with psycopg.connect(fresh_db.app, autocommit=True) as conn:
        conn.execute("INSERT INTO control.allocations (allocation_id, tenant_id, request_id, request_hash, request,"
                     " state, created_at, updated_at) VALUES (gen_random_uuid(), 'acme', 'r-taken', '\\x00', '\\x00',"
                     " 'CANCELLED', now(), now())")

        def backends() -> int:
            return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                                " AND usename = 'gpuaas_app'").fetchone()[0]

        start = backends()
        for _ in range(12):
            with pytest.raises(Unavailable, match="nothing was booked"):
                place(core, "r-taken", gpus=1)
            assert core._pipe_conn is None  # dropped, and closed (or its backend would still count below)
        assert backends() <= start
    assert core.stats["commit_failures"] == 12 and core.stats["commits_in_doubt"] == 0


def _queue_then_lose_the_placing_commit(fresh_db, core: PlacementCore, proxy: PgProxy, refuse_s: float) -> str:
    """Requests that wait in the queue (8 GPUs each; the warm-up holds one of n1's eight), each placed by
    the queue when a node arrives: the first as usual (its connection is then open), the second on
    n3, and the answer to that commit's COMMIT is lost."""
    aids = []
    for rid, node in (("r-queued-first", "n2"), ("r-queued", "n3")):
        [fut] = core.submit("acme", [common_pb2.PlacementRequest(request_id=rid, gpu_count=8, wait=True)])
        kind, row = fut.result(30)
        assert kind == "new" and row.allocation_id in core.queued
        if node == "n3":
            proxy.arm("lose_answer", pattern=b"COMMIT")
            if refuse_s:
                proxy.refuse_for(refuse_s)
        core.node_registered(node, f"127.0.0.1:{node[1:]}", "READY", 64_000, 512_000, {}, GPUS)
        aids.append(row.allocation_id)
        if node == "n2":
            _placed_once(fresh_db, core, row.allocation_id, node)
    return aids[-1]


def _placed_once(fresh_db, core: PlacementCore, aid: str, node: str = "n3", timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (core.commits_held_in_doubt or aid in core.queued or aid not in held(core)) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert core.commits_held_in_doubt == 0 and aid not in core.queued and aid in held(core)
    with psycopg.connect(fresh_db.app) as conn:
        state, version, assignments = conn.execute(
            "SELECT state, version, assignments FROM control.allocations WHERE allocation_id = %s", (aid,)).fetchone()
    with core.lock:
        engine_nodes = {a.node_id for a in core.engine.allocs[aid].assignments}
    # Placed once: one QUEUED → PLACED edge, on the GPUs the capacity view holds for it.
    assert (state, version) == ("PLACED", 2) and {a["node_id"] for a in assignments} == engine_nodes == {node}
    assert core.handoff_waits(aid)


def test_a_queued_placement_whose_commit_answer_is_lost_is_placed_once(fresh_db, proxied):
    core, proxy = proxied
    aid = _queue_then_lose_the_placing_commit(fresh_db, core, proxy, refuse_s=0)
    _placed_once(fresh_db, core, aid)
    assert proxy.cuts == 1 and core.stats["commits_in_doubt"] == 0


def test_a_queued_placement_in_doubt_keeps_its_gpus_until_postgres_says(fresh_db, proxied):
    core, proxy = proxied
    aid = _queue_then_lose_the_placing_commit(fresh_db, core, proxy, refuse_s=2.5)
    deadline = time.monotonic() + 10
    while not core.commits_held_in_doubt and time.monotonic() < deadline:
        time.sleep(0.05)
    assert core.commits_held_in_doubt == 1 and aid in held(core) and aid not in core.queued
    _placed_once(fresh_db, core, aid)
    assert proxy.cuts == 1 and core.stats["commits_in_doubt"] == 1


def test_a_cancel_whose_answer_is_lost_is_answered_on_its_retry_and_never_placed(fresh_db, proxied):
    """The cancel of a queued request commits, its answer is lost: the queue still holds the request.
    The retried cancel finds the row CANCELLED and answers with it; the queue lets the request go, and
    capacity that arrives later does not place it."""
    core, proxy = proxied
    [fut] = core.submit("acme", [common_pb2.PlacementRequest(request_id="r-cancel", gpu_count=8, wait=True)])
    kind, row = fut.result(30)
    aid = row.allocation_id
    assert kind == "new" and aid in core.queued
    proxy.arm("lose_answer", pattern=b"COMMIT")
    with pytest.raises(psycopg.OperationalError):
        core.cancel_queued(aid)
    assert proxy.cuts == 1 and aid in core.queued  # committed in Postgres, not known here
    again = core.cancel_queued(aid)
    assert again is not None and again.state.name == "CANCELLED" and aid not in core.queued
    core.node_registered("n2", "127.0.0.1:2", "READY", 64_000, 512_000, {}, GPUS)
    time.sleep(2.5)  # two ticks: the queue would have placed it by now
    with psycopg.connect(fresh_db.app) as conn:
        assert conn.execute("SELECT state FROM control.allocations WHERE allocation_id = %s",
                            (aid,)).fetchone()[0] == "CANCELLED"
    assert aid not in held(core)


def test_a_large_group_whose_commit_answer_is_lost_stands(fresh_db, proxied):
    """Past store.SMALL_INSERT_MAX a group is BEGIN, three COPYs and COMMIT: the COMMIT's answer lost,
    every placement of the group stands and is answered."""
    from actors import store

    core, proxy = proxied
    n = store.SMALL_INSERT_MAX + 44
    proxy.arm("lose_answer", pattern=b"COMMIT")
    futs = core.submit("acme", [common_pb2.PlacementRequest(request_id=f"r-big-{i}", gpu_milli=10) for i in range(n)])
    answers = [f.result(30) for f in futs]
    assert proxy.cuts == 1
    assert all(kind == "new" for kind, _ in answers)
    ids = {row.allocation_id for _, row in answers}
    with psycopg.connect(fresh_db.app) as conn:
        stored = {str(a) for (a,) in conn.execute(
            "SELECT allocation_id FROM control.allocations WHERE request_id LIKE 'r-big-%'")}
    assert stored == ids and len(ids) == n and ids <= held(core)
    assert core.stats["commit_failures"] == 0 and core.commits_held_in_doubt == 0


def test_a_release_before_the_hand_off_whose_answer_is_lost_is_answered_and_frees_the_gpus(fresh_db, proxied):
    """A release settled by the placement actor (the allocation not handed off yet) commits, and its
    answer is lost: the release is answered with the RELEASED row, the GPUs come back at once, and the
    hand-off does not go out."""
    core, proxy = proxied
    for rid in ("r-warm-release", "r-release"):  # the first opens the release writer's connection
        kind, row = place(core, rid, gpus=4)
        assert kind == "new" and core.handoff_waits(row.allocation_id)
        if rid == "r-release":
            proxy.arm("lose_answer")
        [back] = core.release_before_handoff([(row.allocation_id, "acme")])
        assert back is not None and back.state.name == "RELEASED" and back.version == 4
        assert row.allocation_id not in held(core) and not core.handoff_waits(row.allocation_id)
    assert proxy.cuts == 1
    with psycopg.connect(fresh_db.app) as conn:
        assert conn.execute("SELECT state FROM control.allocations WHERE allocation_id = %s",
                            (row.allocation_id,)).fetchone()[0] == "RELEASED"
