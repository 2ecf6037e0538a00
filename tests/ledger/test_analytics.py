"""DuckDB analytics: incremental sync by watermark and named queries cross-checked against Postgres."""
import datetime as dt
import decimal

import duckdb
import psycopg
import pytest

from ledger import analytics, capacity
from ledger.analytics import cli, queries
from ledger.consumer import LedgerConsumer
from tests.ledger.conftest import S, T0, at

H = 3600.0


@pytest.fixture
def metered(ledger_db, outbox):
    """A small fleet history: two days, three tenants, fractional GPUs, a failure and a preemption."""
    runs = [("acme", 0, 5000, [("n1", [0, 1], 1000, "H100")], "release_requested", S.ALLOCATION_STATE_RELEASING),
            ("acme", 3 * H, 3 * H + 900, [("n2", [0], 500, "A100")], "preempted", S.ALLOCATION_STATE_RELEASING),
            ("globex", 600, 2 * H, [("n1", [2, 3, 4, 5], 1000, "H100")], "gpu_fault", S.ALLOCATION_STATE_FAILED),
            ("globex", 26 * H, 27 * H, [("n3", [0], 250, "H100"), ("n4", [0], 250, "H100")], "release_requested",
             S.ALLOCATION_STATE_RELEASING)]
    for tenant, start, stop, asg, ev, dst in runs:
        a = outbox.run(tenant, start, asg)
        outbox.stop(a, tenant, stop, ev, dst)
    with LedgerConsumer(ledger_db.app, meter_interval_s=600).open() as c:
        assert c.flush(5)["done"]
    for h in range(0, 30, 2):
        capacity.record_samples(ledger_db.app, [("H100", 16, 16, 4000 + 100 * h, 12000 - 100 * h, 500),
                                                ("A100", 8, 8, 1000, 7000, 250)], at=at(h * H))
    return ledger_db


def _pg(url, sql, *args):
    with psycopg.connect(url) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        return conn.execute(sql, args).fetchall()


def _num(v):
    return float(v) if isinstance(v, (decimal.Decimal, float)) else v


def test_sync_is_incremental_by_watermark(metered, outbox, tmp_path):
    """A second sync copies nothing; new rows are the only ones copied next time."""
    path = str(tmp_path / "a.duckdb")
    first = analytics.sync(metered.app, path)
    pg_counts = {t: _pg(metered.app, f"SELECT count(*) FROM {t}")[0][0] for t in
                 ("ledger.usage_entries", "ledger.billing_entries", "control.allocation_events")}
    assert first["usage_entries"] == pg_counts["ledger.usage_entries"] > 0
    assert first["billing_entries"] == pg_counts["ledger.billing_entries"]
    assert first["allocation_events"] == pg_counts["control.allocation_events"]
    assert first["capacity_samples"] == 30
    again = analytics.sync(metered.app, path)
    assert {k: v for k, v in again.items() if k != "elapsed_s"} == {k: 0 for k in first if k != "elapsed_s"}
    a = outbox.run("acme", 40 * H, [("n1", [0], 1000, "H100")])
    outbox.stop(a, "acme", 40 * H + 60)
    with LedgerConsumer(metered.app, meter_interval_s=600).open() as c:
        c.flush(5)
    third = analytics.sync(metered.app, path)
    assert (third["usage_entries"], third["billing_entries"], third["allocation_events"]) == (1, 2, 4)
    con = duckdb.connect(path)
    assert con.execute("SELECT count(*) FROM usage_entries").fetchone()[0] == pg_counts["ledger.usage_entries"] + 1


