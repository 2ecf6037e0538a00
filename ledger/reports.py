"""Read-backs from the ledger (billing sums), never from control tables."""
from __future__ import annotations

import psycopg


def usage_by_tenant(url: str) -> list[dict]:
    """Per tenant and currency: GPU-seconds (net of reversals) and cost in micro-units.

    gpu_seconds is a float made from the exact integer sum of gpu-milli-µs;
    cost_micros is the tenant account's debits minus credits.
    """
    with psycopg.connect(url) as conn:
        usage = dict(conn.execute(
            "SELECT tenant_id, sum(gpu_milli_us) FROM ledger.usage_entries GROUP BY tenant_id").fetchall())
        money = conn.execute(
            "SELECT a.tenant_id, b.currency,"
            " sum(CASE b.side WHEN 1 THEN b.amount_micros ELSE -b.amount_micros END)"
            " FROM ledger.billing_entries b JOIN ledger.accounts a USING (account_id)"
            " WHERE a.kind = 'tenant' GROUP BY 1, 2 ORDER BY 1, 2").fetchall()
    out, seen = [], set()
    for tenant, cur, cost in money:
        seen.add(tenant)
        out.append(dict(tenant_id=tenant, gpu_seconds=int(usage.get(tenant) or 0) / 1e9, cost_micros=int(cost),
                        currency=cur))
    for tenant, mus in sorted(usage.items()):
        if tenant not in seen:
            out.append(dict(tenant_id=tenant, gpu_seconds=int(mus or 0) / 1e9, cost_micros=0, currency=""))
    return sorted(out, key=lambda r: (r["tenant_id"], r["currency"]))


def usage_by_allocation(url: str, allocation_id: str) -> dict:
    """Net usage and cost of one allocation (gpu_milli_us exact, cost in micro-units per currency)."""
    with psycopg.connect(url) as conn:
        mus, n = conn.execute("SELECT coalesce(sum(gpu_milli_us), 0), count(*) FROM ledger.usage_entries"
                              " WHERE allocation_id = %s::uuid", (allocation_id,)).fetchone()
        cost = dict(conn.execute(
            "SELECT b.currency, sum(CASE b.side WHEN 1 THEN b.amount_micros ELSE -b.amount_micros END)"
            " FROM ledger.billing_entries b JOIN ledger.usage_entries u ON u.id = b.usage_entry_id"
            " WHERE u.allocation_id = %s::uuid AND b.account_id LIKE 'tenant:%%' GROUP BY 1",
            (allocation_id,)).fetchall())
    return dict(allocation_id=allocation_id, gpu_milli_us=int(mus), entries=n,
                cost_micros={k: int(v) for k, v in cost.items()})


def dead_letters(url: str, limit: int = 100) -> list[dict]:
    with psycopg.connect(url) as conn:
        return [dict(outbox_id=o, event_id=e, allocation_id=a, reason=r, created_at=c) for o, e, a, r, c in
                conn.execute("SELECT outbox_id, event_id, allocation_id, reason, created_at FROM ledger.dead_letters"
                             " ORDER BY id DESC LIMIT %s", (limit,))]
