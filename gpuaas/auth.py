"""Tenants, bearer tokens and scopes (schema `iam`, owned here).

A token is ``gpa_<token_id>_<secret>``; only sha256(token) is stored. Every
RPC carries ``authorization: Bearer <token>``; the token maps to a tenant and
its scopes ("placement", "admin", "node"). Lookups are cached for a few
seconds so the hot path does not hit Postgres per call; a revocation takes
effect within ``CACHE_TTL_S``.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import re
import secrets
import threading
import time

from gpuaas.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from ledger.db import usable

SCOPES = frozenset({"placement", "admin", "node"})
CACHE_TTL_S = 5.0
TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,39}$")


@dataclasses.dataclass(frozen=True)
class Principal:
    tenant_id: str
    token_id: str
    scopes: frozenset[str]
    expires_at: dt.datetime | None

    def require(self, scope: str) -> None:
        if scope not in self.scopes:
            raise PermissionDenied(f"token {self.token_id} lacks the '{scope}' scope")


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def create_tenant(conn, tenant_id: str, name: str = "") -> None:
    if not TENANT_RE.match(tenant_id or ""):
        raise InvalidArgument("bad tenant id", violations=[("tenant_id", "must match [a-z0-9][a-z0-9-]{1,39}")])
    conn.execute("INSERT INTO iam.tenants (tenant_id, name) VALUES (%s, %s) ON CONFLICT (tenant_id) DO NOTHING",
                 (tenant_id, name or tenant_id))


def create_token(conn, tenant_id: str, scopes, ttl_s: int = 0) -> tuple[str, str]:
    """Returns (token_id, token). The token is shown once and never stored."""
    scopes = sorted(set(scopes))
    bad = [s for s in scopes if s not in SCOPES]
    if not scopes or bad:
        raise InvalidArgument("bad scopes", violations=[("scopes", f"each of {sorted(SCOPES)}; got {scopes}")])
    if ttl_s < 0:
        raise InvalidArgument("bad ttl", violations=[("ttl_s", "must be >= 0")])
    if conn.execute("SELECT 1 FROM iam.tenants WHERE tenant_id = %s", (tenant_id,)).fetchone() is None:
        raise NotFound(f"tenant {tenant_id} not found")
    token_id = secrets.token_hex(6)
    token = f"gpa_{token_id}_{secrets.token_urlsafe(24)}"
    expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=ttl_s) if ttl_s else None
    conn.execute("INSERT INTO iam.api_tokens (token_id, tenant_id, token_hash, scopes, expires_at)"
                 " VALUES (%s, %s, %s, %s, %s)", (token_id, tenant_id, hash_token(token), scopes, expires))
    return token_id, token


def revoke_token(conn, token_id: str) -> None:
    cur = conn.execute("UPDATE iam.api_tokens SET revoked_at = now() WHERE token_id = %s AND revoked_at IS NULL",
                       (token_id,))
    if cur.rowcount == 0:
        raise NotFound(f"token {token_id} not found or already revoked")


class Authenticator:
    """Resolves bearer tokens against iam.api_tokens, with a short cache."""

    def __init__(self, connect):
        self._connect = connect  # () -> psycopg connection (autocommit)
        self._cache: dict[bytes, tuple[float, Principal | None]] = {}
        self._lock = threading.Lock()
        self._conn = None

    def _lookup(self, digest: bytes) -> Principal | None:
        with self._lock:
            if not usable(self._conn):
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                self._conn = self._connect()
            row = self._conn.execute(
                "SELECT token_id, tenant_id, scopes, expires_at FROM iam.api_tokens"
                " WHERE token_hash = %s AND revoked_at IS NULL", (digest,)).fetchone()
        if row is None:
            return None
        return Principal(tenant_id=row[1], token_id=row[0], scopes=frozenset(row[2]), expires_at=row[3])

    def authenticate(self, metadata) -> Principal:
        token = None
        for key, value in metadata or ():
            if key == "authorization":
                token = value
                break
        if not token:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        if not token.startswith("Bearer "):
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
        digest = hash_token(token[len("Bearer "):].strip())
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is None or now - hit[0] > CACHE_TTL_S:
            if len(self._cache) > 100_000:  # bounded: a flood of bad tokens cannot grow memory
                self._cache.clear()
            hit = (now, self._lookup(digest))
            self._cache[digest] = hit
        principal = hit[1]
        if principal is None:
            raise Unauthenticated("unknown or revoked token")
        if principal.expires_at is not None and principal.expires_at <= dt.datetime.now(dt.timezone.utc):
            raise Unauthenticated(f"token {principal.token_id} expired")
        return principal
