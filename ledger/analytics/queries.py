"""Named capacity-planner queries over the DuckDB copy (rollups, not raw usage).

Each entry: name → (title, SQL). All GPU quantities are GPU-hours or GPUs
(milli-GPU-µs / 3.6e12 = GPU-hours); money is integer micro-units turned
into units only for display.
"""
from __future__ import annotations

MILLI_US_PER_GPU_HOUR = 3_600_000_000_000

QUERIES: dict[str, tuple[str, str]] = {
    "gpu_utilization_by_model_hour": ("GPU utilization by model per hour", f"""
        WITH u AS (
          SELECT hour, gpu_model, sum(gpu_milli_us) AS mus, sum(util_x_milli_us) AS umus, sum(energy_mj) AS mj
          FROM usage_hourly GROUP BY ALL),
        c AS (
          SELECT hour, gpu_model, sum(total_gpus_sum) / sum(samples) AS gpus FROM capacity_hourly GROUP BY ALL)
        SELECT u.hour, u.gpu_model,
               round(u.mus / {MILLI_US_PER_GPU_HOUR}, 4) AS gpu_hours,
               round(100.0 * u.mus / {MILLI_US_PER_GPU_HOUR} / nullif(c.gpus, 0), 2) AS allocated_pct,
               round(u.umus / nullif(u.mus, 0) / 100.0, 2) AS avg_util_pct,
               round(u.mj / 3.6e9, 6) AS energy_kwh
        FROM u LEFT JOIN c USING (hour, gpu_model)
        ORDER BY u.hour, u.gpu_model"""),
    "tenant_gpu_hours_cost_by_day": ("GPU-hours and cost by tenant per day", f"""
        WITH u AS (SELECT date_trunc('day', hour) AS day, tenant_id, sum(gpu_milli_us) AS mus
                   FROM usage_hourly GROUP BY ALL),
             m AS (SELECT date_trunc('day', hour) AS day, tenant_id, currency, sum(cost_micros) AS micros
                   FROM cost_hourly GROUP BY ALL)
        SELECT u.day::DATE AS day, u.tenant_id, round(u.mus / {MILLI_US_PER_GPU_HOUR}, 4) AS gpu_hours,
               coalesce(m.micros, 0)::BIGINT AS cost_micros, coalesce(m.currency, '') AS currency
        FROM u LEFT JOIN m USING (day, tenant_id)
        ORDER BY day, u.tenant_id"""),
    "top_consumers": ("Top consumers", f"""
        WITH u AS (SELECT tenant_id, sum(gpu_milli_us) AS mus FROM usage_hourly GROUP BY ALL),
             m AS (SELECT tenant_id, sum(cost_micros) AS micros FROM cost_hourly GROUP BY ALL)
        SELECT u.tenant_id, round(u.mus / {MILLI_US_PER_GPU_HOUR}, 4) AS gpu_hours,
               coalesce(m.micros, 0)::BIGINT AS cost_micros,
               round(100.0 * u.mus / sum(u.mus) OVER (), 2) AS share_pct
        FROM u LEFT JOIN m USING (tenant_id)
        ORDER BY u.mus DESC, u.tenant_id LIMIT 10"""),
    "failure_and_preemption_rates": ("Allocation failure and preemption rates", """
        WITH per AS (
          SELECT allocation_id, min(ts)::DATE AS day,
                 bool_or(to_state = 'RUNNING') AS ran,
                 bool_or(to_state = 'FAILED') AS failed,
                 bool_or(event = 'preempted') AS preempted
          FROM allocation_events GROUP BY allocation_id)
        SELECT day, count(*) AS allocations, count(*) FILTER (WHERE ran) AS ran,
               count(*) FILTER (WHERE failed) AS failed, count(*) FILTER (WHERE preempted) AS preempted,
               round(100.0 * count(*) FILTER (WHERE failed) / count(*), 2) AS failure_pct,
               round(100.0 * count(*) FILTER (WHERE preempted) / nullif(count(*) FILTER (WHERE ran), 0), 2)
                 AS preemption_pct
        FROM per GROUP BY day ORDER BY day"""),
    "stranded_capacity": ("Stranded (fragmented) GPU capacity over time", """
        SELECT hour, gpu_model,
               round(sum(total_gpus_sum) / sum(samples), 2) AS gpus,
               round(sum(free_milli_sum) / sum(samples) / 1000.0, 3) AS free_gpus,
               round(sum(stranded_milli_sum) / sum(samples) / 1000.0, 3) AS stranded_gpus,
               round(100.0 * sum(stranded_milli_sum) / nullif(sum(total_gpus_sum) * 1000, 0), 2) AS stranded_pct
        FROM capacity_hourly GROUP BY ALL ORDER BY hour, gpu_model"""),
    "queue_wait_percentiles": ("Queue-wait percentiles (seconds, accepted → placed)", """
        WITH w AS (
          SELECT allocation_id,
                 min(ts) FILTER (WHERE to_state = 'QUEUED') AS queued,
                 min(ts) FILTER (WHERE to_state = 'PLACED') AS placed
          FROM allocation_events GROUP BY allocation_id),
        s AS (SELECT epoch(placed - queued) AS wait_s FROM w WHERE placed IS NOT NULL AND queued IS NOT NULL)
        SELECT count(*) AS placed, round(quantile_cont(wait_s, 0.5), 3) AS p50_s,
               round(quantile_cont(wait_s, 0.9), 3) AS p90_s, round(quantile_cont(wait_s, 0.99), 3) AS p99_s,
               round(max(wait_s), 3) AS max_s
        FROM s"""),
    "days_until_exhausted": ("Days until a GPU model's capacity is exhausted at the current growth", f"""
        WITH daily AS (
          SELECT gpu_model, date_trunc('day', hour)::DATE AS day,
                 sum(gpu_milli_us) / {MILLI_US_PER_GPU_HOUR} / 24.0 AS gpus_in_use
          FROM usage_hourly GROUP BY ALL),
        recent AS (SELECT * FROM daily WHERE day > (SELECT max(day) FROM daily) - 28),
        trend AS (
          SELECT gpu_model, count(*) AS days, regr_slope(gpus_in_use, epoch(day) / 86400.0) AS growth_per_day,
                 arg_max(gpus_in_use, day) AS in_use_now
          FROM recent GROUP BY gpu_model),
        cap AS (SELECT gpu_model, arg_max(total_gpus_sum / samples, hour) AS capacity FROM capacity_hourly GROUP BY ALL)
        SELECT t.gpu_model, t.days, round(t.in_use_now, 3) AS gpus_in_use, round(c.capacity, 1) AS capacity,
               round(t.growth_per_day, 4) AS growth_gpus_per_day,
               CASE WHEN c.capacity IS NULL THEN NULL
                    WHEN t.in_use_now >= c.capacity THEN 0
                    WHEN t.growth_per_day > 0 THEN round((c.capacity - t.in_use_now) / t.growth_per_day, 1)
               END AS days_until_exhausted
        FROM trend t LEFT JOIN cap c USING (gpu_model) ORDER BY t.gpu_model"""),
}


def run(con, name: str) -> tuple[list[str], list[tuple]]:
    title, sql = QUERIES[name]
    cur = con.execute(sql)
    return [d[0] for d in cur.description], cur.fetchall()
