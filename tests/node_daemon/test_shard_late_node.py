"""An allocation shard prepares an allocation on a node it has not heard of (registered after the shard
loaded the addresses; its node_ready still on the way): the address is read from Postgres on the miss,
the Prepare reaches the real daemon, and the allocation goes RUNNING with no failed attempt counted.
Real Postgres, a real daemon on loopback; the shard core runs without Ray."""
from __future__ import annotations

import asyncio

import psycopg

from gpuaas.lifecycle import AllocState
from tests.test_shard_addresses import add_node, insert_placed


def test_a_prepare_on_a_node_the_shard_has_not_heard_of(fresh_db, sim_daemon, shard):
    core, _ = shard
    add_node(fresh_db.owner, "late", sim_daemon.address)
    row = insert_placed(fresh_db.owner, "late", 2)
    aid = row.allocation_id
    assert "late" not in core.addresses
    core.rows[aid] = row

    async def prepare():
        await core._prepare_group([aid])
        await core.agents.drop(sim_daemon.address)

    asyncio.run(prepare())
    assert core.addresses["late"] == sim_daemon.address
    assert core.rows[aid].state is AllocState.RUNNING and core.rows[aid].prepare_attempts == 0
    assert [a.allocation_id for a in sim_daemon.allocations.live()] == [aid]
    with psycopg.connect(fresh_db.owner) as conn:
        assert conn.execute("SELECT state FROM control.allocations WHERE allocation_id = %s",
                            (aid,)).fetchone() == ("RUNNING",)
