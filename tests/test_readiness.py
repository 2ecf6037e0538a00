"""runtime.Readiness against a real PostgreSQL: ready while the database answers; not ready once it
has not answered for ``fail_after`` intervals and a half (its connection ended and new ones refused,
or its backend frozen so the check hangs); ready again once a check is answered; each change reported
once; one lost connection changes nothing."""
from __future__ import annotations

import os
import signal
import threading
import time
import urllib.parse

import psycopg
import pytest

from actors.runtime import Readiness


def _db(url: str) -> str:
    return urllib.parse.urlsplit(url).path.lstrip("/")


def _wait(pred, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_ready_goes_and_comes_back_with_the_database(pg_server, fresh_db):
    seen: list[bool] = []
    changed = threading.Event()

    def on_change(ready: bool) -> None:
        seen.append(ready)
        changed.set()

    r = Readiness(fresh_db.app, on_change, interval_s=0.05, fail_after=2, timeout_s=2)
    db = _db(fresh_db.owner)
    try:
        time.sleep(0.3)  # several checks: all answered
        assert r.ready and seen == [] and r.failures == 0
        with psycopg.connect(pg_server.owner, autocommit=True) as admin:
            # The database goes away for new sessions, and its sessions end (the probe's among them).
            admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false')
            try:
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (db,))
                assert _wait(lambda: seen == [False]), f"never turned not ready: {seen}, {r.last_error}"
                assert not r.ready and r.failures >= 2 and r.last_error
            finally:
                admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
        assert _wait(lambda: seen == [False, True]), f"never ready again: {seen}"
        assert r.ready and r.changes == 2
    finally:
        r.stop()


def test_one_failed_check_is_not_an_outage(fresh_db):
    """A connection lost once (a failover, a restart) is replaced at the next check: still ready."""
    seen: list[bool] = []
    r = Readiness(fresh_db.app, seen.append, interval_s=0.05, fail_after=2, timeout_s=2)
    try:
        assert _wait(lambda: r._conn is not None)
        pid = r._conn.info.backend_pid
        with psycopg.connect(fresh_db.owner, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        assert _wait(lambda: (c := r._conn) is not None and not c.closed and c.info.backend_pid not in (0, pid))
        time.sleep(0.2)
        assert r.ready and seen == []
    finally:
        r.stop()


def test_a_check_the_server_never_answers_is_an_outage(fresh_db):
    """The probe's backend is frozen (SIGSTOP): its SELECT 1 hangs rather than fails. Not ready once the
    last answer is old enough; ready again when the backend runs on and answers."""
    if not fresh_db.embedded:
        pytest.skip("signals the server's backend process: only on the embedded test server")
    seen: list[bool] = []
    r = Readiness(fresh_db.app, seen.append, interval_s=0.05, fail_after=2, timeout_s=2)
    try:
        assert _wait(lambda: (c := r._conn) is not None and not c.closed and c.info.backend_pid)
        pid = r._conn.info.backend_pid
        os.kill(pid, signal.SIGSTOP)
        try:
            assert _wait(lambda: seen == [False]), f"never turned not ready: {seen}"
            assert r.failures == 0  # nothing failed: the check is still waiting for its answer
        finally:
            os.kill(pid, signal.SIGCONT)
        assert _wait(lambda: seen == [False, True]), f"never ready again: {seen}"
    finally:
        r.stop()
