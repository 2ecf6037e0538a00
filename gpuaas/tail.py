"""Tailing a table in id order when ids are taken before commit.

Ids from a sequence are assigned inside the writing transaction, so a lower id can
become visible after a higher one: a reader that moves its cursor past the higher id
would never see the lower one. ``GapGuard`` keeps a reader's cursor before the first
missing id until no transaction that could still fill it is running
(``pg_current_snapshot``) and ``settle_s`` has passed; a gap left by a rolled-back
transaction is then skipped. Used by the ledger's outbox consumer and the API's watch
streams (``control.allocation_events``).
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger("gpuaas.tail")


class GapGuard:
    def __init__(self, what: str, settle_s: float = 0.5, clock=time.monotonic):
        self.what, self.settle_s, self._clock = what, settle_s, clock
        self._gap: tuple[int, int | None, float] | None = None  # (first missing id, max in-flight xid, seen at)
        self.skipped = 0

    def cut(self, conn, cursor: int, rows: list) -> list:
        """``rows`` (id first, ascending, all > ``cursor``) up to the first gap that may still fill."""
        expect = cursor + 1
        for i, row in enumerate(rows):
            if row[0] != expect and not self.settled(conn, expect):
                return rows[:i]
            expect = row[0] + 1
        return rows

    def settled(self, conn, missing_id: int) -> bool:
        """True once ``missing_id`` can no longer commit (its transaction rolled back)."""
        snap = conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint,"
                            " (SELECT max(x::text::bigint) FROM pg_snapshot_xip(pg_current_snapshot()) x)"
                            ).fetchone()
        if self._gap is None or self._gap[0] != missing_id:
            self._gap = (missing_id, snap[1], self._clock())
            return False
        _, max_xip, seen = self._gap
        if self._clock() - seen < self.settle_s:
            return False
        if max_xip is not None and snap[0] <= max_xip:
            return False  # a transaction that may still fill the gap is running
        log.info("%s id %d never committed (rolled back); skipping it", self.what, missing_id)
        self.skipped += 1
        self._gap = None
        return True
