"""Where the database is, and how to reach it.

Default: an embedded PostgreSQL started from the ``pgserver`` package in
``$GPUAAS_HOME/pg`` (``$GPUAAS_HOME`` defaults to the user's data dir), so one
command runs everything on a fresh machine. ``GPUAAS_DATABASE_URL`` points at
any external PostgreSQL instead (what a fleet uses).

Two roles:
- the *owner* URL runs migrations (the embedded server's superuser, or the
  user in ``GPUAAS_DATABASE_URL``);
- the *runtime* URL connects as ``gpuaas_app``, which holds only INSERT and
  SELECT on ledger tables (see migrations/0009_roles.sql). For an external
  database set ``GPUAAS_APP_DATABASE_URL``; otherwise the owner URL's user is
  swapped for ``gpuaas_app`` (password from ``GPUAAS_APP_PASSWORD``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import select
import urllib.parse

import platformdirs

log = logging.getLogger("gpuaas.db")

APP_ROLE = "gpuaas_app"


def gpuaas_home() -> pathlib.Path:
    home = os.environ.get("GPUAAS_HOME") or platformdirs.user_data_dir("gpuaas")
    path = pathlib.Path(home).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclasses.dataclass(frozen=True)
class DatabaseUrls:
    owner: str
    app: str
    embedded: bool


def _with_user(url: str, user: str, password: str | None) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = urllib.parse.quote(user)
    if password:
        netloc += ":" + urllib.parse.quote(password)
    netloc += "@" + host
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


_EMBEDDED = {}


def start_embedded(data_dir: pathlib.Path | None = None, *, scratch: bool = False):
    """Start (or reuse) the embedded server; returns the pgserver handle.

    The server keeps running while any process holding a handle lives; the
    handle stops it at interpreter exit of the last holder. ``scratch``: the
    folder is deleted then too (benchmarks: a fresh database per run, and no
    gigabytes left behind).
    """
    import pgserver  # imported lazily: external-database deployments never need it

    # The unix socket lives in the data dir, whose path must stay short.
    data_dir = (data_dir or gpuaas_home() / "pg").resolve()
    key = str(data_dir)
    if key not in _EMBEDDED:
        data_dir.mkdir(parents=True, exist_ok=True)
        log.info("starting embedded PostgreSQL in %s", data_dir)
        _EMBEDDED[key] = pgserver.get_server(data_dir, cleanup_mode="delete" if scratch else "stop")
        _tune_embedded(_EMBEDDED[key].get_uri())
    return _EMBEDDED[key]


# Settings the embedded server runs with, beyond its defaults (an external database is its operator's).
#
# wal_init_zero: by default PostgreSQL fills each new 16 MB WAL segment with zeros, and the backend
# that needs the segment does it while it holds the WAL write lock, so every commit in flight waits
# for it. benchmarks/commit_stalls.py (one-row commits every 2 ms beside a bulk writer, medians of
# 3): commit p99.9 22.8 ms and max 27.5 ms with the default, 6.5 and 8.2 ms with it off, median and
# p99 unchanged; in an earlier run the default stalled 45-62 ms at every new segment. A placement is answered only after its commit, so each stall
# is a burst of slow answers. A fresh or fast-growing WAL creates segments (checkpoints recycle old
# ones later). Off, the segment is created at its full size without being written (on ext4 and
# xfs, without its blocks); the cost is that a full disk shows up at a WAL write rather than at
# segment creation, both of which stop the server.
EMBEDDED_SETTINGS = {"wal_init_zero": "off"}


def _tune_embedded(owner_url: str) -> None:
    import psycopg

    with psycopg.connect(owner_url, autocommit=True) as conn:
        changed = False
        for name, value in EMBEDDED_SETTINGS.items():
            was = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()[0]
            if was != value:
                conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
                log.info("embedded PostgreSQL: %s set to %s (was %s)", name, value, was)
                changed = True
        if changed:
            conn.execute("SELECT pg_reload_conf()")


def stop_embedded(data_dir: pathlib.Path) -> None:
    """Stop the embedded server of ``data_dir`` started by this process (deleting its folder when it
    was started as scratch)."""
    handle = _EMBEDDED.pop(str(data_dir.resolve()), None)
    if handle is not None:
        handle.cleanup()


def resolve(data_dir: pathlib.Path | None = None, *, scratch: bool = False) -> DatabaseUrls:
    """Find (or start) the database and return its owner and runtime URLs (``scratch``: see start_embedded)."""
    external = os.environ.get("GPUAAS_DATABASE_URL")
    if external:
        app = os.environ.get("GPUAAS_APP_DATABASE_URL") or _with_user(
            external, APP_ROLE, os.environ.get("GPUAAS_APP_PASSWORD"))
        return DatabaseUrls(owner=external, app=app, embedded=False)
    server = start_embedded(data_dir, scratch=scratch)
    owner = server.get_uri()
    # pgserver answers postgresql://postgres:@/postgres?host=<socket dir>
    app = owner.replace("postgres:@", f"{APP_ROLE}:@", 1)
    return DatabaseUrls(owner=owner, app=app, embedded=True)


# What "committed before the answer" rests on. Each is a server setting an operator can turn off for
# speed (synchronous_commit also per role, per database or per session): the answer would then go out
# before the commit is safe on disk, and a crash could lose a placement its client was told about, or a
# ledger entry, with nothing to show for it. Allowed values; anything else is a problem.
DURABILITY_SETTINGS = {
    # off: PostgreSQL never asks the OS to flush; a crash of the machine can corrupt the database.
    "fsync": ("on",),
    # off: a commit is acknowledged before its WAL is flushed; up to three times wal_writer_delay
    # of acknowledged commits are lost in a crash. local / remote_*: flushed locally first.
    "synchronous_commit": ("on", "local", "remote_write", "remote_apply"),
    # off: a page half-written at a crash cannot be repaired from the WAL.
    "full_page_writes": ("on",),
}


class NonDurableDatabase(RuntimeError):
    """The database acknowledges commits it may lose (DURABILITY_SETTINGS); ControlPlaneConfig.
    allow_non_durable_database starts anyway, for throwaway databases."""


def durability_problems(url: str, *, timeout_s: int = 10) -> list[str]:
    """What in a new session at ``url`` (so with its role's and database's own settings) would let a
    commit be acknowledged and then lost: one sentence each, empty when nothing would."""
    import psycopg

    out = []
    with psycopg.connect(url, autocommit=True, connect_timeout=timeout_s) as conn:
        user = conn.info.user
        for name, allowed in DURABILITY_SETTINGS.items():
            value = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()[0]
            if value not in allowed:
                out.append(f"{name} is {value!r} for {user!r} (wanted {' or '.join(allowed)}): "
                           "a commit can be acknowledged and then lost in a crash")
    return out


def connect(url: str, **kwargs):
    import psycopg

    kwargs.setdefault("autocommit", False)
    return psycopg.connect(url, **kwargs)


def usable(conn) -> bool:
    """Whether a kept connection can take the next statement, checked without a round trip.

    A server that restarts, fails over or ends idle sessions closes the connections it holds, and an
    idle client learns of it only by using one: the next statement fails, and a gRPC handler would
    answer UNAVAILABLE for a request that never reached the database. An idle connection on which the
    server has spoken (its farewell message, or the end of the socket) is not usable: nothing else
    arrives unasked on a connection that does not LISTEN. One poll of the socket, a few microseconds;
    a connection inside a transaction is taken as it is (its failure belongs to that transaction)."""
    import psycopg

    if conn is None or conn.closed or conn.broken:
        return False
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        return True
    # poll, not select: select refuses descriptors past 1023, and an actor's process holds many.
    poller = select.poll()
    try:
        poller.register(conn.fileno(), select.POLLIN)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False
