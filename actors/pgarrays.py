"""One-dimensional Postgres arrays in their binary wire form, built in bulk, for the group writes.

The group writes of ``actors.store`` send a group's columns as array parameters (``unnest(%b::uuid[],
…)``: one statement, one round trip). psycopg dumps a Python list one element at a time, through the
element type's dumper, with a fixed cost per array besides. Here each array is built at once from
its values (one ``struct.pack`` for all the integers of a column, one join for the strings) and
wrapped in a ``bytes`` subclass that psycopg sends as it is, with the array's type oid.

The binary form (Postgres ``array_recv``): the number of dimensions (1, or 0 for an empty array), a
flag that the array holds a NULL, the element type's oid, then the dimension's length and lower
bound (1), then each element as its length in bytes (-1 for NULL) and its binary form. Values:

- ``uuid``: a UUID as text (allocation ids are held as text), sent as its 16 bytes;
- ``text``: ``str``, UTF-8; ``bytea``: ``bytes``; ``jsonb``: a serialized JSON document (``str``),
  after the format's version byte 1;
- ``int8``, ``int4``: ``int``, big-endian;
- ``timestamptz``: an aware ``datetime``, as microseconds since 2000-01-01 UTC (a naive one is a
  ``TypeError``: the store never writes one).

``None`` is NULL in every type. A value of the wrong type raises here, before anything is sent.
"""
from __future__ import annotations

import datetime as dt
import struct
from typing import Callable, Sequence

import psycopg
from psycopg import pq
from psycopg.adapt import Dumper

from ledger.chain import uuid_bytes

_I4 = struct.Struct(">i").pack
_NULL = _I4(-1)
_PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
_US = dt.timedelta(microseconds=1)

# type name → (element oid, array oid), as in pg_type.
_OIDS = {"uuid": (2950, 2951), "text": (25, 1009), "bytea": (17, 1001), "jsonb": (3802, 3807),
         "int8": (20, 1016), "int4": (23, 1007), "timestamptz": (1184, 1185)}


def _text(v: str) -> bytes:
    return v.encode()


def _jsonb(v: str) -> bytes:
    return b"\x01" + v.encode()


def _bytea(v: bytes) -> bytes:
    return bytes(v)


def _micros(v: dt.datetime) -> int:
    return (v - _PG_EPOCH) // _US


def _varlen(encode: Callable[[object], bytes]) -> Callable[[Sequence], tuple[bytes, bool]]:
    """Elements of variable length: each as its length, then its bytes."""
    def body(values: Sequence) -> tuple[bytes, bool]:
        parts, has_null = [], False
        for v in values:
            if v is None:
                parts.append(_NULL)
                has_null = True
            else:
                b = encode(v)
                parts.append(_I4(len(b)))
                parts.append(b)
        return b"".join(parts), has_null
    return body


def _fixed(code: str, size: int, convert: Callable | None = None) -> Callable[[Sequence], tuple[bytes, bool]]:
    """Elements of a fixed size (``struct`` code ``code``): the whole column in one ``struct.pack``."""
    one = struct.Struct(f">i{code}").pack

    def body(values: Sequence) -> tuple[bytes, bool]:
        if None in values:
            return b"".join(_NULL if v is None else one(size, convert(v) if convert else v) for v in values), True
        flat = [size] * (2 * len(values))
        flat[1::2] = map(convert, values) if convert else values
        return struct.pack(">" + f"i{code}" * len(values), *flat), False
    return body


_BODY = {"uuid": _varlen(uuid_bytes), "text": _varlen(_text), "bytea": _varlen(_bytea), "jsonb": _varlen(_jsonb),
         "int8": _fixed("q", 8), "int4": _fixed("i", 4), "timestamptz": _fixed("q", 8, _micros)}


class BinaryArray(bytes):
    """An array already in binary wire form; its subclass per type carries the oid psycopg sends."""
    elem_oid = 0


def _make(type_name: str) -> type[BinaryArray]:
    elem_oid, array_oid = _OIDS[type_name]
    cls = type(f"BinaryArray_{type_name}", (BinaryArray,), {"elem_oid": elem_oid})

    class _Dumper(Dumper):
        format = pq.Format.BINARY
        oid = array_oid

        def dump(self, obj: bytes) -> bytes:
            return obj

    _Dumper.__name__ = f"BinaryArrayDumper_{type_name}"
    # Registered once, for every connection made after this import: the classes are this module's own,
    # so no other value is dumped differently.
    psycopg.adapters.register_dumper(cls, _Dumper)
    return cls


_CLASSES = {name: _make(name) for name in _OIDS}
_HEADER = struct.Struct(">iiiii").pack
_EMPTY = struct.Struct(">iii").pack


def array(type_name: str, values: Sequence) -> BinaryArray:
    """``values`` as a one-dimensional ``type_name[]`` parameter (see the module's docstring)."""
    cls = _CLASSES[type_name]
    if not values:
        return cls(_EMPTY(0, 0, cls.elem_oid))
    body, has_null = _BODY[type_name](values)
    return cls(_HEADER(1, int(has_null), cls.elem_oid, len(values), 1) + body)


def arrays(type_names: Sequence[str], columns: Sequence[Sequence]) -> list[BinaryArray]:
    """One array per column, each of its type (``type_names[i]`` for ``columns[i]``)."""
    if len(type_names) != len(columns):
        raise ValueError(f"{len(columns)} columns for {len(type_names)} types")
    return [array(t, c) for t, c in zip(type_names, columns)]
