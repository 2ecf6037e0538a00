"""Recompute the ledger's hash chains and the double-entry balance.

For each chained table (ledger.chain.CHAINED_TABLES) PostgreSQL rebuilds every
row's canonical content from its stored columns (``canonical_sql``) and
streams ``(id, content, hash)`` in id order over binary COPY; we recompute
``sha256(prev || content)`` from the table's genesis and compare. Ids must be
contiguous from 1 (the writer assigns them so), so a removed row is caught as
well as an edited one. Then debits must equal credits per currency.

``verify(url)`` returns a VerifyResult naming the first bad row;
``main(argv)`` prints one line and returns the exit status.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import struct
import time

import psycopg

from ledger.chain import CHAINED_TABLES, ChainedTable

_HDR_LEN = 19  # 11-byte signature + flags + header extension length
_TUPLE_HEAD = struct.Struct(">hiqi")  # nfields, len(id)=8, id, len(content)


@dataclasses.dataclass
class VerifyResult:
    ok: bool
    entries_checked: int
    first_bad: str | None
    message: str
    per_table: dict = dataclasses.field(default_factory=dict)
    balances: dict = dataclasses.field(default_factory=dict)  # currency -> (debits, credits)
    elapsed_s: float = 0.0


class _Bad(Exception):
    def __init__(self, where: str, why: str):
        super().__init__(f"{where}: {why}")
        self.where, self.why = where, why


def _verify_table(conn, table: ChainedTable) -> int:
    sql = (f"COPY (SELECT id, {table.canonical_sql()}, hash FROM {table.qualified} ORDER BY id)"
           " TO STDOUT (FORMAT binary)")
    sha = hashlib.sha256
    unpack_head = _TUPLE_HEAD.unpack_from
    h = table.genesis
    expect_id = 1
    buf = b""
    pos = 0
    header_done = False
    with conn.cursor() as cur, cur.copy(sql) as cp:
        for chunk in cp:
            buf = buf[pos:] + bytes(chunk) if pos < len(buf) else bytes(chunk)
            pos = 0
            if not header_done:
                if len(buf) < _HDR_LEN:
                    continue
                pos = _HDR_LEN
                header_done = True
            n = len(buf)
            while True:
                if pos + 2 > n:
                    break
                if buf[pos:pos + 2] == b"\xff\xff":
                    pos = n
                    break
                if pos + 18 > n:
                    break
                _nf, _l, row_id, clen = unpack_head(buf, pos)
                end = pos + 18 + clen + 4 + 32
                if end > n:
                    break
                content = buf[pos + 18:pos + 18 + clen]
                stored = buf[end - 32:end]
                if row_id != expect_id:
                    raise _Bad(f"{table.qualified} id {row_id}",
                               f"expected id {expect_id}: rows are missing or out of order")
                h = sha(h + content).digest()
                if h != stored:
                    raise _Bad(f"{table.qualified} id {row_id}",
                               "hash mismatch: the row's content (or the chain before it) was altered")
                expect_id += 1
                pos = end
    return expect_id - 1


def verify(url: str) -> VerifyResult:
    """Check every chain and the double-entry balance; never raises for bad data."""
    t0 = time.perf_counter()
    total = 0
    per_table: dict[str, int] = {}
    with psycopg.connect(url) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")  # one snapshot for all checks
        try:
            for table in CHAINED_TABLES:
                n = _verify_table(conn, table)
                per_table[table.name] = n
                total += n
        except _Bad as bad:
            return VerifyResult(False, total, bad.where, f"first bad row {bad.where}: {bad.why}", per_table,
                                elapsed_s=time.perf_counter() - t0)
        balances = {}
        for cur, debits, credits in conn.execute(
                "SELECT currency, coalesce(sum(amount_micros) FILTER (WHERE side = 1), 0),"
                " coalesce(sum(amount_micros) FILTER (WHERE side = 2), 0)"
                " FROM ledger.billing_entries GROUP BY currency ORDER BY currency"):
            balances[cur] = (int(debits), int(credits))
        for cur, (d, c) in balances.items():
            if d != c:
                r = conn.execute(
                    "SELECT usage_entry_id FROM ledger.billing_entries WHERE currency = %s GROUP BY usage_entry_id"
                    " HAVING sum(CASE side WHEN 1 THEN amount_micros ELSE -amount_micros END) <> 0"
                    " ORDER BY usage_entry_id LIMIT 1", (cur,)).fetchone()
                where = f"ledger.billing_entries usage_entry_id {r[0]}" if r else f"ledger.billing_entries {cur}"
                return VerifyResult(False, total, where,
                                    f"debits {d} != credits {c} in {cur}; first unbalanced: {where}",
                                    per_table, balances, time.perf_counter() - t0)
    bal = ", ".join(f"{c} {d / 1e6:.6f}" for c, (d, _) in balances.items()) or "no billing yet"
    return VerifyResult(True, total, None, f"chains intact; debits = credits ({bal})", per_table, balances,
                        time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpuaas admin ledger verify",
                                 description="Recompute the ledger hash chains and the double-entry balance.")
    ap.add_argument("--url", help="database URL (default: GPUAAS_DATABASE_URL or the embedded server)")
    ns = ap.parse_args(argv)
    url = ns.url
    if not url:
        from ledger import db
        url = db.resolve().owner
    res = verify(url)
    status = "OK" if res.ok else "FAILED"
    print(f"ledger verify: {status}: {res.entries_checked} entries checked in {res.elapsed_s:.2f}s; {res.message}")
    return 0 if res.ok else 1
