"""A database that would acknowledge commits it may lose (fsync, synchronous_commit or full_page_writes
off: ledger.db.DURABILITY_SETTINGS) is named as such, and the control plane refuses to start on it
before writing anything, unless allow_non_durable_database says to go on (with a warning)."""
from __future__ import annotations

import logging
import urllib.parse

import psycopg
import pytest

from actors.bootstrap import ControlPlane
from gpuaas.config import ControlPlaneConfig
from ledger import db as dbmod
from tests.conftest import server_setting


def _db_name(url: str) -> str:
    return urllib.parse.urlsplit(url).path.lstrip("/")


def _set_for_database(owner_url: str, setting: str, value: str | None) -> None:
    with psycopg.connect(owner_url, autocommit=True) as conn:
        db = _db_name(owner_url)
        if value is None:
            conn.execute(f'ALTER DATABASE "{db}" RESET {setting}')
        else:
            conn.execute(f'ALTER DATABASE "{db}" SET {setting} = {value}')


def test_a_durable_database_has_no_problems(fresh_db):
    assert dbmod.durability_problems(fresh_db.owner) == []
    assert dbmod.durability_problems(fresh_db.app) == []


def test_synchronous_commit_off_for_the_database_is_named(fresh_db):
    _set_for_database(fresh_db.owner, "synchronous_commit", "off")
    problems = dbmod.durability_problems(fresh_db.app)
    assert len(problems) == 1
    assert problems[0].startswith("synchronous_commit is 'off' for 'gpuaas_app'")
    assert "lost in a crash" in problems[0]
    _set_for_database(fresh_db.owner, "synchronous_commit", "local")  # flushed locally: durable
    assert dbmod.durability_problems(fresh_db.app) == []


def test_full_page_writes_off_on_the_server_is_named(fresh_db):
    if not fresh_db.embedded:
        pytest.skip("changes a server-wide setting: only on the embedded test server")
    with server_setting(fresh_db.owner, "full_page_writes", "off"):
        problems = dbmod.durability_problems(fresh_db.app)
        assert [p.split(" for ")[0] for p in problems] == ["full_page_writes is 'off'"]
    assert dbmod.durability_problems(fresh_db.app) == []


@pytest.mark.parametrize("where", ["database", "runtime role"])
def test_the_control_plane_refuses_a_non_durable_database_before_writing(fresh_db, monkeypatch, where):
    """Off for the whole database (the owner's session sees it: refused before the migrations), or only
    for the runtime role there (refused after them, before anything else)."""
    monkeypatch.setenv("GPUAAS_DATABASE_URL", fresh_db.owner)
    monkeypatch.setenv("GPUAAS_APP_DATABASE_URL", fresh_db.app)
    if where == "database":
        _set_for_database(fresh_db.owner, "synchronous_commit", "off")
    else:
        with psycopg.connect(fresh_db.owner, autocommit=True) as conn:
            conn.execute(f'ALTER ROLE {dbmod.APP_ROLE} IN DATABASE "{_db_name(fresh_db.owner)}" '
                         "SET synchronous_commit = off")
        assert dbmod.durability_problems(fresh_db.owner) == []
    cp = ControlPlane(config=ControlPlaneConfig(listen="127.0.0.1:0"))
    try:
        with pytest.raises(dbmod.NonDurableDatabase) as err:
            cp.start()
        assert "synchronous_commit is 'off'" in str(err.value)
        assert "allow-non-durable-database" in str(err.value)
        assert cp.placement is None and cp.admin_token == ""  # no actor started, nothing seeded
        with psycopg.connect(fresh_db.owner, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM iam.tenants").fetchone()[0] == 0
            assert conn.execute("SELECT count(*) FROM iam.api_tokens").fetchone()[0] == 0
    finally:
        cp.stop()  # what `gpuaas up` does after a failed start: must not fail itself


def test_allowed_it_goes_on_with_a_warning(fresh_db, caplog):
    _set_for_database(fresh_db.owner, "synchronous_commit", "off")
    cp = ControlPlane(config=ControlPlaneConfig(listen="127.0.0.1:0", allow_non_durable_database=True))
    try:
        with caplog.at_level(logging.WARNING, logger="gpuaas.up"):
            cp._check_durable(fresh_db.app)
        assert any("database not durable, started anyway" in r.getMessage() and "synchronous_commit" in r.getMessage()
                   for r in caplog.records)
    finally:
        cp.stop()


def test_gpuaas_up_takes_the_flag():
    from gpuaas import cli

    assert cli._config(cli.build_parser().parse_args(["up"])).allow_non_durable_database is False
    assert cli._config(cli.build_parser().parse_args(["up", "--allow-non-durable-database"])
                       ).allow_non_durable_database is True


def test_the_metrics_endpoint_sees_a_setting_changed_while_running(fresh_db, caplog):
    """gpuaas_database_durable: 1 at start; 0 (and an error in the log) once the runtime role's sessions
    would no longer flush before acknowledging, read from a new session at the next check."""
    from actors import metrics
    from actors.placement import PlacementCore

    core = PlacementCore(app_url=fresh_db.app, config=ControlPlaneConfig(reconcile_s=0), alloc_shards=[],
                         node_shards=[])
    try:
        collector = metrics.ControlPlaneCollector(core)
        collector.DURABILITY_CHECK_S = 0.0  # read at every scrape

        def durable() -> float:
            (fam,) = [f for f in collector.collect() if f.name == "gpuaas_database_durable"]
            return fam.samples[0].value

        assert durable() == 1
        _set_for_database(fresh_db.owner, "synchronous_commit", "off")
        with caplog.at_level(logging.ERROR, logger="gpuaas.metrics"):
            assert durable() == 0
        assert any("may now lose acknowledged commits: synchronous_commit is 'off'" in r.getMessage()
                   for r in caplog.records)
        _set_for_database(fresh_db.owner, "synchronous_commit", None)
        assert durable() == 1
    finally:
        core.shutdown()
