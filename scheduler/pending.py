"""The pending queue: priority first, then weighted fair share across tenants, then FIFO."""
from __future__ import annotations

import itertools

from scheduler.types import Request

PENDING_MAX = 1_000_000


class PendingQueue:
    def __init__(self):
        self._items: dict[str, tuple[int, Request]] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._items)

    def push(self, req: Request, *, seq: int | None = None) -> None:
        """Add (or replace) a request; ``seq`` keeps its place in line when it goes back after a try."""
        old = self._items.get(req.key)
        if old is None and len(self._items) >= PENDING_MAX:
            raise OverflowError(f"pending queue is full ({PENDING_MAX})")
        if seq is None:
            seq = old[0] if old is not None else next(self._seq)
        self._items[req.key] = (seq, req)

    def remove(self, key: str) -> bool:
        return self._items.pop(key, None) is not None

    def keys(self) -> list[str]:
        return [r.key for _, r in sorted(self._items.values(), key=lambda sr: sr[0])]

    def ordered(self, share, attempts_max: int):
        """Yield (and take out) requests in service order; ``share(tenant)`` is re-read after each one."""
        by_prio: dict[int, dict[str, list]] = {}
        for seq, r in self._items.values():
            by_prio.setdefault(r.priority, {}).setdefault(r.tenant, []).append((seq, r))
        n = 0
        for prio in sorted(by_prio, reverse=True):
            tenants = by_prio[prio]
            for lst in tenants.values():
                lst.sort(key=lambda sr: sr[0], reverse=True)  # pop() takes the oldest
            while tenants and n < attempts_max:
                t = min(tenants, key=lambda t: (share(t), tenants[t][-1][0]))
                seq, r = tenants[t].pop()
                if not tenants[t]:
                    del tenants[t]
                cur = self._items.pop(r.key, None)
                if cur is None:
                    continue
                n += 1
                yield seq, r
