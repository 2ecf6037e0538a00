"""Persistence of the `control` schema (owned by actors/).

The one place that changes allocation, node and GPU state in Postgres. Each
transition is looked up in the lifecycle table, then written as a
version-checked UPDATE, an event row and an outbox row in the caller's
transaction, so the three can never disagree. Handlers never run
``UPDATE … SET state`` themselves.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import threading
import uuid
from typing import Iterable, Sequence

from google.protobuf import timestamp_pb2
from psycopg import postgres, pq
from psycopg.adapt import Dumper

from actors import pgarrays
from gpuaas.errors import FailedPrecondition
from gpuaas.lifecycle import (ALLOCATION_TABLE, GPU_TABLE, NODE_TABLE, AllocEvent, AllocState, Billing, GpuEvent,
                              GpuState, IllegalTransition, NodeEvent, NodeState)
from gpuaas.v1 import common_pb2, events_pb2
from ledger.chain import uuid_bytes

TOPIC_ALLOC = "allocation.transitioned"
TOPIC_NODE = "node.transitioned"

ALLOC_COLUMNS = ("allocation_id", "tenant_id", "request_id", "request_hash", "request", "state", "reason", "version",
                 "priority", "gpu_model", "gpu_milli_total", "assignments", "prepare_attempts", "release_attempts",
                 "created_at", "updated_at", "running_since", "stopped_at", "lease_expires_at", "queue_deadline",
                 "next_attempt_at")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


_UUID_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def new_allocation_ids(n: int) -> list[str]:
    """``n`` random (version 4, RFC 4122) UUIDs as text, the same as ``str(uuid.uuid4())`` but from one
    read of the OS's random source and without a UUID object each: 0.8 against 3.9 µs an id here,
    which showed in the placement actor's profile under ``PlaceBatch``."""
    h = os.urandom(16 * n).hex()
    return [f"{h[k:k + 8]}-{h[k + 8:k + 12]}-4{h[k + 13:k + 16]}-{_UUID_VARIANT[h[k + 16]]}{h[k + 17:k + 20]}-"
            f"{h[k + 20:k + 32]}" for k in range(0, 32 * n, 32)]


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def set_ts(msg: timestamp_pb2.Timestamp, value: dt.datetime) -> None:
    """``msg.FromDatetime(value)``, by arithmetic instead of its time-tuple round trip (naive = UTC)."""
    d = (value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)) - _EPOCH
    msg.seconds = d.days * 86400 + d.seconds
    msg.nanos = d.microseconds * 1000


