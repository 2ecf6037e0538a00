"""ledger.db.usable: a kept connection that the server has closed while it sat idle is known to be
unusable before a statement is sent on it; a live one, idle or inside a transaction, is usable."""
from __future__ import annotations

import os
import resource
import time

import psycopg
import pytest

from ledger.db import usable


def _end(owner_url: str, pid: int) -> None:
    with psycopg.connect(owner_url, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,)).fetchone()[0]


def _wait_unusable(conn, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while usable(conn):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_usable_until_the_server_ends_an_idle_connection(fresh_db):
    conn = psycopg.connect(fresh_db.app, autocommit=True)
    try:
        assert usable(conn)
        conn.execute("SELECT 1")
        assert usable(conn)
        _end(fresh_db.owner, conn.info.backend_pid)
        assert _wait_unusable(conn)
        assert not conn.broken  # nothing was sent: psycopg itself does not know yet
    finally:
        conn.close()
    assert not usable(conn) and not usable(None)


def test_a_connection_inside_a_transaction_is_left_to_its_transaction(fresh_db):
    conn = psycopg.connect(fresh_db.app)  # not autocommit: the SELECT opens a transaction
    try:
        conn.execute("SELECT 1")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        assert usable(conn)
        conn.rollback()
        assert usable(conn)
    finally:
        conn.close()


def test_a_connection_on_a_high_descriptor_is_checked_too(fresh_db):
    """An actor's process holds many descriptors; ``select`` refuses those past 1023 (which would make
    every kept connection look unusable, and a new one be opened for every statement)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        if hard != resource.RLIM_INFINITY and hard < 1200:
            pytest.skip(f"this machine allows {hard} open files")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    fillers = [os.open(os.devnull, os.O_RDONLY)]
    try:
        while fillers[-1] < 1030:  # the connection's socket takes the next free descriptor
            fillers.append(os.dup(fillers[0]))
        conn = psycopg.connect(fresh_db.app, autocommit=True)
        try:
            assert conn.fileno() > 1023
            assert usable(conn)
            _end(fresh_db.owner, conn.info.backend_pid)
            assert _wait_unusable(conn)
        finally:
            conn.close()
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
