"""Apply the SQL migrations of every domain, in file order, exactly once.

Migrations live in ``ledger/migrations/NNNN_<schema>_<what>.sql``. Each file
runs in its own transaction, recorded in ``public.schema_migrations`` with a
checksum; an applied file whose text changed is an error (write a new
migration instead). A session-level advisory lock makes concurrent starters
wait for each other.
"""
from __future__ import annotations

import hashlib
import logging
import pathlib

log = logging.getLogger("gpuaas.migrate")

MIGRATIONS_DIR = pathlib.Path(__file__).resolve().parent / "migrations"
_LOCK_ID = 0x67707561  # "gpua"


def migration_files() -> list[pathlib.Path]:
    return sorted(MIGRATIONS_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql"))


def apply_migrations(owner_url: str) -> list[str]:
    """Apply pending migrations as the owner; returns the names applied."""
    import psycopg

    applied: list[str] = []
    with psycopg.connect(owner_url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_ID,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS public.schema_migrations ("
                " name text PRIMARY KEY, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())")
            done = dict(conn.execute("SELECT name, checksum FROM public.schema_migrations").fetchall())
            for path in migration_files():
                text = path.read_text()
                digest = hashlib.sha256(text.encode()).hexdigest()
                if path.name in done:
                    if done[path.name] != digest:
                        raise RuntimeError(
                            f"migration {path.name} changed after it was applied; add a new migration instead")
                    continue
                with conn.transaction():
                    conn.execute(text)
                    conn.execute("INSERT INTO public.schema_migrations (name, checksum) VALUES (%s, %s)",
                                 (path.name, digest))
                log.info("applied migration %s", path.name)
                applied.append(path.name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))
    return applied
