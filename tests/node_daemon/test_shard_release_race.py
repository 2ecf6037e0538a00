"""A Prepare that succeeds after its allocation was released elsewhere: the allocation shard cleans
up the share it left on the node.

The placement actor settles a release itself while the allocation's hand-off waits
(release_before_handoff). After a restart it sends the hand-offs of PLACED rows again, and a shard
restarting resumes PLACED rows from Postgres, so a shard may already be preparing a row whose
release the placement actor then settles. The shard's PLACED → RUNNING commit then fails its
version check, and the share its Prepare made would stay on the node with no Cleanup to come.
Here the release is committed between the shard taking the row and its commit, the window of that
race. Real Postgres, a real daemon on loopback; the shard core runs without Ray."""
from __future__ import annotations

import asyncio

import psycopg

from actors import store
from gpuaas.lifecycle import AllocEvent, AllocState
from tests.test_shard_addresses import add_node, insert_placed


def test_a_share_prepared_for_an_allocation_released_meanwhile_is_cleaned_up(fresh_db, sim_daemon, shard):
    core, _ = shard
    add_node(fresh_db.owner, "n1", sim_daemon.address)
    row = insert_placed(fresh_db.owner, "n1", 2)
    aid = row.allocation_id
    core.rows[aid] = row  # the shard holds the PLACED row (a hand-off adopted, or resumed)
    # The placement actor settles the release: PLACED → RELEASING → RELEASED, one statement.
    with psycopg.connect(fresh_db.app, autocommit=True) as conn:
        [released] = store.transition_allocations(
            conn, [(row, (AllocEvent.RELEASE_REQUESTED, AllocEvent.CLEANUP_OK), {})])
    assert released.state is AllocState.RELEASED

    async def prepare():
        await core._prepare_group([aid])
        await core.agents.drop(sim_daemon.address)

    asyncio.run(prepare())
    # The shard's commit to RUNNING was refused (the row moved), it let the row go, and the share its
    # Prepare made is gone from the node.
    assert aid not in core.rows and core.stats["prepared"] == 0
    assert sim_daemon.allocations.live() == []
    assert core.stats["cleanups_after_release_race"] == 1
    with psycopg.connect(fresh_db.owner) as conn:
        assert conn.execute("SELECT state, version FROM control.allocations WHERE allocation_id = %s",
                            (aid,)).fetchone() == ("RELEASED", 4)
        # No event beyond the release's two: nothing was billed, nothing moved it again.
        assert conn.execute("SELECT count(*) FROM control.allocation_events WHERE allocation_id = %s",
                            (aid,)).fetchone()[0] == 4
