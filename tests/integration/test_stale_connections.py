"""Requests after the database ended the control plane's idle connections are answered, not refused.

A database that restarts, fails over, or ends idle sessions closes the connections the gRPC handlers
keep. Before, each handler thread learned of it by failing its next request with UNAVAILABLE
("database unavailable (OperationalError); retry"), though that request had never reached the
database: after a restart, one refused request per handler thread, whatever the request. The handlers
now check a kept connection before using it (ledger.db.usable: one poll of its socket) and open a
new one when the server has closed it.
"""
from __future__ import annotations

import concurrent.futures as cf
import uuid

import psycopg

from gpuaas.client import Client

from tests.integration.conftest import new_tenant

CALLERS = 8


def _end_idle_placement_connections(owner_url: str) -> int:
    """End the placement actor's idle connections, waiting until each backend has exited (as after a
    restart: the client's next request comes once the server has closed them)."""
    with psycopg.connect(owner_url, autocommit=True) as conn:
        return len(conn.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
            " WHERE application_name = 'gpuaas-placement' AND state = 'idle'").fetchall())


def test_requests_after_idle_connections_were_ended_are_answered(control_plane, admin):
    c = new_tenant(admin, control_plane)
    clients = [Client(control_plane.address, admin.create_token(c.tenant_id)) for _ in range(CALLERS)]
    try:
        def reads(k: int) -> int:
            return sum(len(list(clients[k].list(page_size=5))) + 1 for _ in range(5))

        # Concurrent reads, so that many handler threads hold a connection of their own.
        with cf.ThreadPoolExecutor(CALLERS) as ex:
            assert all(ex.map(reads, range(CALLERS)))
        assert _end_idle_placement_connections(control_plane.urls.owner) >= 2

        # Every request is answered: reads on many handler threads, an admin write, and a token
        # the authenticator has not seen (its lookup runs on its own kept connection).
        with cf.ThreadPoolExecutor(CALLERS) as ex:
            assert all(ex.map(reads, range(CALLERS)))
        tenant = "t-" + uuid.uuid4().hex[:8]
        admin.create_tenant(tenant)
        _end_idle_placement_connections(control_plane.urls.owner)
        fresh = Client(control_plane.address, admin.create_token(tenant))
        try:
            assert list(fresh.list(page_size=1)) == []
        finally:
            fresh.close()
    finally:
        for x in clients:
            x.close()
        c.close()
