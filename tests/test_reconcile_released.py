"""The placement actor's anti-entropy for a lost capacity_freed (PlacementCore.reconcile_released):
capacity the view holds for an allocation whose row is finished (RELEASED, CANCELLED) is given back.

The first pass after a rebuild checks everything held against Postgres; later passes read only the
event log since, and must not miss an event whose transaction commits after a higher id did.
Real Postgres and the real capacity view; the core runs without shards (nothing here hands off)."""
from __future__ import annotations

import uuid

import psycopg
import pytest

from actors import convert, store
from actors.placement import PlacementCore
from actors.store import AllocRow, utcnow
from gpuaas.config import ControlPlaneConfig
from gpuaas.lifecycle import AllocEvent, AllocState
from gpuaas.v1 import common_pb2

GPUS = [(i, "H100", 81920, 0, "READY") for i in range(8)]
TO_RELEASED = [(AllocEvent.ACCEPTED, None), (AllocEvent.PLACED, AllocState.QUEUED),
               (AllocEvent.RELEASE_REQUESTED, AllocState.PLACED), (AllocEvent.CLEANUP_OK, AllocState.RELEASING)]


@pytest.fixture
def core(fresh_db):
    # reconcile_s=0: no pass of the core's own tick; the test runs each pass itself.
    c = PlacementCore(app_url=fresh_db.app, config=ControlPlaneConfig(reconcile_s=0), alloc_shards=[],
                      node_shards=[])
    c.node_registered("n1", "127.0.0.1:1", "READY", 64_000, 512_000, {}, GPUS)
    yield c
    c.shutdown()


def hold(core: PlacementCore) -> str:
    """Capacity held in the view for a new allocation id (as a placement whose row is not read here)."""
    aid = str(uuid.uuid4())
    req = common_pb2.PlacementRequest(request_id=f"r-{aid}", gpu_milli=100)
    with core.lock:
        assert core.engine.place(convert.to_domain(req, key=aid, tenant="acme")).placed
    return aid


def finished_row(aid: str) -> tuple[AllocRow, list]:
    now = utcnow()
    row = AllocRow(allocation_id=aid, tenant_id="acme", request_id=f"r-{aid}", request_hash=b"\x00" * 32,
                   request=b"", state=AllocState.RELEASED, version=len(TO_RELEASED), reason="cleanup_ok",
                   created_at=now, updated_at=now,
                   assignments=[{"node_id": "n1", "gpu_indices": [0], "gpu_milli": 100, "gpu_model": "H100"}])
    return row, TO_RELEASED


def write_finished(url: str, *aids: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        store.insert_new_allocations(conn, [finished_row(a) for a in aids])


def held(core: PlacementCore, *aids: str) -> set[str]:
    with core.lock:
        return {a for a in aids if a in core.engine.allocs}


def test_the_first_pass_checks_everything_held(fresh_db, core):
    """Rows finished before the pass's event-log mark are found by the full check."""
    a, running = hold(core), hold(core)
    write_finished(fresh_db.app, a)
    core._recon_from = core._recon_prev = 10**12  # the log holds nothing past here: only the full check finds a
    assert core.reconcile_released() == 1
    assert held(core, a, running) == {running}
    assert core.stats["reconciled"] == 1


def test_later_passes_read_the_event_log_since_the_last(fresh_db, core):
    core.reconcile_released()  # the full pass: nothing finished yet
    b, running = hold(core), hold(core)
    write_finished(fresh_db.app, b)
    assert core.reconcile_released() == 1
    assert held(core, b, running) == {running}
    assert core.reconcile_released() == 0  # read again (two passes back), nothing left to give back
    c = hold(core)
    write_finished(fresh_db.app, c)
    assert core.reconcile_released() == 1
    assert held(core, c, running) == {running}


def test_an_event_that_commits_after_a_higher_id_is_not_missed(fresh_db, core):
    core.reconcile_released()
    late, early = hold(core), hold(core)
    with psycopg.connect(fresh_db.app) as slow:
        with slow.transaction():
            store.insert_new_allocations(slow, [finished_row(late)])  # its event ids taken, not committed
            write_finished(fresh_db.app, early)                       # higher ids, committed first
            assert core.reconcile_released() == 1                     # sees early; late is invisible
            assert held(core, late, early) == {late}
        # committed now, below the highest id the last pass saw
    assert core.reconcile_released() == 1
    assert held(core, late, early) == set()