def ts(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    t = timestamp_pb2.Timestamp()
    set_ts(t, value)
    return t


@dataclasses.dataclass
class AllocRow:
    allocation_id: str
    tenant_id: str
    request_id: str
    request_hash: bytes
    request: bytes
    state: AllocState
    reason: str = ""
    version: int = 1
    priority: int = 0
    gpu_model: str = ""
    gpu_milli_total: int = 0
    assignments: list = dataclasses.field(default_factory=list)
    prepare_attempts: int = 0
    release_attempts: int = 0
    created_at: dt.datetime = dataclasses.field(default_factory=utcnow)
    updated_at: dt.datetime = dataclasses.field(default_factory=utcnow)
    running_since: dt.datetime | None = None
    stopped_at: dt.datetime | None = None
    lease_expires_at: dt.datetime | None = None
    queue_deadline: dt.datetime | None = None
    next_attempt_at: dt.datetime | None = None

    @classmethod
    def from_db(cls, rec: Sequence) -> "AllocRow":
        d = dict(zip(ALLOC_COLUMNS, rec))
        d["allocation_id"] = str(d["allocation_id"])
        d["state"] = AllocState[d["state"]]
        d["request_hash"] = bytes(d["request_hash"])
        d["request"] = bytes(d["request"])
        if isinstance(d["assignments"], str):
            d["assignments"] = json.loads(d["assignments"])
        return cls(**d)

    def db_values(self) -> tuple:
        return (self.allocation_id, self.tenant_id, self.request_id, self.request_hash, self.request, self.state.name,
                self.reason, self.version, self.priority, self.gpu_model, self.gpu_milli_total,
                json.dumps(self.assignments), self.prepare_attempts, self.release_attempts, self.created_at,
                self.updated_at, self.running_since, self.stopped_at, self.lease_expires_at, self.queue_deadline,
                self.next_attempt_at)

    def node_ids(self) -> set[str]:
        return {a["node_id"] for a in self.assignments}

    def replace(self, **changes) -> "AllocRow":
        """A copy with ``changes``: what ``dataclasses.replace`` gives (the same field values, shared, and
        TypeError for a name that is no field), without calling ``__init__`` with every field: 1.0
        against 5.1 µs here, and every transition of a group makes one per edge."""
        if not _ALLOC_FIELDS.issuperset(changes):
            raise TypeError(f"AllocRow has no field(s) {sorted(set(changes) - _ALLOC_FIELDS)}")
        new = object.__new__(AllocRow)
        d = new.__dict__
        d.update(self.__dict__)
        d.update(changes)
        return new


_ALLOC_FIELDS = frozenset(f.name for f in dataclasses.fields(AllocRow))


def assignment_pb(a: dict, node_address: str = "") -> common_pb2.GpuAssignment:
    return common_pb2.GpuAssignment(node_id=a["node_id"], gpu_indices=a["gpu_indices"], gpu_milli=a["gpu_milli"],
                                    gpu_model=a.get("gpu_model", ""), node_address=node_address,
                                    cpu_milli=a.get("cpu_milli", 0), memory_mib=a.get("memory_mib", 0))


def add_assignments(into, assignments: list[dict], address_of=None) -> None:
    """Append ``assignments`` to the repeated GpuAssignment field ``into``, each built in place (a third
    cheaper than building a message and copying it in, and this runs several times per allocation)."""
    for a in assignments:
        into.add(node_id=a["node_id"], gpu_indices=a["gpu_indices"], gpu_milli=a["gpu_milli"],
                 gpu_model=a.get("gpu_model", ""), node_address=address_of(a["node_id"]) if address_of else "",
                 cpu_milli=a.get("cpu_milli", 0), memory_mib=a.get("memory_mib", 0))


def _transition_payload(row: AllocRow, src: AllocState | None, event: AllocEvent, event_id: int,
                        at: dt.datetime, stamp: timestamp_pb2.Timestamp | None = None) -> bytes:
    """The outbox message of one edge, built whole: the reference that the group writers' cheaper
    builders (insert_new_allocations, transition_allocations: one message per chain, fields set per
    edge) are tested against. ``stamp``: ``at`` already converted."""
    return events_pb2.AllocationTransitioned(
        event_id=event_id, allocation_id=row.allocation_id, tenant_id=row.tenant_id,
        from_state=src.value if src else 0, to_state=row.state.value, event=event.value, reason=row.reason,
        at=stamp if stamp is not None else ts(at), assignments=[assignment_pb(a) for a in row.assignments],
        version=row.version,
    ).SerializeToString()


class _Stamps(dict):
    """datetime → Timestamp, converted once per distinct time."""

    def __missing__(self, at: dt.datetime) -> timestamp_pb2.Timestamp:
        stamp = self[at] = ts(at)
        return stamp


def _next_event_ids(conn, n: int) -> list[int]:
    if n == 0:
        return []
    # One row holding an array (decoding n one-column rows costs more than the n nextval calls),
    # ascending: an allocation's events take their ids in chain order.
    return conn.execute("SELECT array_agg(x ORDER BY x) FROM (SELECT nextval('control.allocation_events_event_id_seq')"
                        " AS x FROM generate_series(1, %s)) s", (n,)).fetchone()[0]


# Options for a connection that runs only this module's group writes (INSERT/UPDATE … FROM unnest(…)
# of array parameters): the server plans such a statement once and reuses the plan. By default it
# re-plans a prepared statement with array parameters at every execution (its estimate of a custom
# plan, which knows the arrays' lengths, beats the generic one), and for one to a few rows planning
# is about 40 % of the statement's server CPU. Measured against the embedded Postgres, server CPU per
# autocommit insert of new allocations: 1 row 453 → 253 µs, 3 rows 573 → 333 µs. Only for such
# connections: a query whose best plan depends on its values (a rare state among many rows) would
# suffer from a plan made without them.
GROUP_WRITER_OPTIONS = "-c plan_cache_mode=force_generic_plan"

# Up to this many new allocations go in one INSERT … FROM unnest(…) statement (one round trip for the
# three tables, arrays sent in binary); larger batches use COPY. Measured against the embedded Postgres
# (median of 9 commits, client CPU / wall per batch, statement vs COPY): 1 row 332/847 vs 400/937 µs,
# 16 rows 598/1,484 vs 734/1,686 µs, 256 rows 4.3/11.2 vs 5.3/11.6 ms, 1,000 rows 17.5/44.3 vs
# 22.1/40.1 ms. The statement costs less client CPU at every size and less wall time up to a few hundred.
SMALL_INSERT_MAX = 256

# The statement takes its event ids from the sequence itself (ascending, in chain order) and appends
# each outbox payload's event_id field (migration 0008), so it needs no round trip before it: on an
# autocommit connection a commit of new allocations is one round trip.
_INSERT_SMALL = (
    "WITH ids AS (SELECT array_agg(x ORDER BY x) AS id FROM (SELECT nextval('control.allocation_events_event_id_seq')"
    " AS x FROM generate_series(1, %s::int)) s),"
    " a AS (INSERT INTO control.allocations (" + ", ".join(ALLOC_COLUMNS) + ")"
    " SELECT * FROM unnest(%b::uuid[], %b::text[], %b::text[], %b::bytea[], %b::bytea[], %b::text[], %b::text[],"
    " %b::bigint[], %b::int[], %b::text[], %b::bigint[], %b::jsonb[], %b::int[], %b::int[], %b::timestamptz[],"
    " %b::timestamptz[], %b::timestamptz[], %b::timestamptz[], %b::timestamptz[], %b::timestamptz[],"
    " %b::timestamptz[])),"
    " ev AS (SELECT ids.id[x.n] AS event_id, x.* FROM ids, unnest(%b::uuid[], %b::text[], %b::text[], %b::text[],"
    " %b::text[], %b::text[], %b::bigint[], %b::timestamptz[], %b::bytea[]) WITH ORDINALITY AS x(allocation_id,"
    " tenant_id, from_state, to_state, event, reason, version, at, payload, n)),"
    " e AS (INSERT INTO control.allocation_events (event_id, allocation_id, tenant_id, from_state, to_state, event,"
    " reason, version, at) SELECT event_id, allocation_id, tenant_id, from_state, to_state, event, reason, version,"
    " at FROM ev),"
    " o AS (INSERT INTO control.outbox (topic, key, payload) SELECT %s, allocation_id::text,"
    " payload || control.pb_event_id_field(event_id) FROM ev ORDER BY n)"
    " SELECT array_agg(event_id ORDER BY n) FROM ev")


# One new allocation with a chain of two events, in scalar parameters: the same rows as _INSERT_SMALL
# writes for it (ids ascending in chain order, outbox rows in that order, each payload's event_id
# appended), without its thirty array parameters, whose conversion psycopg does in Python and which
# were most of the client CPU of such a commit.
_INSERT_ONE_TWO_EVENTS = (
    "WITH ids AS (SELECT least(x, y) AS e1, greatest(x, y) AS e2 FROM (SELECT"
    " nextval('control.allocation_events_event_id_seq') AS x,"
    " nextval('control.allocation_events_event_id_seq') AS y) s),"
    " a AS (INSERT INTO control.allocations (" + ", ".join(ALLOC_COLUMNS) + ") VALUES (%s::uuid, %s::text,"
    " %s::text, %s::bytea, %s::bytea, %s::text, %s::text, %s::bigint, %s::int, %s::text, %s::bigint, %s::jsonb,"
    " %s::int, %s::int, %s::timestamptz, %s::timestamptz, %s::timestamptz, %s::timestamptz, %s::timestamptz,"
    " %s::timestamptz, %s::timestamptz)),"
    " ev AS (SELECT ids.e1 AS event_id, 1 AS n, %s::text AS from_state, %s::text AS to_state, %s::text AS event,"
    " %s::bigint AS version, %s::bytea AS payload FROM ids"
    " UNION ALL SELECT ids.e2, 2, %s::text, %s::text, %s::text, %s::bigint, %s::bytea FROM ids),"
    " fx AS (SELECT %s::uuid AS allocation_id, %s::text AS tenant_id, %s::text AS reason, %s::timestamptz AS at,"
    " %s::text AS topic),"
    " e AS (INSERT INTO control.allocation_events (event_id, allocation_id, tenant_id, from_state, to_state, event,"
    " reason, version, at) SELECT ev.event_id, fx.allocation_id, fx.tenant_id, ev.from_state, ev.to_state, ev.event,"
    " fx.reason, ev.version, fx.at FROM ev, fx),"
    " o AS (INSERT INTO control.outbox (topic, key, payload) SELECT fx.topic, fx.allocation_id::text,"
    " ev.payload || control.pb_event_id_field(ev.event_id) FROM ev, fx ORDER BY ev.n)"
    " SELECT ARRAY[e1, e2] FROM ids")

# COPY of new allocations, in binary: psycopg writes each value's wire form (no text rendering of
# timestamps, no hex escaping of bytea) and Postgres parses none of it. Measured against the embedded
# Postgres, 10,000 allocations a transaction with their two events and outbox rows, per allocation:
# client CPU 15.4 → 6.6 µs, server CPU 46 → 35 µs (text COPY → binary).
_COPY_ALLOCATIONS = f"COPY control.allocations ({', '.join(ALLOC_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
_ALLOC_TYPES = ("uuid", "text", "text", "bytea", "bytea", "text", "text", "int8", "int4", "text", "int8", "jsonb",
                "int4", "int4") + ("timestamptz",) * 7
assert len(_ALLOC_TYPES) == len(ALLOC_COLUMNS)
_COPY_EVENTS = ("COPY control.allocation_events (event_id, allocation_id, tenant_id, from_state, to_state, event,"
                " reason, version, at) FROM STDIN (FORMAT BINARY)")
_EVENT_TYPES = ("int8", "uuid", "text", "text", "text", "text", "text", "int8", "timestamptz")
# The array parameters of the statements, in order (actors.pgarrays builds them): the events'
# columns of _INSERT_SMALL and _TRANSITION_MANY, and the rows' columns of _TRANSITION_MANY.
_EVENT_ARRAY_TYPES = ("uuid", "text", "text", "text", "text", "text", "int8", "timestamptz", "bytea")
_TRANSITION_TYPES = ("uuid", "int8", "text", "text", "int8", "timestamptz", "timestamptz", "timestamptz", "text",
                     "int4", "int4", "timestamptz", "timestamptz", "timestamptz")
_COPY_OUTBOX = "COPY control.outbox (topic, key, payload) FROM STDIN (FORMAT BINARY)"
_OUTBOX_TYPES = ("text", "text", "bytea")


class _UuidTextBinaryDumper(Dumper):
    """An allocation id held as text (``str(uuid4())``), as a binary uuid: 16 bytes."""
    format = pq.Format.BINARY
    oid = postgres.types["uuid"].oid

    def dump(self, obj: str) -> bytes:
        return uuid_bytes(obj)


class _JsonbTextBinaryDumper(Dumper):
    """A JSON document already serialized (``AllocRow.db_values``), as binary jsonb: version 1, then the text."""
    format = pq.Format.BINARY
    oid = postgres.types["jsonb"].oid

    def dump(self, obj: str) -> bytes:
        return b"\x01" + obj.encode()


def _binary_copy_cursor(conn):
    """A cursor whose binary COPY takes ids and JSON as the text the rows hold. Registered by type oid
    only (psycopg's way for COPY with ``set_types``), and on this cursor only: queries elsewhere on the
    connection keep the default adapters."""
    cur = conn.cursor()
    cur.adapters.register_dumper(None, _UuidTextBinaryDumper)
    cur.adapters.register_dumper(None, _JsonbTextBinaryDumper)
    return cur


def _execute_kept(conn, query: str, params):
    """``conn.execute(query, params)`` on a cursor kept per connection and thread, for the group writes
    that run at every commit. psycopg keeps a cursor's adapters (the dumper found for each parameter)
    while it runs the same query object again; ``conn.execute`` makes a new cursor each time, which
    looks them all up again: for the thirty-odd array parameters of a small group commit that was
    about a fifth of its client CPU (1 row 351-363 → 288-311 µs, 8 rows 724-763 → 540-554 µs here).
    Per thread, since a cursor is not to be shared between threads, and per statement, since a cursor
    drops its adapters when it runs another one (two statements taking turns on one cursor kept
    none). The cursors hang on the connection itself (a cycle the collector frees with it), not in a
    table of connections that their own references would keep alive."""
    try:
        kept = conn._gpuaas_kept_cursors
    except AttributeError:
        try:
            kept = conn._gpuaas_kept_cursors = {}
        except AttributeError:  # a connection class that takes no attributes: a new cursor each time
            return conn.execute(query, params)
    key = (threading.get_ident(), query)
    cur = kept.get(key)
    if cur is None or cur.closed:
        cur = kept[key] = conn.cursor()
    return cur.execute(query, params)


def insert_new_allocations(conn, items: Iterable[tuple[AllocRow, list[tuple[AllocEvent, AllocState | None]]]]):
    """Insert brand-new allocations in their first committed state.

    ``items``: (row in its final state, [(event, from_state), …] in order) —
    e.g. [(ACCEPTED, None), (PLACED, QUEUED)] for a request placed at once.
    One statement for up to SMALL_INSERT_MAX rows, else COPY: one round trip per table (group commit).
    Inside the caller's transaction when one is open. On an autocommit connection the write is its
    own transaction: the statement alone (one round trip), or BEGIN, the COPYs and COMMIT.
    Returns the event ids written, per item.
    """
    items = list(items)
    if not items:
        return []
    small = len(items) <= SMALL_INSERT_MAX
    n_events = sum(len(evs) for _, evs in items)
    # The statement takes its ids itself. COPY needs them first, from inside its transaction: the
    # watch hub and the ledger's tail wait at a missing id only while a transaction that took it runs.
    with conn.transaction() if conn.autocommit and not small else contextlib.nullcontext():
        ids = None if small else _next_event_ids(conn, n_events)
        alloc_buf, event_rows, outbox_rows, chains = [], [], [], []
        stamps = _Stamps()  # a batch's rows share one timestamp
        for row, evs in items:
            alloc_buf.append(row.db_values())
            final_state, final_version = row.state, row.version
            version = final_version - len(evs)
            state = None
            at = row.updated_at
            stamp = stamps[at]
            # One message per row; each event of its chain changes only its own fields and is serialized
            # in turn (the same message as _transition_payload on a snapshot of the row at that event).
            msg = events_pb2.AllocationTransitioned(allocation_id=row.allocation_id, tenant_id=row.tenant_id,
                                                    reason=row.reason, at=stamp)
            add_assignments(msg.assignments, row.assignments)
            chains.append(len(evs))
            for event, src in evs:
                t = ALLOCATION_TABLE.transition(src, event)
                version += 1
                msg.version, msg.event = version, event.value
                msg.from_state, msg.to_state = (src.value if src else 0), t.dst.value
                if small:  # event_id left out: the statement appends it
                    event_rows.append((row.allocation_id, row.tenant_id, src.name if src else None, t.dst.name,
                                       event.value, row.reason, version, at, msg.SerializeToString()))
                else:
                    eid = ids[len(event_rows)]
                    event_rows.append((eid, row.allocation_id, row.tenant_id, src.name if src else None, t.dst.name,
                                       event.value, row.reason, version, at))
                    msg.event_id = eid
                    outbox_rows.append((TOPIC_ALLOC, row.allocation_id, msg.SerializeToString()))
                state = t.dst
            assert state == final_state and version == final_version, "event chain must end in the row's state"
        if small and len(items) == 1 and n_events == 2:
            # The commonest commit under unary traffic: one request placed at once (accepted, placed).
            (aid, tenant, f1, t1, ev1, reason, v1, at, p1), (_, _, f2, t2, ev2, _, v2, _, p2) = event_rows
            ids = _execute_kept(conn, _INSERT_ONE_TWO_EVENTS, (*alloc_buf[0], f1, t1, ev1, v1, p1, f2, t2, ev2, v2, p2,
                                                                aid, tenant, reason, at, TOPIC_ALLOC)).fetchone()[0]
        elif small:
            cols = [n_events, *pgarrays.arrays(_ALLOC_TYPES, list(zip(*alloc_buf))),
                    *pgarrays.arrays(_EVENT_ARRAY_TYPES, list(zip(*event_rows))), TOPIC_ALLOC]
            ids = _execute_kept(conn, _INSERT_SMALL, cols).fetchone()[0]
        else:
            cur = _binary_copy_cursor(conn)
            for sql, types, rows in ((_COPY_ALLOCATIONS, _ALLOC_TYPES, alloc_buf),
                                     (_COPY_EVENTS, _EVENT_TYPES, event_rows),
                                     (_COPY_OUTBOX, _OUTBOX_TYPES, outbox_rows)):
                with cur.copy(sql) as cp:
                    cp.set_types(types)
                    for values in rows:
                        cp.write_row(values)
    per_item, k = [], 0
    for n in chains:
        per_item.append(list(ids[k:k + n]))
        k += n
    return per_item


def transition_allocation(conn, row: AllocRow, event: AllocEvent, *, at: dt.datetime | None = None,
                          reason: str | None = None, **changes) -> AllocRow:
    """Apply one table edge to ``row`` (version-checked) and write event + outbox.

    Raises IllegalTransition when the table has no such edge, and
    FailedPrecondition when someone else moved the row first.
    """
    [result] = transition_allocations(conn, [(row, event, dict(changes, at=at, reason=reason))])
    if isinstance(result, Exception):
        raise result
    return result


def _apply_edge(row: AllocRow, event: AllocEvent, at: dt.datetime, reason: str | None, changes: dict) -> AllocRow:
    t = ALLOCATION_TABLE.transition(row.state, event)
    new = row.replace(state=t.dst, version=row.version + 1, updated_at=at,
                      reason=reason if reason is not None else event.value, **changes)
    if t.billing is Billing.START:
        new.running_since = at
    elif t.billing is Billing.STOP:
        new.stopped_at = at
    return new


_TRANSITION_MANY = (
    "WITH v AS (SELECT * FROM unnest(%b::uuid[], %b::bigint[], %b::text[], %b::text[], %b::bigint[],"
    " %b::timestamptz[], %b::timestamptz[], %b::timestamptz[], %b::text[], %b::int[], %b::int[], %b::timestamptz[],"
    " %b::timestamptz[], %b::timestamptz[]) AS v(allocation_id, old_version, state, reason, version, updated_at,"
    " running_since, stopped_at, assignments, prepare_attempts, release_attempts, lease_expires_at, queue_deadline,"
    " next_attempt_at)),"
    " u AS (UPDATE control.allocations a SET state=v.state, reason=v.reason, version=v.version,"
    " updated_at=v.updated_at, running_since=v.running_since, stopped_at=v.stopped_at,"
    " assignments=COALESCE(v.assignments::jsonb, a.assignments), prepare_attempts=v.prepare_attempts,"
    " release_attempts=v.release_attempts,"
    " lease_expires_at=v.lease_expires_at, queue_deadline=v.queue_deadline, next_attempt_at=v.next_attempt_at"
    " FROM v WHERE a.allocation_id = v.allocation_id AND a.version = v.old_version RETURNING a.allocation_id),"
    # Event ids for exactly the rows updated, ascending in item order (as insert_new_allocations).
    " x AS (SELECT x.*, row_number() OVER (ORDER BY x.n) AS k FROM unnest(%b::uuid[], %b::text[], %b::text[],"
    " %b::text[], %b::text[], %b::text[], %b::bigint[], %b::timestamptz[], %b::bytea[]) WITH ORDINALITY AS"
    " x(allocation_id, tenant_id, from_state, to_state, event, reason, version, at, payload, n)"
    " WHERE x.allocation_id IN (SELECT allocation_id FROM u)),"
    " ids AS (SELECT array_agg(i ORDER BY i) AS id FROM (SELECT nextval('control.allocation_events_event_id_seq') AS i"
    " FROM x) s),"
    " ev AS (SELECT ids.id[x.k] AS event_id, x.* FROM x, ids),"
    " e AS (INSERT INTO control.allocation_events (event_id, allocation_id, tenant_id, from_state, to_state, event,"
    " reason, version, at) SELECT event_id, allocation_id, tenant_id, from_state, to_state, event, reason, version,"
    " at FROM ev),"
    " o AS (INSERT INTO control.outbox (topic, key, payload) SELECT %s, allocation_id::text,"
    " payload || control.pb_event_id_field(event_id) FROM ev ORDER BY n)"
    " SELECT allocation_id FROM u")


def transition_allocations(conn, items: Sequence[tuple[AllocRow, AllocEvent, dict]]) -> list:
    """Apply many table edges in the caller's transaction (group commit of transitions).

    ``items``: (row, event, {"at", "reason", **column changes}). ``event`` may
    be a tuple of events, a chain of edges taken in turn at the same instant
    (``reason`` and the column changes go with the first): one version-checked
    UPDATE to the last edge's row, one event and outbox row per edge, in order.
    Each item is checked on its own, exactly as ``transition_allocation`` would: the result
    list holds, per item, the new row, or the exception for that item alone
    (IllegalTransition when the table has no such edge, FailedPrecondition
    when its version moved). One statement writes them all: a version-checked
    UPDATE, and the events and outbox rows of exactly the rows it updated, so
    state, event and outbox still commit or fail together; it takes the event
    ids itself, for the rows updated only. On an autocommit connection the
    statement is its own transaction: one round trip. Assignments change only through the column
    changes (``{"assignments": [...]}``): the row's own list is taken as unchanged and not written.
    """
    results: list = [None] * len(items)
    # (item index, row, row after the last edge, [(row before, row after, event) per edge], at)
    todo: list[tuple[int, AllocRow, AllocRow, list, dt.datetime]] = []
    for i, (row, event, kw) in enumerate(items):
        kw = dict(kw)
        at = kw.pop("at", None) or utcnow()
        reason = kw.pop("reason", None)
        steps, cur = [], row
        try:
            for k, ev in enumerate(event if isinstance(event, tuple) else (event,)):
                nxt = _apply_edge(cur, ev, at, reason if k == 0 else None, kw if k == 0 else {})
                steps.append((cur, nxt, ev))
                cur = nxt
        except IllegalTransition as exc:
            results[i] = exc
            continue
        todo.append((i, row, cur, steps, at))
    if not todo:
        return results
    stamps = _Stamps()
    # Assignments that no edge changed (the same list: AllocRow.replace shares it) go as NULL, and the
    # statement keeps the stored ones (never NULL in the table): no JSON to write here or to parse there.
    cols = [(n.allocation_id, r.version, n.state.name, n.reason, n.version, n.updated_at, n.running_since,
             n.stopped_at, None if n.assignments is r.assignments else json.dumps(n.assignments), n.prepare_attempts,
             n.release_attempts, n.lease_expires_at, n.queue_deadline, n.next_attempt_at) for _, r, n, _, _ in todo]
    # The payload without its event_id: the statement takes the ids and appends the field (migration 0008).
    # A chain's later edges keep the first edge's assignments (changes go with the first), so its message
    # is built once and only the fields an edge changes are set again before each serialization.
    events = []
    for _, _, _, steps, at in todo:
        msg = asg = None
        for r, n, ev in steps:
            if msg is None or n.assignments is not asg:
                msg = events_pb2.AllocationTransitioned(allocation_id=n.allocation_id, tenant_id=n.tenant_id,
                                                        at=stamps[at])
                add_assignments(msg.assignments, n.assignments)
                asg = n.assignments
            msg.from_state, msg.to_state, msg.event = r.state.value, n.state.value, ev.value
            msg.reason, msg.version = n.reason, n.version
            events.append((r.allocation_id, r.tenant_id, r.state.name, n.state.name, ev.value, n.reason, n.version,
                           at, msg.SerializeToString()))
    done = {str(r[0]) for r in _execute_kept(
        conn, _TRANSITION_MANY, [*pgarrays.arrays(_TRANSITION_TYPES, list(zip(*cols))),
                                 *pgarrays.arrays(_EVENT_ARRAY_TYPES, list(zip(*events))), TOPIC_ALLOC])}
    for i, row, new, _, _ in todo:
        if row.allocation_id in done:
            results[i] = new
        else:
            results[i] = FailedPrecondition(f"allocation {row.allocation_id} changed concurrently (expected "
                                            f"version {row.version})")
    return results


def is_uuid(value) -> bool:
    try:
        uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        return False
    return True


def load_allocation(conn, allocation_id: str, *, for_update: bool = False) -> AllocRow | None:
    if not is_uuid(allocation_id):
        return None
    rec = conn.execute(f"SELECT {', '.join(ALLOC_COLUMNS)} FROM control.allocations WHERE allocation_id = %s"
                       + (" FOR UPDATE" if for_update else ""), (allocation_id,)).fetchone()
    return AllocRow.from_db(rec) if rec else None


def load_allocations(conn, where: str = "", params: tuple = ()) -> list[AllocRow]:
    sql = f"SELECT {', '.join(ALLOC_COLUMNS)} FROM control.allocations"
    if where:
        sql += " WHERE " + where
    return [AllocRow.from_db(r) for r in conn.execute(sql, params)]


# ---------------------------------------------------------------- nodes


def _node_event(conn, node_id: str, gpu_index: int | None, src, dst, event, reason: str, automatic: bool,
                at: dt.datetime) -> None:
    eid = conn.execute(
        "INSERT INTO control.node_events (node_id, gpu_index, from_state, to_state, event, reason, automatic, at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING event_id",
        (node_id, gpu_index, src.name if src else None, dst.name, event.value, reason, automatic, at)).fetchone()[0]
    payload = events_pb2.NodeTransitioned(
        event_id=eid, node_id=node_id, from_state=src.value if (src and gpu_index is None) else 0,
        to_state=dst.value if gpu_index is None else 0, event=event.value, reason=reason, at=ts(at),
        gpu_index=gpu_index if gpu_index is not None else -1, automatic=automatic)
    conn.execute("INSERT INTO control.outbox (topic, key, payload) VALUES (%s, %s, %s)",
                 (TOPIC_NODE, node_id, payload.SerializeToString()))


def node_state(conn, node_id: str) -> NodeState | None:
    r = conn.execute("SELECT state FROM control.nodes WHERE node_id = %s FOR UPDATE", (node_id,)).fetchone()
    return NodeState[r[0]] if r else None


def register_node(conn, node_id: str, address: str, inventory, inventory_bytes: bytes,
                  at: dt.datetime | None = None) -> tuple[NodeState | None, NodeState]:
    """Insert or refresh a node from its inventory; applies REGISTERED. Returns (from, to)."""
    at = at or utcnow()
    src = node_state(conn, node_id)
    t = NODE_TABLE.transition(src, NodeEvent.REGISTERED)
    labels = json.dumps(dict(inventory.labels))
    if src is None:
        conn.execute(
            "INSERT INTO control.nodes (node_id, address, state, backend, simulated, cpu_milli, memory_mib, labels,"
            " inventory, registered_at, last_seen_at, updated_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
            (node_id, address, t.dst.name, inventory.backend, inventory.simulated, inventory.cpu_milli,
             inventory.memory_mib, labels, inventory_bytes, at, at, at))
    else:
        conn.execute(
            "UPDATE control.nodes SET address=%s, state=%s, version=version+1, backend=%s, simulated=%s,"
            " cpu_milli=%s, memory_mib=%s, labels=%s, inventory=%s, last_seen_at=%s, updated_at=%s"
            " WHERE node_id=%s",
            (address, t.dst.name, inventory.backend, inventory.simulated, inventory.cpu_milli, inventory.memory_mib,
             labels, inventory_bytes, at, at, node_id))
    existing = {r[0] for r in conn.execute("SELECT gpu_index FROM control.gpus WHERE node_id=%s", (node_id,))}
    for g in inventory.gpus:
        if g.index in existing:
            conn.execute("UPDATE control.gpus SET uuid=%s, model=%s, memory_mib=%s, nvlink_island=%s, updated_at=%s"
                         " WHERE node_id=%s AND gpu_index=%s",
                         (g.uuid, g.model, g.memory_mib, g.nvlink_island, at, node_id, g.index))
        else:
            gt = GPU_TABLE.transition(None, GpuEvent.DISCOVERED)
            conn.execute("INSERT INTO control.gpus (node_id, gpu_index, uuid, model, memory_mib, nvlink_island,"
                         " state, updated_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s)",
                         (node_id, g.index, g.uuid, g.model, g.memory_mib, g.nvlink_island, gt.dst.name, at))
            _node_event(conn, node_id, g.index, None, gt.dst, GpuEvent.DISCOVERED, "", True, at)
    # A live READY node re-registering (the control plane restarted) is not news; a daemon
    # coming back to a node held out of service by an operator is (its orphans get cleaned up).
    if src != t.dst or src in (NodeState.CORDONED, NodeState.DRAINING, NodeState.DRAINED):
        _node_event(conn, node_id, None, src, t.dst, NodeEvent.REGISTERED, "", True, at)
    return src, t.dst


def transition_node(conn, node_id: str, event: NodeEvent, *, reason: str = "", at: dt.datetime | None = None
                    ) -> tuple[NodeState, NodeState]:
    at = at or utcnow()
    src = node_state(conn, node_id)
    if src is None:
        from gpuaas.errors import NotFound
        raise NotFound(f"node {node_id} not found")
    t = NODE_TABLE.transition(src, event)
    conn.execute("UPDATE control.nodes SET state=%s, version=version+1, updated_at=%s WHERE node_id=%s",
                 (t.dst.name, at, node_id))
    _node_event(conn, node_id, None, src, t.dst, event, reason, t.automatic, at)
    return src, t.dst


def transition_gpu(conn, node_id: str, gpu_index: int, event: GpuEvent, *, reason: str = "",
                   at: dt.datetime | None = None) -> tuple[GpuState, GpuState]:
    at = at or utcnow()
    r = conn.execute("SELECT state FROM control.gpus WHERE node_id=%s AND gpu_index=%s FOR UPDATE",
                     (node_id, gpu_index)).fetchone()
    if r is None:
        from gpuaas.errors import NotFound
        raise NotFound(f"GPU {node_id}/{gpu_index} not found")
    src = GpuState[r[0]]
    t = GPU_TABLE.transition(src, event)
    conn.execute("UPDATE control.gpus SET state=%s, reason=%s, version=version+1, updated_at=%s"
                 " WHERE node_id=%s AND gpu_index=%s", (t.dst.name, reason, at, node_id, gpu_index))
    _node_event(conn, node_id, gpu_index, src, t.dst, event, reason, t.automatic, at)
    return src, t.dst
