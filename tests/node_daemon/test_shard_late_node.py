"""An allocation shard prepares an allocation on a node it has not heard of (registered after the shard
loaded the addresses; its node_ready still on the way): the address is read from Postgres on the miss,
the Prepare reaches the real daemon, and the allocation goes RUNNING with no failed attempt counted.
Real Postgres, a real daemon on loopback; the shard core runs without Ray."""
from __future__ import annotations

import asyncio
import uuid

import psycopg

from actors import store
from actors.allocation_shard import AllocationShardCore
from actors.store import AllocRow, utcnow
from gpuaas.config import ControlPlaneConfig
from gpuaas.lifecycle import AllocEvent, AllocState
from gpuaas.v1 import common_pb2
from tests.test_shard_addresses import add_node


def test_a_prepare_on_a_node_the_shard_has_not_heard_of(fresh_db, sim_daemon):
    core = AllocationShardCore(index=0, count=1, app_url=fresh_db.app, config=ControlPlaneConfig())
    try:
        add_node(fresh_db.owner, "late", sim_daemon.address)
        aid, now = str(uuid.uuid4()), utcnow()
        req = common_pb2.PlacementRequest(request_id="r1", gpu_count=1)
        row = AllocRow(allocation_id=aid, tenant_id="t", request_id="r1", request_hash=b"\0" * 32,
                       request=req.SerializeToString(), state=AllocState.PLACED, version=2, reason="placed",
                       created_at=now, updated_at=now,
                       assignments=[{"node_id": "late", "gpu_indices": [2], "gpu_milli": 1000, "gpu_model": "H100"}])
        with psycopg.connect(fresh_db.owner, autocommit=True) as conn:
            store.insert_new_allocations(conn, [(row, [(AllocEvent.ACCEPTED, None),
                                                       (AllocEvent.PLACED, AllocState.QUEUED)])])
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
    finally:
        core.db.close()