def test_named_queries_match_the_same_sums_in_postgres(metered, tmp_path):
    """Every money/GPU-hour figure the report shows equals the sum Postgres computes from the ledger."""
    path = str(tmp_path / "a.duckdb")
    analytics.sync(metered.app, path)
    con = duckdb.connect(path)
    _, rows = queries.run(con, "tenant_gpu_hours_cost_by_day")
    got = {(str(d), t): (round(float(h), 4), c) for d, t, h, c, _ in rows}
    want = _pg(metered.app, """
        WITH u AS (SELECT date_trunc('day', interval_start)::date AS d, tenant_id, sum(gpu_milli_us) AS mus
                   FROM ledger.usage_entries GROUP BY 1, 2),
             m AS (SELECT date_trunc('day', u.interval_start)::date AS d, u.tenant_id,
                          sum(CASE b.side WHEN 1 THEN b.amount_micros ELSE -b.amount_micros END) AS c
                   FROM ledger.billing_entries b JOIN ledger.usage_entries u ON u.id = b.usage_entry_id
                   WHERE b.account_id LIKE 'tenant:%%' GROUP BY 1, 2)
        SELECT u.d, u.tenant_id, round(u.mus / 3.6e12, 4), m.c FROM u JOIN m USING (d, tenant_id)""")
    assert got == {(str(d), t): (float(h), int(c)) for d, t, h, c in want}
    assert len(got) == 3
    # exact: acme day 1 = 2 GPUs × 5000 s + 0.5 GPU × 900 s
    assert got[(str(T0.date()), "acme")][0] == round((2 * 5000 + 0.5 * 900) / H, 4)

    _, rows = queries.run(con, "gpu_utilization_by_model_hour")
    by_model = {}
    for r in rows:
        by_model[r[1]] = by_model.get(r[1], 0) + float(r[2])
    want = dict(_pg(metered.app, "SELECT gpu_model, sum(gpu_milli_us) / 3.6e12 FROM ledger.usage_entries GROUP BY 1"))
    assert by_model.keys() == want.keys()
    for m in want:
        assert by_model[m] == pytest.approx(float(want[m]), abs=1e-3)

    _, rows = queries.run(con, "top_consumers")
    want = _pg(metered.app, "SELECT u.tenant_id, round(sum(u.gpu_milli_us) / 3.6e12, 4) FROM ledger.usage_entries u"
                            " GROUP BY 1 ORDER BY sum(u.gpu_milli_us) DESC")
    assert [(t, float(h)) for t, h, _, _ in rows] == [(t, float(h)) for t, h in want]

    _, rows = queries.run(con, "failure_and_preemption_rates")
    assert sum(r[3] for r in rows) == 1 and sum(r[4] for r in rows) == 1 and sum(r[1] for r in rows) == 4

    _, rows = queries.run(con, "queue_wait_percentiles")
    p50 = _pg(metered.app, """SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY w) FROM (
        SELECT extract(epoch FROM min(at) FILTER (WHERE to_state = 'PLACED') - min(at) FILTER (WHERE to_state = 'QUEUED'))
        AS w FROM control.allocation_events GROUP BY allocation_id) s""")[0][0]
    assert rows[0][0] == 4 and rows[0][1] == pytest.approx(float(p50))

    _, rows = queries.run(con, "stranded_capacity")
    want = _pg(metered.app, "SELECT sum(stranded_milli) / 1000.0 / count(*) FROM ledger.capacity_samples"
                            " WHERE gpu_model = 'H100'")[0][0]
    h100 = [r for r in rows if r[1] == "H100"]
    assert sum(float(r[4]) for r in h100) / len(h100) == pytest.approx(float(want))

    _, rows = queries.run(con, "days_until_exhausted")
    assert {r[0] for r in rows} == {"H100", "A100"}


def test_days_until_exhausted_extrapolates_linear_growth(ledger_db, tmp_path):
    """Usage growing by one GPU a day against 16 GPUs of capacity runs out in (16 - now) days."""
    from ledger import store
    rows = [store.UsageRow(f"00000000-0000-0000-0000-{d:012d}", 0, 0, 0, int((T0 + dt.timedelta(days=d)).timestamp()
            * 1e6), int((T0 + dt.timedelta(days=d + 1)).timestamp() * 1e6), d + 1, 1000, "acme", "n", "H100")
            for d in range(10)]
    store.write_usage_batch(ledger_db.app, rows)
    capacity.record_samples(ledger_db.app, [("H100", 16, 16, 0, 16000, 0)], at=T0)
    path = str(tmp_path / "a.duckdb")
    analytics.sync(ledger_db.app, path)
    _, out = queries.run(duckdb.connect(path), "days_until_exhausted")
    model, days, now, cap, growth, left = out[0]
    assert (model, days, float(now), float(cap)) == ("H100", 10, 10.0, 16.0)
    assert float(growth) == pytest.approx(1.0) and float(left) == pytest.approx(6.0)


def test_cli_report_writes_html_and_sql_answers(metered, tmp_path, capsys):
    """`analytics report` prints every named query and writes report.html; `sql` runs ad-hoc SQL."""
    path = str(tmp_path / "a.duckdb")
    assert cli.main(["--url", metered.app, "--duckdb", path, "report", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    for title, _ in queries.QUERIES.values():
        assert title in out
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "<svg" in html
    assert cli.main(["--url", metered.app, "--duckdb", path, "sql", "SELECT count(*) AS n FROM usage_entries"]) == 0
    assert "n" in capsys.readouterr().out
    assert cli.main(["--url", metered.app, "--duckdb", path, "sql", "SELECT * FROM nope", "--no-sync"]) == 1
    table = analytics.demo_table(metered.app, path)
    assert "acme" in table and "globex" in table
