"""Arrays built in binary wire form (actors.pgarrays) arrive in Postgres as the values they were built
from: the same array psycopg's own adapters send, for every type the group writes use, with NULLs,
empty arrays and edge values."""
from __future__ import annotations

import datetime as dt
import struct
import uuid

import psycopg
import pytest

from actors import pgarrays

UTC = dt.timezone.utc
_IDS = [str(uuid.uuid4()) for _ in range(3)]

CASES = [
    ("uuid", _IDS),
    ("uuid", [_IDS[0], None, _IDS[1]]),
    ("uuid", []),
    ("text", ["a", "", "é\tü\n\\\"{},", "NULL", None]),
    ("text", [None]),
    ("bytea", [b"\x00\xff", b"", None, bytes(range(256))]),
    ("jsonb", ['{"a": [1, 2], "b": "ü"}', "[]", None]),
    ("int8", [0, -1, 2**63 - 1, -2**63]),
    ("int8", [1, None, 3]),
    ("int4", [0, -5, 2**31 - 1, -2**31]),
    ("int4", [None, None]),
    ("timestamptz", [dt.datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC),
                     dt.datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
                     dt.datetime(2026, 6, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))), None]),
    ("timestamptz", []),
]


@pytest.mark.parametrize("type_name,values", CASES)
def test_array_reads_back_as_psycopg_sends_it(fresh_db, type_name, values):
    with psycopg.connect(fresh_db.app, autocommit=True) as conn:
        got, same = conn.execute(f"SELECT %b::{type_name}[], %b::{type_name}[] IS NOT DISTINCT FROM %s::{type_name}[]",
                                 (pgarrays.array(type_name, values), pgarrays.array(type_name, values),
                                  values)).fetchone()
    assert same
    want = [uuid.UUID(v) if type_name == "uuid" and v else v for v in values]
    if type_name == "jsonb":
        import json
        want = [json.loads(v) if v is not None else None for v in values]
    assert got == want


def test_unnest_of_several_arrays_keeps_rows_together(fresh_db):
    now = dt.datetime(2026, 3, 1, tzinfo=UTC)
    cols = [_IDS, [1, 2, 3], ["x", None, "z"], [now, None, now + dt.timedelta(microseconds=1)]]
    with psycopg.connect(fresh_db.app, autocommit=True) as conn:
        rows = conn.execute("SELECT * FROM unnest(%b::uuid[], %b::bigint[], %b::text[], %b::timestamptz[])",
                            pgarrays.arrays(("uuid", "int8", "text", "timestamptz"), cols)).fetchall()
    assert rows == [(uuid.UUID(_IDS[0]), 1, "x", now), (uuid.UUID(_IDS[1]), 2, None, None),
                    (uuid.UUID(_IDS[2]), 3, "z", now + dt.timedelta(microseconds=1))]


@pytest.mark.parametrize("type_name,value,error", [
    ("uuid", "not-a-uuid", ValueError),
    ("uuid", "abcd", ValueError),
    ("int8", 2**63, struct.error),
    ("int4", 2**31, struct.error),
    ("timestamptz", dt.datetime(2026, 1, 1), TypeError),  # naive: the store never writes one
    ("text", 5, AttributeError),
])
def test_a_value_of_the_wrong_kind_fails_before_anything_is_sent(type_name, value, error):
    with pytest.raises(error):
        pgarrays.array(type_name, [value])


def test_column_and_type_counts_must_match():
    with pytest.raises(ValueError):
        pgarrays.arrays(("text",), [["a"], ["b"]])
