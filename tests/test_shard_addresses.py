"""Two things an allocation shard must know without asking the placement actor.

- The address of a node registered after the shard started. The node shard's node_ready may still
  be on its way when the node's first allocation is prepared or cleaned up, so a lookup that misses
  reads the nodes from Postgres before it gives up. Before, such a cleanup failed with KeyError and
  waited out its backoff.
- Which of its allocations no node can hold: their cleanup sends no call.

Real Postgres; the shard core runs without Ray."""
from __future__ import annotations

import asyncio
import uuid

import psycopg

from actors import store
from actors.store import AllocRow, utcnow
from gpuaas.lifecycle import AllocEvent, AllocState
from gpuaas.v1 import common_pb2


def add_node(url: str, node_id: str, address: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO control.nodes (node_id, address, state, backend, simulated, cpu_milli, memory_mib,"
                     " labels, inventory, registered_at, last_seen_at, updated_at)"
                     " VALUES (%s, %s, 'READY', 'SIMULATED', true, 64000, 512000, '{}', ''::bytea, now(), now(), now())",
                     (node_id, address))


def insert_placed(url: str, node_id: str, gpu_index: int) -> AllocRow:
    """A committed PLACED allocation of one whole GPU on ``node_id`` (as the placement actor commits it)."""
    aid, now = str(uuid.uuid4()), utcnow()
    req = common_pb2.PlacementRequest(request_id="r-" + aid[:8], gpu_count=1)
    row = AllocRow(allocation_id=aid, tenant_id="t", request_id=req.request_id, request_hash=b"\0" * 32,
                   request=req.SerializeToString(), state=AllocState.PLACED, version=2, reason="placed",
                   created_at=now, updated_at=now,
                   assignments=[{"node_id": node_id, "gpu_indices": [gpu_index], "gpu_milli": 1000,
                                 "gpu_model": "H100"}])
    with psycopg.connect(url, autocommit=True) as conn:
        store.insert_new_allocations(conn, [(row, [(AllocEvent.ACCEPTED, None), (AllocEvent.PLACED, AllocState.QUEUED)])])
    return row


def test_a_node_registered_later_is_read_on_a_miss(shard):
    core, url = shard
    add_node(url, "early", "10.0.0.1:50051")
    asyncio.run(core._load_addresses())
    assert core.addresses == {"early": "10.0.0.1:50051"}
    add_node(url, "late", "10.0.0.2:50051")  # registered after the shard loaded the addresses

    async def misses_together():
        # Several lookups missing at once: each learns the address.
        await asyncio.gather(*[core._know_addresses({"late", "early"}) for _ in range(5)])

    asyncio.run(misses_together())
    assert core.addresses["late"] == "10.0.0.2:50051"


def test_a_known_address_is_kept_and_an_unknown_node_stays_unknown(shard):
    core, url = shard
    add_node(url, "n1", "10.0.0.9:50051")
    core.addresses["n1"] = "10.0.0.1:50051"  # what node_ready said last: only node_ready changes it
    asyncio.run(core._know_addresses({"n1", "ghost"}))
    assert core.addresses["n1"] == "10.0.0.1:50051"
    assert "ghost" not in core.addresses  # the caller's lookup fails as before (KeyError)


def test_a_cleanup_call_is_skipped_only_for_an_allocation_never_sent(shard):
    """_on_nodes: an allocation this shard never sent a Prepare for, with no failed attempt counted in
    its row, is on no node; one it sent, or one back from the queue after a failed Prepare (its
    best-effort cleanup may have failed), may be."""
    import dataclasses

    from actors.store import AllocRow, utcnow
    from gpuaas.lifecycle import AllocState

    core, _ = shard
    now = utcnow()
    row = AllocRow(allocation_id="a1", tenant_id="t", request_id="r", request_hash=b"", request=b"",
                   state=AllocState.RELEASING, created_at=now, updated_at=now,
                   assignments=[{"node_id": "n1", "gpu_indices": [0], "gpu_milli": 1000, "gpu_model": "H100"}])
    assert not core._on_nodes(row)
    core._sent.add("a1")
    assert core._on_nodes(row)
    core._sent.discard("a1")
    assert core._on_nodes(dataclasses.replace(row, prepare_attempts=1))
