"""The single write path of the ledger: batched, hash-chained, idempotent.

    caller transaction ─► lock() ─► append_usage(rows) ─┬─► validate every row (nothing written on error)
                                                        ├─► encode + chain + COPY binary usage_entries
                                                        └─► rate + chain + COPY binary billing_entries
                          COMMIT (one per batch; an error anywhere rolls back all of it)

One writer at a time: ``lock()`` takes a transaction-scoped advisory lock, so
the chain head read under it stays the head until COMMIT and ids stay
contiguous. Idempotency keys: usage (allocation_id, seq, replica, kind), billing
(usage_entry_id, side), meter events (event_id), prices (gpu_model,
effective_from). A replayed entry with the same body is counted as ``exists``;
a different body raises ``IdempotencyConflict`` naming the field.

Times are integers: microseconds since the Unix epoch (``*_us``). Money is
integer micro-units. Quantities are gpu-milli-microseconds.
"""
from __future__ import annotations

import bisect
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import socket
import struct
from typing import NamedTuple, Sequence

import psycopg
from psycopg.copy import LibpqWriter

from ledger import chain
from ledger.chain import (BILLING_ENTRIES, BILLING_FIXED, I64_FIELD, METER_EVENTS, NULL_FIELD,
                          PG_EPOCH_OFFSET_US, PRICE_BOOK, USAGE_ENTRIES, USAGE_FIXED, ChainedTable)
from ledger.errors import IdempotencyConflict, InvalidEntry

log = logging.getLogger("gpuaas.ledger.store")

WRITER_LOCK = 0x6C656467  # "ledg"
USAGE, REVERSAL, CORRECTION = 0, 1, 2
DEBIT, CREDIT = 1, 2
START, STOP = 1, 2
MILLI_US_PER_GPU_HOUR = 1000 * 3600 * 1_000_000
batch_rows_max = 100_000
# Rows per COPY write: encoding one chunk takes ~1 ms, well under the time the
# server needs for what the socket already holds, so it never waits for us.
copy_chunk_rows = 500
# Bytes queued in libpq before the writer waits for them to reach the socket
# (psycopg >= 3.3; older versions wait on every write, which is also correct).
copy_flush_bytes = 1 << 20
# Kernel send buffer asked for on the writer's socket (capped by the OS, e.g.
# net.core.wmem_max): it lets the server keep ingesting queued rows while this
# process is descheduled on a busy machine, instead of waiting for it.
copy_socket_buffer = 4 << 20
_CACHE_MAX = 200_000


class _CacheMiss(Exception):
    """A row names a tenant the cache does not hold (yet): abort the attempt, refresh, retry."""


def _writer(cur: psycopg.Cursor):
    """COPY writer that queues up to copy_flush_bytes in libpq instead of waiting on every write."""
    try:
        return LibpqWriter(cur, flush_threshold=copy_flush_bytes)
    except TypeError:  # psycopg < 3.3
        return None


def _widen_send_buffer(conn: psycopg.Connection) -> None:
    """Ask for a copy_socket_buffer-sized kernel send buffer on the connection's socket (best effort)."""
    try:
        fd = conn.pgconn.socket
        s = socket.socket(fileno=os.dup(fd))
        try:
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < copy_socket_buffer:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, copy_socket_buffer)
        finally:
            s.close()
    except (OSError, psycopg.Error):
        pass


class UsageRow(NamedTuple):
    """One metered interval of one allocation replica (input of append_usage)."""
    allocation_id: str
    seq: int
    replica: int
    kind: int           # USAGE or CORRECTION (reversals go through reverse_usage)
    start_us: int
    end_us: int
    gpu_count: int
    gpu_milli: int      # share of each GPU, 1..1000
    tenant_id: str
    node_id: str
    gpu_model: str
    util_bp: int = 0    # average utilization, basis points (0..10000)
    energy_mj: int = 0  # millijoules

    @property
    def key(self) -> str:
        return f"{self.allocation_id}/{self.seq}/{self.replica}/{self.kind}"


