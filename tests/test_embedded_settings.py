"""The embedded PostgreSQL runs with ledger.db.EMBEDDED_SETTINGS (new WAL segments are not zero-filled,
so commits do not stall while one is created: benchmarks/commit_stalls.py), including on a server that
was already running without them; an external database is left as its operator configured it."""
from __future__ import annotations

import psycopg
import pytest

from ledger import db as dbmod
from tests.conftest import server_setting


def _settings(url: str) -> dict[str, str]:
    with psycopg.connect(url, autocommit=True) as conn:
        return {k: conn.execute("SELECT current_setting(%s)", (k,)).fetchone()[0] for k in dbmod.EMBEDDED_SETTINGS}


def test_embedded_server_runs_with_its_settings(fresh_db):
    if not fresh_db.embedded:
        pytest.skip("an external database keeps its operator's settings")
    assert dbmod.EMBEDDED_SETTINGS == {"wal_init_zero": "off"}
    assert _settings(fresh_db.owner) == dbmod.EMBEDDED_SETTINGS
    assert _settings(fresh_db.app) == dbmod.EMBEDDED_SETTINGS  # the runtime role's sessions too


def test_settings_are_applied_to_a_server_found_running_without_them(pg_server):
    if not pg_server.embedded:
        pytest.skip("an external database keeps its operator's settings")
    with server_setting(pg_server.owner, "wal_init_zero", None):
        assert _settings(pg_server.owner) == {"wal_init_zero": "on"}  # PostgreSQL's default is back
        dbmod._tune_embedded(pg_server.owner)
        assert _settings(pg_server.owner) == dbmod.EMBEDDED_SETTINGS
