"""Capacity snapshots for analytics: the control plane calls record_samples periodically.

A sample per GPU model: total and healthy GPUs, milli-GPUs allocated and free,
and the stranded part of the free capacity (free milli on GPUs that are
partly used, which a whole-GPU request cannot take), plus the queue depth.
"""
from __future__ import annotations

import datetime as dt
from typing import Iterable, NamedTuple

import psycopg

from ledger.errors import InvalidEntry

samples_per_call_max = 10_000


class CapacitySample(NamedTuple):
    gpu_model: str
    total_gpus: int
    healthy_gpus: int
    allocated_milli: int
    free_milli: int
    stranded_milli: int
    queue_depth: int = 0


def record_samples(url_or_conn, samples: Iterable[CapacitySample | tuple | dict], at: dt.datetime | None = None) -> int:
    """Append one snapshot (one row per model) at ``at`` (default now); returns rows written."""
    rows = []
    for s in samples:
        s = CapacitySample(**s) if isinstance(s, dict) else CapacitySample(*s)
        if min(s.total_gpus, s.healthy_gpus, s.allocated_milli, s.free_milli, s.stranded_milli, s.queue_depth) < 0:
            raise InvalidEntry(f"capacity sample for {s.gpu_model}: counts must be >= 0", field="capacity")
        if s.stranded_milli > s.free_milli:
            raise InvalidEntry(f"capacity sample for {s.gpu_model}: stranded exceeds free", field="stranded_milli")
        rows.append(s)
    if len(rows) > samples_per_call_max:
        raise InvalidEntry(f"{len(rows)} samples exceed samples_per_call_max={samples_per_call_max}", field="samples")
    if not rows:
        return 0
    at = at or dt.datetime.now(dt.timezone.utc)
    sql = ("INSERT INTO ledger.capacity_samples (at, gpu_model, total_gpus, healthy_gpus, allocated_milli,"
           " free_milli, stranded_milli, queue_depth) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)")
    params = [(at, *r) for r in rows]
    if isinstance(url_or_conn, str):
        with psycopg.connect(url_or_conn) as conn, conn.cursor() as cur:
            cur.executemany(sql, params)
    else:
        with url_or_conn.cursor() as cur:
            cur.executemany(sql, params)
    return len(rows)