class MeterEvent(NamedTuple):
    event_id: int
    allocation_id: str
    kind: int           # START or STOP
    at_us: int
    outbox_id: int
    tenant_id: str
    event: str
    replicas: tuple     # ((node_id, gpu_model, gpu_count, gpu_milli), ...) for START, () for STOP


class Price(NamedTuple):
    price_id: int
    gpu_model: str
    currency: str
    micros_per_gpu_hour: int
    effective_from_us: int


@dataclasses.dataclass
class AppendResult:
    written: int = 0
    exists: int = 0
    billing_written: int = 0

    def __iadd__(self, other: "AppendResult") -> "AppendResult":
        self.written += other.written
        self.exists += other.exists
        self.billing_written += other.billing_written
        return self


def to_us(t: dt.datetime) -> int:
    if t.tzinfo is None:
        raise ValueError("naive datetime: ledger times are timezone-aware")
    d = t - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds


def from_us(us: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=us)


def rate(gpu_milli_us: int, micros_per_gpu_hour: int) -> int:
    """Amount in micro-units, rounded half up (exact integer arithmetic)."""
    return (gpu_milli_us * micros_per_gpu_hour + MILLI_US_PER_GPU_HOUR // 2) // MILLI_US_PER_GPU_HOUR


def tenant_account(tenant_id: str, currency: str) -> str:
    return f"tenant:{tenant_id}:{currency}"


def revenue_account(currency: str) -> str:
    return f"revenue:{currency}"


def replicas_json(replicas) -> str:
    return json.dumps([list(r) for r in replicas], separators=(",", ":"))


class LedgerStore:
    """Writes ledger rows on one connection, inside the caller's transaction."""

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn
        self._tenants: set[str] = set()
        self._prices: dict[str, list[Price]] = {}
        self._price_times: dict[str, list[int]] = {}
        self._price_head = -1  # max(price_book.id) the price cache was loaded at
        self._socket_widened = None
        self._accounts: set[str] = set()
        self._text_cache: dict[str, bytes] = {}
        # Encoder caches (bounded): allocation id -> 16 bytes; (tenant, node, model) ->
        # (encoded text tail, effective_from of the model's latest price, that price).
        # A tail exists only for a known tenant and a priced model.
        self._uuids: dict[str, bytes] = {}
        self._tails: dict[tuple[str, str, str], tuple[bytes, int, Price]] = {}

    # ------------------------------------------------------------ reference data

    def lock(self) -> None:
        """Serialize ledger writers until this transaction ends."""
        self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITER_LOCK,))

    def head(self, table: ChainedTable) -> tuple[int, bytes]:
        r = self.conn.execute(f"SELECT id, hash FROM {table.qualified} ORDER BY id DESC LIMIT 1").fetchone()
        return (r[0], bytes(r[1])) if r else (0, table.genesis)

    def tenant_known(self, tenant_id: str, *, refresh: bool = True) -> bool:
        if tenant_id not in self._tenants and refresh:
            self._tenants = {r[0] for r in self.conn.execute("SELECT tenant_id FROM iam.tenants")}
        return tenant_id in self._tenants

    def reload_prices(self) -> None:
        prices: dict[str, list[Price]] = {}
        for pid, model, cur, micros, eff in self.conn.execute(
                "SELECT id, gpu_model, currency, micros_per_gpu_hour, effective_from FROM ledger.price_book"
                " ORDER BY gpu_model, effective_from"):
            prices.setdefault(model, []).append(Price(pid, model, cur, micros, to_us(eff)))
        self._prices = prices
        self._price_times = {m: [p.effective_from_us for p in v] for m, v in prices.items()}
        self._price_head = max((p.price_id for v in prices.values() for p in v), default=0)
        self._tails = {}

    def sync_prices(self) -> None:
        """Reload the price cache if the price book grew since it was loaded (one index probe).

        Called under the writer lock, which price writers take too, so the
        cache then holds every version in force for this transaction."""
        head = self.conn.execute("SELECT coalesce(max(id), 0) FROM ledger.price_book").fetchone()[0]
        if head != self._price_head:
            self.reload_prices()

    def refresh_tenants(self) -> None:
        self._tenants = {r[0] for r in self.conn.execute("SELECT tenant_id FROM iam.tenants")}
        self._tails = {}

    def price_at(self, gpu_model: str, at_us: int, *, refresh: bool = True) -> Price | None:
        """The price version in force at ``at_us`` (latest effective_from <= at)."""
        for attempt in (0, 1):
            versions = self._prices.get(gpu_model)
            if versions:
                last = versions[-1]
                if at_us >= last.effective_from_us:
                    return last
                i = bisect.bisect_right(self._price_times[gpu_model], at_us) - 1
                if i >= 0:
                    return versions[i]
            if attempt == 0 and refresh:
                self.reload_prices()
        return None

    def _ensure_accounts(self, tenants_currencies: set[tuple[str, str]]) -> None:
        want = []
        for tenant, cur in tenants_currencies:
            for acc, kind, t in ((tenant_account(tenant, cur), "tenant", tenant), (revenue_account(cur), "revenue", None)):
                if acc not in self._accounts:
                    want.append((acc, kind, t, cur))
        if not want:
            return
        with self.conn.cursor() as cur:
            cur.executemany("INSERT INTO ledger.accounts (account_id, kind, tenant_id, currency) VALUES (%s, %s, %s, %s)"
                            " ON CONFLICT (account_id) DO NOTHING", want)
        self._accounts.update(a for a, *_ in want)

    def _text(self, s: str) -> bytes:
        b = self._text_cache.get(s)
        if b is None:
            if len(self._text_cache) > 100_000:
                self._text_cache.clear()
            b = self._text_cache[s] = chain.text_field(s)
        return b

    def _copy(self, table: ChainedTable, payload: bytes) -> None:
        with self.conn.cursor() as cur:
            with cur.copy(f"COPY {table.qualified} ({table.column_list()}) FROM STDIN (FORMAT binary)") as cp:
                cp.write(payload)

    # ------------------------------------------------------------ usage + billing

    def prefetch(self, rows: Sequence[UsageRow]) -> None:
        """Refresh the tenant and price caches once if a row names something not cached yet."""
        if not {r.tenant_id for r in rows} <= self._tenants:
            self.refresh_tenants()
        if not {r.gpu_model for r in rows} <= self._prices.keys():
            self.reload_prices()

    def validate_usage(self, rows: Sequence[UsageRow], offset: int = 0, *, refresh: bool = True) -> list[Price]:
        """Check every row; returns the price of each. Raises InvalidEntry naming row and field.

        With ``refresh=False`` only the caches are consulted (no query: used
        while a COPY is in progress; call prefetch() first)."""
        prices = []
        for i, r in enumerate(rows, start=offset):
            where = f"usage row {i} ({r.allocation_id} seq {r.seq})"
            if r.kind not in (USAGE, CORRECTION):
                raise InvalidEntry(f"{where}: kind must be usage or correction, got {r.kind}", field="kind")
            if r.end_us < r.start_us:
                raise InvalidEntry(f"{where}: interval ends before it starts", field="interval_end")
            if r.end_us == r.start_us:
                raise InvalidEntry(f"{where}: empty interval (zero duration)", field="interval_end")
            if not (1 <= r.gpu_milli <= 1000):
                raise InvalidEntry(f"{where}: gpu_milli must be 1..1000, got {r.gpu_milli}", field="gpu_milli")
            if r.gpu_count <= 0:
                raise InvalidEntry(f"{where}: gpu_count must be positive, got {r.gpu_count}", field="gpu_count")
            if r.seq < 0 or r.replica < 0:
                raise InvalidEntry(f"{where}: seq and replica must be >= 0", field="seq")
            if not (0 <= r.util_bp <= 10_000) or r.energy_mj < 0:
                raise InvalidEntry(f"{where}: utilization must be 0..10000 bp and energy >= 0", field="util_bp")
            if not self.tenant_known(r.tenant_id, refresh=refresh):
                raise InvalidEntry(f"{where}: unknown tenant {r.tenant_id!r}", field="tenant_id")
            p = self.price_at(r.gpu_model, r.start_us, refresh=refresh)
            if p is None:
                raise InvalidEntry(f"{where}: no price for GPU model {r.gpu_model!r} at "
                                   f"{from_us(r.start_us).isoformat()}", field="gpu_model")
            prices.append(p)
        return prices

    def append_usage(self, rows: Sequence[UsageRow], *, bill: bool = True) -> AppendResult:
        """Append usage rows (and, with ``bill``, their two billing lines each).

        Must run inside a transaction after ``lock()``. Every row is validated
        (an invalid row fails the whole batch); replays with the same body are
        skipped and counted as exists.
        """
        if len(rows) > batch_rows_max:
            raise InvalidEntry(f"batch of {len(rows)} rows exceeds batch_rows_max={batch_rows_max}", field="rows")
        res = AppendResult()
        if not rows:
            return res
        # Fast path: no key exists yet (the common case); the rows go straight
        # into the table and the unique constraint is the idempotency check. A
        # unique violation rolls the savepoint back and sends us to the slow
        # path, which compares bodies. A tenant not in the cache aborts the
        # attempt the same way (nothing written), the cache is refreshed and the
        # batch retried once; the retry treats a miss as an unknown tenant.
        for may_miss in (True, False):
            try:
                with self.conn.transaction():
                    self._write_usage(rows, bill, may_miss=may_miss)
                    res.written = len(rows)
                    res.billing_written = 2 * len(rows) if bill else 0
                    return res
            except _CacheMiss:
                self._accounts = set()
                self.refresh_tenants()
            except psycopg.errors.UniqueViolation:
                self._accounts = set()  # the savepoint took any accounts it created with it
                break
        self.validate_usage(rows)
        keep, seen = [], {}
        existing = self._existing_usage(rows)
        for r in rows:
            k = (r.allocation_id, r.seq, r.replica, r.kind)
            other = existing.get(k) or seen.get(k)
            if other is not None:
                _compare_usage(r, other)
                res.exists += 1
                continue
            seen[k] = r
            keep.append(r)
        if keep:
            self._write_usage(keep, bill, may_miss=False)
            res.written = len(keep)
            res.billing_written = 2 * len(keep) if bill else 0
        return res

    def _existing_usage(self, rows: Sequence[UsageRow]) -> dict[tuple, UsageRow]:
        cols = ([], [], [], [])
        for r in rows:
            cols[0].append(r.allocation_id)
            cols[1].append(r.seq)
            cols[2].append(r.replica)
            cols[3].append(r.kind)
        out = {}
        for rec in self.conn.execute(
                "SELECT u.allocation_id::text, u.seq, u.replica, u.kind, u.interval_start, u.interval_end,"
                " u.gpu_count, u.gpu_milli, u.tenant_id, u.node_id, u.gpu_model, u.util_bp, u.energy_mj"
                " FROM ledger.usage_entries u"
                " JOIN unnest(%b::uuid[], %b::int[], %b::int2[], %b::int2[]) AS k(a, s, r, kd)"
                "   ON u.allocation_id = k.a AND u.seq = k.s AND u.replica = k.r AND u.kind = k.kd", cols):
            r = UsageRow(rec[0], rec[1], rec[2], rec[3], to_us(rec[4]), to_us(rec[5]), *rec[6:])
            out[(r.allocation_id, r.seq, r.replica, r.kind)] = r
        return out

    def _uuid(self, s: str) -> bytes:
        if len(self._uuids) >= _CACHE_MAX:
            self._uuids.clear()
        try:
            b = self._uuids[s] = chain.uuid_bytes(s)
        except (ValueError, AttributeError):
            raise InvalidEntry(f"allocation_id {s!r} is not a UUID", field="allocation_id") from None
        return b

    def _tail(self, tenant: str, node: str, model: str) -> tuple[bytes, int, Price] | None:
        """Encoded text tail of a (tenant, node, model), or None if the tenant or the model's price is unknown."""
        versions = self._prices.get(model)
        if tenant not in self._tenants or not versions:
            return None
        if len(self._tails) >= _CACHE_MAX:
            self._tails.clear()
        t = self._tails[(tenant, node, model)] = (
            NULL_FIELD + chain.text_field(tenant) + chain.text_field(node) + chain.text_field(model),
            versions[-1].effective_from_us, versions[-1])
        return t

    def encode_usage(self, rows: Sequence[UsageRow], first_id: int, prev_hash: bytes, framed: bool = True, *,
                     offset: int = 0, may_miss: bool = False) -> tuple[bytes, bytes, list[int], list[Price]]:
        """Validate ``rows`` and build their binary COPY payload, ids from ``first_id``, chained onto ``prev_hash``.

        Returns (payload, last hash, gpu_milli_us per row, price per row). The
        canonical content of a row is exactly its COPY tuple minus the trailing
        hash. Uses the tenant and price caches only (no query: it runs while a
        COPY is in progress); an invalid row raises InvalidEntry naming the row
        (``offset`` + index) and the field, an uncached tenant with
        ``may_miss`` raises _CacheMiss.

        One pass per row: a single combined range check (the detailed checks
        of validate_usage() run only for a row that fails it, to name the
        field), one cached tail lookup that stands for "tenant known and model
        priced", one struct pack, one sha256.
        """
        h = prev_hash
        sha = hashlib.sha256
        pack = USAGE_FIXED.pack
        tails = self._tails
        uuids = self._uuids
        nf = b"\x00\x11"  # 17 fields: 16 content + hash
        hl = b"\x00\x00\x00\x20"
        off = PG_EPOCH_OFFSET_US
        out = [chain.COPY_HEADER] if framed else []
        put = out.extend
        amounts: list[int] = []
        prices: list[Price] = []
        add_amount = amounts.append
        add_price = prices.append
        i = first_id - 1
        try:
            for r in rows:
                i += 1
                alloc, seq, rep, kind, start, end, cnt, milli, tenant, node, model, util, energy = r
                if not ((kind == 0 or kind == 2) and start < end and 0 < milli <= 1000 and cnt > 0 and seq >= 0
                        and rep >= 0 and 0 <= util <= 10_000 and energy >= 0):
                    self.validate_usage((r,), offset + i - first_id, refresh=False)
                t = tails.get((tenant, node, model))
                if t is None:
                    t = self._tail(tenant, node, model)
                    if t is None:
                        if may_miss and tenant not in self._tenants:
                            raise _CacheMiss(tenant)
                        self.validate_usage((r,), offset + i - first_id, refresh=False)
                        raise AssertionError("unreachable: validate_usage accepted an uncached row")
                tail, eff, p = t
                if start < eff:  # an older price version is in force at the interval's start
                    p = self.price_at(model, start, refresh=False)
                    if p is None:
                        self.validate_usage((r,), offset + i - first_id, refresh=False)
                ab = uuids.get(alloc)
                if ab is None:
                    ab = self._uuid(alloc)
                mus = cnt * milli * (end - start)
                content = pack(8, i, 16, ab, 4, seq, 2, rep, 2, kind, 8, start - off, 8, end - off, 4, cnt,
                               4, milli, 8, mus, 4, util, 8, energy) + tail
                h = sha(h + content).digest()
                put((nf, content, hl, h))
                add_amount(mus)
                add_price(p)
        except (struct.error, TypeError, ValueError) as e:
            n = offset + i - first_id
            raise InvalidEntry(f"usage row {n}: value of the wrong type or out of range ({e})",
                               field="row") from None
        if framed:
            out.append(chain.COPY_TRAILER)
        return b"".join(out), h, amounts, prices

    def _write_usage(self, rows: Sequence[UsageRow], bill: bool, *, may_miss: bool = False) -> int:
        """Validate, encode and COPY in chunks, so PostgreSQL ingests chunk k while we encode k+1.

        The chunks are small and the writer does not wait for each to be sent,
        so the server always has the next rows queued. A validation error in
        any chunk aborts the COPY (and the caller's savepoint): nothing of the
        batch is written.
        """
        self.sync_prices()
        if self._socket_widened is not self.conn.pgconn:
            _widen_send_buffer(self.conn)
            self._socket_widened = self.conn.pgconn
        last_id, h = self.head(USAGE_ENTRIES)
        first_id = last_id + 1
        if bill:  # billing lines are rated, encoded and chained chunk by chunk too, while the server ingests usage
            last_bid, hb = self.head(BILLING_ENTRIES)
            bill_parts = [chain.COPY_HEADER]
            accounts: set[tuple[str, str]] = set()
            bid = last_bid + 1
        encode = self.encode_usage
        with self.conn.cursor() as cur:
            with cur.copy(f"COPY {USAGE_ENTRIES.qualified} ({USAGE_ENTRIES.column_list()}) FROM STDIN"
                          " (FORMAT binary)", writer=_writer(cur)) as cp:
                write = cp.write
                write(chain.COPY_HEADER)
                for lo in range(0, len(rows), copy_chunk_rows):
                    chunk = rows[lo:lo + copy_chunk_rows]
                    payload, h, am, ps = encode(chunk, first_id + lo, h, False, offset=lo, may_miss=may_miss)
                    write(payload)
                    if bill:
                        lines = self.billing_lines(chunk, ps, am, first_id + lo)
                        bp, hb = self.encode_billing(lines, bid, hb, framed=False)
                        bill_parts.append(bp)
                        bid += len(lines)
                        accounts.update(zip([r.tenant_id for r in chunk], [p.currency for p in ps]))
                write(chain.COPY_TRAILER)
        if bill:
            self._ensure_accounts(accounts)
            bill_parts.append(chain.COPY_TRAILER)
            self._copy(BILLING_ENTRIES, b"".join(bill_parts))
        return first_id

    def billing_lines(self, rows, prices, amounts, first_id) -> list[tuple]:
        lines = []
        for uid, (r, p, mus) in enumerate(zip(rows, prices, amounts), start=first_id):
            amount = rate(mus, p.micros_per_gpu_hour)
            lines.append((uid, DEBIT, amount, p.price_id, r.end_us, None,
                          tenant_account(r.tenant_id, p.currency), p.currency))
            lines.append((uid, CREDIT, amount, p.price_id, r.end_us, None, revenue_account(p.currency), p.currency))
        return lines

    def encode_billing(self, lines: list[tuple], first_id: int, prev_hash: bytes,
                       framed: bool = True) -> tuple[bytes, bytes]:
        """lines: (usage_entry_id, side, amount, price_id, at_us, reverses_id, account_id, currency)."""
        h = prev_hash
        sha = hashlib.sha256
        pack = BILLING_FIXED.pack
        text = self._text
        nf = b"\x00\x0a"  # 10 fields: 9 content + hash
        hl = b"\x00\x00\x00\x20"
        off = PG_EPOCH_OFFSET_US
        out = [chain.COPY_HEADER] if framed else []
        put = out.extend
        i = first_id - 1
        for uid, side, amount, pid, at_us, rev, acc, cur in lines:
            i += 1
            content = (pack(8, i, 8, uid, 2, side, 8, amount, 8, pid, 8, at_us - off)
                       + (NULL_FIELD if rev is None else I64_FIELD.pack(8, rev)) + text(acc) + text(cur))
            h = sha(h + content).digest()
            put((nf, content, hl, h))
        if framed:
            out.append(chain.COPY_TRAILER)
        return b"".join(out), h

    def _write_billing(self, lines: list[tuple]) -> None:
        last_id, h = self.head(BILLING_ENTRIES)
        payload, _ = self.encode_billing(lines, last_id + 1, h)
        self._copy(BILLING_ENTRIES, payload)

    def reverse_usage(self, entry_ids: Sequence[int]) -> AppendResult:
        """Reverse usage entries (and their billing lines) by id: new entries, never edits.

        The reversal of entry E has key (E.allocation, E.seq, E.replica, REVERSAL),
        the negated quantity and energy, and billing lines that swap E's
        sides, each referencing the line it reverses. Replays are ``exists``.
        """
        res = AppendResult()
        if not entry_ids:
            return res
        originals = self.conn.execute(
            "SELECT id, allocation_id::text, seq, replica, kind, interval_start, interval_end, gpu_count, gpu_milli,"
            " gpu_milli_us, util_bp, energy_mj, tenant_id, node_id, gpu_model FROM ledger.usage_entries"
            " WHERE id = ANY(%s) ORDER BY id", (list(entry_ids),)).fetchall()
        found = {r[0] for r in originals}
        missing = [e for e in entry_ids if e not in found]
        if missing:
            raise InvalidEntry(f"cannot reverse unknown usage entries {missing[:5]}", field="entry_id")
        already = {r[0] for r in self.conn.execute(
            "SELECT reverses_id FROM ledger.usage_entries WHERE reverses_id = ANY(%s)", (list(entry_ids),))}
        todo = []
        for rec in originals:
            if rec[4] == REVERSAL:
                raise InvalidEntry(f"usage entry {rec[0]} is itself a reversal", field="entry_id")
            if rec[0] in already:
                res.exists += 1
            else:
                todo.append(rec)
        if not todo:
            return res
        lines_by_usage: dict[int, list] = {}
        for rec in self.conn.execute(
                "SELECT id, usage_entry_id, side, amount_micros, price_id, account_id, currency"
                " FROM ledger.billing_entries WHERE usage_entry_id = ANY(%s) ORDER BY id", ([r[0] for r in todo],)):
            lines_by_usage.setdefault(rec[1], []).append(rec)
        last_id, h = self.head(USAGE_ENTRIES)
        contents, new_lines = [], []
        i = last_id
        for (oid, alloc, seq, rep, _k, start, end, cnt, milli, mus, util, energy, tenant, node, model) in todo:
            i += 1
            end_us = to_us(end)
            contents.append(USAGE_ENTRIES.encode((i, chain.uuid_bytes(alloc), seq, rep, REVERSAL, to_us(start), end_us,
                                                  cnt, milli, -mus, util, -energy, oid, tenant, node, model)))
            for lid, _u, side, amount, pid, acc, cur in lines_by_usage.get(oid, []):
                new_lines.append((i, CREDIT if side == DEBIT else DEBIT, amount, pid, end_us, lid, acc, cur))
        payload, _ = chain.chain_rows(USAGE_ENTRIES, contents, h)
        self._copy(USAGE_ENTRIES, payload)
        if new_lines:
            self._write_billing(new_lines)
        res.written = len(todo)
        res.billing_written = len(new_lines)
        return res

    # ------------------------------------------------------------ meter events, prices

    def append_meter_events(self, events: Sequence[MeterEvent]) -> AppendResult:
        res = AppendResult()
        if not events:
            return res
        stored = {r[0]: r for r in self.conn.execute(
            "SELECT event_id, allocation_id::text, kind, at, tenant_id, replicas FROM ledger.meter_events"
            " WHERE event_id = ANY(%s)", ([e.event_id for e in events],))}
        todo, seen = [], set()
        for e in events:
            s = stored.get(e.event_id)
            if s is not None or e.event_id in seen:
                if s is not None:
                    for name, a, b in (("allocation_id", s[1], e.allocation_id), ("kind", s[2], e.kind),
                                       ("at", to_us(s[3]), e.at_us), ("tenant_id", s[4], e.tenant_id),
                                       ("replicas", s[5], replicas_json(e.replicas))):
                        if a != b:
                            raise IdempotencyConflict(f"meter event {e.event_id}", name, a, b)
                res.exists += 1
                continue
            seen.add(e.event_id)
            todo.append(e)
        if todo:
            last_id, h = self.head(METER_EVENTS)
            contents = [METER_EVENTS.encode((last_id + n, e.event_id, chain.uuid_bytes(e.allocation_id), e.kind, e.at_us,
                                             e.outbox_id, e.tenant_id, e.event, replicas_json(e.replicas)))
                        for n, e in enumerate(todo, start=1)]
            payload, _ = chain.chain_rows(METER_EVENTS, contents, h)
            self._copy(METER_EVENTS, payload)
            res.written = len(todo)
        return res

    def append_prices(self, prices: Sequence[tuple[str, str, int, int]]) -> AppendResult:
        """prices: (gpu_model, currency, micros_per_gpu_hour, effective_from_us)."""
        res = AppendResult()
        stored = {(m, to_us(e)): (c, p) for m, e, c, p in self.conn.execute(
            "SELECT gpu_model, effective_from, currency, micros_per_gpu_hour FROM ledger.price_book")}
        todo = []
        for model, cur, micros, eff in prices:
            if not model:
                raise InvalidEntry("price with an empty GPU model", field="gpu_model")
            if micros <= 0:
                raise InvalidEntry(f"price for {model} must be positive, got {micros}", field="micros_per_gpu_hour")
            s = stored.get((model, eff))
            if s is not None:
                if s[0] != cur:
                    raise IdempotencyConflict(f"price {model}@{from_us(eff).isoformat()}", "currency", s[0], cur)
                if s[1] != micros:
                    raise IdempotencyConflict(f"price {model}@{from_us(eff).isoformat()}", "micros_per_gpu_hour",
                                              s[1], micros)
                res.exists += 1
                continue
            stored[(model, eff)] = (cur, micros)
            todo.append((model, cur, micros, eff))
        if todo:
            last_id, h = self.head(PRICE_BOOK)
            contents = [PRICE_BOOK.encode((last_id + n, m, c, p, e)) for n, (m, c, p, e) in enumerate(todo, start=1)]
            payload, _ = chain.chain_rows(PRICE_BOOK, contents, h)
            self._copy(PRICE_BOOK, payload)
            res.written = len(todo)
            self._prices, self._price_head, self._tails = {}, -1, {}
        return res

    def dead_letter(self, outbox_id: int, topic: str, key: str, event_id: int | None, allocation_id: str | None,
                    reason: str, payload: bytes) -> None:
        self.conn.execute(
            "INSERT INTO ledger.dead_letters (outbox_id, topic, key, event_id, allocation_id, reason, payload)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (outbox_id) DO NOTHING",
            (outbox_id, topic, key, event_id, allocation_id, reason, payload))


_COMPARED = ("start_us", "end_us", "gpu_count", "gpu_milli", "tenant_id", "node_id", "gpu_model", "util_bp",
             "energy_mj")


def _compare_usage(new: UsageRow, stored: UsageRow) -> None:
    for name in _COMPARED:
        a, b = getattr(stored, name), getattr(new, name)
        if a != b:
            field = {"start_us": "interval_start", "end_us": "interval_end"}.get(name, name)
            raise IdempotencyConflict(f"usage entry {new.key}", field, a, b)


def write_usage_batch(url: str, rows: Sequence[UsageRow], *, bill: bool = True) -> AppendResult:
    """Open a connection, write one batch in one transaction, commit."""
    with psycopg.connect(url) as conn:
        store = LedgerStore(conn)
        with conn.transaction():
            store.lock()
            return store.append_usage(rows, bill=bill)
