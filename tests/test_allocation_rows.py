"""The allocation shard's indexed row cache: what the once-a-second pass visits is exactly what is due."""
from __future__ import annotations

import dataclasses
import datetime as dt

from actors.allocation_shard import _Rows
from actors.store import AllocRow
from gpuaas.lifecycle import AllocState

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def row(aid: str, state: AllocState, lease_s: float | None = None) -> AllocRow:
    return AllocRow(allocation_id=aid, tenant_id="t", request_id=aid, request_hash=b"", request=b"", state=state,
                    lease_expires_at=None if lease_s is None else T0 + dt.timedelta(seconds=lease_s))


def test_waiting_holds_exactly_the_rows_that_are_not_running():
    rows = _Rows()
    rows["a"] = row("a", AllocState.PLACED)
    rows["b"] = row("b", AllocState.RUNNING)
    assert rows.waiting == {"a"}
    rows["a"] = row("a", AllocState.RUNNING)
    rows["b"] = row("b", AllocState.RELEASING)
    assert rows.waiting == {"b"}
    rows.pop("b")
    del rows["a"]
    assert rows.waiting == set() and not rows


def test_due_leases_in_order_once_and_only_for_rows_still_on_that_lease():
    rows = _Rows()
    rows["late"] = row("late", AllocState.RUNNING, 30)
    rows["soon"] = row("soon", AllocState.RUNNING, 10)
    rows["renewed"] = row("renewed", AllocState.RUNNING, 5)
    rows["renewed"] = dataclasses.replace(rows["renewed"], lease_expires_at=T0 + dt.timedelta(seconds=60))
    rows["gone"] = row("gone", AllocState.RUNNING, 1)
    rows.pop("gone")
    rows["twice"] = row("twice", AllocState.RUNNING, 2)
    rows["twice"] = row("twice", AllocState.RUNNING, 2)  # the same row stored again (a reload)
    rows["released"] = row("released", AllocState.RUNNING, 3)
    rows["released"] = row("released", AllocState.RELEASING, 3)
    assert rows.due_leases(T0) == []
    due = rows.due_leases(T0 + dt.timedelta(seconds=20))
    assert [a for a, _ in due] == ["twice", "soon"]
    assert rows.due_leases(T0 + dt.timedelta(seconds=20)) == []  # taken off the heap
    rows.lease_again(*due[1])  # its release did not go through
    assert [a for a, _ in rows.due_leases(T0 + dt.timedelta(seconds=20))] == ["soon"]
    assert [a for a, _ in rows.due_leases(T0 + dt.timedelta(seconds=100))] == ["late", "renewed"]
