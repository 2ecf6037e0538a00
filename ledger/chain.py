"""Canonical encoding and the hash chain of the ledger's entry tables.

Every chained row stores ``hash = sha256(prev_hash || content)`` where
``content`` is the PostgreSQL *binary COPY* encoding of its content columns
(int32 length + the type's binary send form, -1 for NULL), in the declared
order below. Two sides produce those bytes:

* the writer (``ledger.store``) encodes rows in Python and ships the very same
  bytes to PostgreSQL in one ``COPY … (FORMAT binary)`` per table per batch, so
  hashing costs one sha256 per row over bytes it had to build anyway;
* the verifier (``ledger.verify``) asks PostgreSQL to rebuild the content from
  the stored columns with the ``*send()`` functions (``canonical_sql``), so a
  tampered column changes the bytes no matter how it was changed.

The genesis hash of a table is ``sha256("gpuaas.ledger." + table)``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import struct

PG_EPOCH_OFFSET_US = 946_684_800_000_000  # 2000-01-01 - 1970-01-01, in µs
HASH_LEN = 32
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
COPY_TRAILER = struct.pack(">h", -1)
NULL_FIELD = struct.pack(">i", -1)

_I32 = struct.Struct(">i")
_FIXED = {"int8": (struct.Struct(">iq"), 8), "int4": (struct.Struct(">ii"), 4),
          "int2": (struct.Struct(">ih"), 2), "tstz": (struct.Struct(">iq"), 8)}
_SEND_SQL = {"int8": "int8send({c})", "int4": "int4send({c})", "int2": "int2send({c})",
             "tstz": "timestamptz_send({c})", "uuid": "uuid_send({c})"}
_LEN_SQL = {"int8": 8, "int4": 4, "int2": 2, "tstz": 8, "uuid": 16}


@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    type: str  # int8 | int4 | int2 | tstz (µs since the Unix epoch in Python) | uuid (16 bytes) | text
    nullable: bool = False


@dataclasses.dataclass(frozen=True)
class ChainedTable:
    name: str                   # table name inside schema `ledger`
    columns: tuple[Column, ...]  # content columns, `id` first; `hash` follows them

    @property
    def qualified(self) -> str:
        return f"ledger.{self.name}"

    @property
    def genesis(self) -> bytes:
        return hashlib.sha256(b"gpuaas.ledger." + self.name.encode()).digest()

    def column_list(self) -> str:
        return ", ".join([c.name for c in self.columns] + ["hash"])

    def canonical_sql(self) -> str:
        """SQL expression rebuilding a row's canonical content (bytea)."""
        parts = []
        for c in self.columns:
            if c.type == "text":
                b = f"convert_to({c.name}, 'UTF8')"
                expr = f"int4send(octet_length({b})) || {b}"
            else:
                n = _LEN_SQL[c.type]
                expr = f"'\\x{n:08x}'::bytea || " + _SEND_SQL[c.type].format(c=c.name)
            if c.nullable:
                expr = f"COALESCE({expr}, '\\xffffffff'::bytea)"
            parts.append(f"({expr})")
        return " || ".join(parts)

    def encode(self, values: tuple) -> bytes:
        """Canonical content of one row (generic, for low-volume tables)."""
        out = []
        for c, v in zip(self.columns, values, strict=True):
            if v is None:
                if not c.nullable:
                    raise ValueError(f"{self.name}.{c.name} may not be NULL")
                out.append(NULL_FIELD)
            elif c.type == "text":
                b = v.encode()
                out.append(_I32.pack(len(b)) + b)
            elif c.type == "uuid":
                out.append(b"\x00\x00\x00\x10" + v)
            elif c.type == "tstz":
                out.append(_FIXED["tstz"][0].pack(8, v - PG_EPOCH_OFFSET_US))
            else:
                s, n = _FIXED[c.type]
                out.append(s.pack(n, v))
        return b"".join(out)


def chain_rows(table: ChainedTable, contents: list[bytes], prev_hash: bytes) -> tuple[bytes, bytes]:
    """Hash ``contents`` onto ``prev_hash``; returns (COPY payload, last hash)."""
    nfields = struct.pack(">h", len(table.columns) + 1)
    hlen = _I32.pack(HASH_LEN)
    sha = hashlib.sha256
    out = [COPY_HEADER]
    h = prev_hash
    for content in contents:
        h = sha(h + content).digest()
        out.append(nfields + content + hlen + h)
    out.append(COPY_TRAILER)
    return b"".join(out), h


def text_field(s: str) -> bytes:
    b = s.encode()
    return _I32.pack(len(b)) + b


def uuid_bytes(s: str) -> bytes:
    b = bytes.fromhex(s.replace("-", ""))
    if len(b) != 16:
        raise ValueError(f"not a UUID: {s!r}")
    return b


def uuid_str(b: bytes) -> str:
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


C = Column
PRICE_BOOK = ChainedTable("price_book", (
    C("id", "int8"), C("gpu_model", "text"), C("currency", "text"), C("micros_per_gpu_hour", "int8"),
    C("effective_from", "tstz")))
METER_EVENTS = ChainedTable("meter_events", (
    C("id", "int8"), C("event_id", "int8"), C("allocation_id", "uuid"), C("kind", "int2"), C("at", "tstz"),
    C("outbox_id", "int8"), C("tenant_id", "text"), C("event", "text"), C("replicas", "text")))
USAGE_ENTRIES = ChainedTable("usage_entries", (
    C("id", "int8"), C("allocation_id", "uuid"), C("seq", "int4"), C("replica", "int2"), C("kind", "int2"),
    C("interval_start", "tstz"), C("interval_end", "tstz"), C("gpu_count", "int4"), C("gpu_milli", "int4"),
    C("gpu_milli_us", "int8"), C("util_bp", "int4"), C("energy_mj", "int8"), C("reverses_id", "int8", True),
    C("tenant_id", "text"), C("node_id", "text"), C("gpu_model", "text")))
BILLING_ENTRIES = ChainedTable("billing_entries", (
    C("id", "int8"), C("usage_entry_id", "int8"), C("side", "int2"), C("amount_micros", "int8"),
    C("price_id", "int8"), C("at", "tstz"), C("reverses_id", "int8", True), C("account_id", "text"),
    C("currency", "text")))
CHAINED_TABLES = (PRICE_BOOK, METER_EVENTS, USAGE_ENTRIES, BILLING_ENTRIES)

# Fast encoders for the two hot tables: one struct call for the fixed-width
# prefix (field lengths interleaved with values), then the nullable and text
# fields. The formats are derived from the column lists above.
def _prefix_struct(table: ChainedTable, n: int) -> struct.Struct:
    code = {"int8": "iq", "int4": "ii", "int2": "ih", "tstz": "iq", "uuid": "i16s"}
    return struct.Struct(">" + "".join(code[c.type] for c in table.columns[:n]))


USAGE_FIXED = _prefix_struct(USAGE_ENTRIES, 12)      # id … energy_mj
BILLING_FIXED = _prefix_struct(BILLING_ENTRIES, 6)   # id … at
I64_FIELD = struct.Struct(">iq")
