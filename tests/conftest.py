"""Shared fixtures: a real PostgreSQL (embedded pgserver, or the server at
GPUAAS_DATABASE_URL) with every migration applied.

`pg_server` starts one server per test session. `fresh_db` creates a new,
empty database on it per test (cheap: CREATE DATABASE from template0 + the
migrations), so tests never see each other's rows.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import uuid

import psycopg
import pytest

from ledger import db as dbmod
from ledger.migrate import apply_migrations


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    """(owner_url, app_url) of the server's default database."""
    if os.environ.get("GPUAAS_DATABASE_URL"):
        urls = dbmod.resolve()
    else:
        # Short path: the unix socket lives in the data dir.
        data = pathlib.Path("/tmp") / f"gpuaas-test-pg-{os.getpid()}"
        urls = dbmod.resolve(data_dir=data)
    return urls


def _swap_db(url: str, name: str) -> str:
    import urllib.parse as up

    parts = up.urlsplit(url)
    return up.urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@pytest.fixture
def fresh_db(pg_server):
    """A brand-new migrated database: returns DatabaseUrls for it."""
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_server.owner, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    urls = dbmod.DatabaseUrls(owner=_swap_db(pg_server.owner, name),
                              app=_swap_db(pg_server.app, name), embedded=pg_server.embedded)
    apply_migrations(urls.owner)
    yield urls
    with psycopg.connect(pg_server.owner, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def server_setting(owner_url: str, name: str, value: str | None):
    """A server-wide setting for the body of the ``with``: ALTER SYSTEM SET (RESET when ``value`` is
    None) and a reload; afterwards RESET, a reload, and the embedded server's own settings put back.
    Only on the embedded test server: an external one is not the tests' to reconfigure."""
    with psycopg.connect(owner_url, autocommit=True) as conn:
        conn.execute(f"ALTER SYSTEM RESET {name}" if value is None else f"ALTER SYSTEM SET {name} = '{value}'")
        conn.execute("SELECT pg_reload_conf()")
        try:
            yield
        finally:
            conn.execute(f"ALTER SYSTEM RESET {name}")
            conn.execute("SELECT pg_reload_conf()")
            dbmod._tune_embedded(owner_url)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (starting Ray costs seconds on 2 cores)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="gpuaas")
    yield ray
    ray.shutdown()


@pytest.fixture
def shard(fresh_db):
    """An allocation shard core (index 0 of 1) on a fresh database, without Ray: (core, owner url)."""
    from actors.allocation_shard import AllocationShardCore
    from gpuaas.config import ControlPlaneConfig

    core = AllocationShardCore(index=0, count=1, app_url=fresh_db.app, config=ControlPlaneConfig())
    yield core, fresh_db.owner
    core.db.close()
