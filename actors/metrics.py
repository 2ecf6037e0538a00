"""Prometheus metrics of the control plane, served over HTTP by the placement actor.

What an operator scrapes (`ControlPlaneConfig.metrics_listen`, default an ephemeral port on
loopback; `gpuaas up` prints the address):

* ``gpuaas_rpc_total{method, code}`` and ``gpuaas_rpc_seconds{method}``: every gRPC call the
  control plane answered, by method and status code, and the unary calls' handler time.
  These are the only metrics touched per request (a counter and a histogram update, a few
  microseconds). ``gpuaas_placement_commit_seconds``, the placement actor's group commits'
  wall time, is updated once per commit.
* Everything else is read when scraped, from the state the components keep anyway:
  placement outcomes and commits, the committer's time by stage, the placement actor's
  CPU by thread, readiness (whether the database answers), whether the database still makes commits durable (re-read at most once a
  minute), the intake and the queue, the placement
  actor's garbage collections, capacity per GPU model (the same figures as
  ``ledger.capacity_samples``), allocations by state and the shards' prepare/release
  counters, and the ledger consumer's progress. A component that does not answer within
  ``SCRAPE_TIMEOUT_S`` is left out of that scrape and counted in
  ``gpuaas_scrape_errors_total``.
"""
from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("gpuaas.metrics")

SCRAPE_TIMEOUT_S = 2.0

# No auto-describe: registering the collector must not scrape (it calls other actors).
REGISTRY = CollectorRegistry(auto_describe=False)
RPCS = Counter("gpuaas_rpc", "gRPC calls answered by the control plane, by method and status code",
               ["method", "code"], registry=REGISTRY)
RPC_SECONDS = Histogram("gpuaas_rpc_seconds", "Handler time of unary gRPC calls (from the handler's start to its "
                        "answer)", ["method"], registry=REGISTRY,
                        buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0))
# Updated once per group commit (not per request): how long the database took to make a group of new
# allocations durable, which every placement answered in that group waited for.
COMMIT_SECONDS = Histogram("gpuaas_placement_commit_seconds", "Wall time of the placement actor's group commits "
                           "of new allocations (the statement, or BEGIN, the COPYs and COMMIT)", registry=REGISTRY,
                           buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0))
SCRAPE_ERRORS = Counter("gpuaas_scrape_errors", "Components that did not answer a metrics scrape in time",
                        ["component"], registry=REGISTRY)


def observe_rpc(method: str, context, seconds: float | None) -> None:
    """Record one answered call; ``seconds`` None for streams (their length is the client's choice)."""
    code = context.code()  # None until a handler sets one: the call succeeded
    RPCS.labels(method, code.name if code is not None else "OK").inc()
    if seconds is not None:
        RPC_SECONDS.labels(method).observe(seconds)


class ControlPlaneCollector:
    """Reads the placement core, the allocation shards and the ledger when Prometheus scrapes."""

    # The database's durability settings are read at most this often (a new session each time).
    DURABILITY_CHECK_S = 60.0

    def __init__(self, core, ledger_fn=None, readiness=None):
        self.core = core
        self.ledger_fn = ledger_fn  # () -> the ledger actor handle, or None
        self.readiness = readiness  # runtime.Readiness, or None
        self._durability: tuple[float, list[str] | None] = (float("-inf"), None)  # (checked at, problems)

    def _durability_problems(self) -> list[str] | None:
        """The runtime role's durability problems (ledger.db.durability_problems), read again at most
        every DURABILITY_CHECK_S; None when the database could not be asked. `gpuaas up` refuses a
        database with problems, so this catches a setting changed while the control plane runs."""
        import time

        from ledger import db as dbmod

        checked, problems = self._durability
        if time.monotonic() - checked >= self.DURABILITY_CHECK_S:
            try:
                problems = dbmod.durability_problems(self.core.app_url, timeout_s=int(SCRAPE_TIMEOUT_S))
            except Exception as exc:  # noqa: BLE001 - unknown, not "durable"
                log.warning("could not read the database's durability settings: %s", exc)
                problems = None
            if problems and problems != self._durability[1]:
                for p in problems:
                    log.error("the database may now lose acknowledged commits: %s", p)
            self._durability = (time.monotonic(), problems)
        return problems

    def collect(self):
        import ray

        core = self.core
        stats = dict(core.stats)
        placements = CounterMetricFamily("gpuaas_placements", "Placement requests decided and committed, by outcome",
                                         labels=["outcome"])
        for outcome in ("placed", "queued", "rejected"):
            placements.add_metric([outcome], stats.get(outcome, 0))
        yield placements
        yield CounterMetricFamily("gpuaas_placement_commits", "Group commits of the placement actor",
                                  value=stats.get("batches", 0))
        yield CounterMetricFamily("gpuaas_placement_commit_failures", "Placement group commits that failed",
                                  value=stats.get("commit_failures", 0))
        yield CounterMetricFamily("gpuaas_placement_commits_in_doubt",
                                  "Placement group commits whose answer was lost with the connection and whose "
                                  "outcome Postgres could not tell at once (capacity held until it could)",
                                  value=stats.get("commits_in_doubt", 0))
        yield GaugeMetricFamily("gpuaas_placement_commits_held_in_doubt",
                                "Placement group commits held now, their outcome not known yet",
                                value=core.commits_held_in_doubt)
        yield CounterMetricFamily("gpuaas_releases_before_handoff",
                                  "Releases that overtook their allocation's hand-off to a shard, settled by the "
                                  "placement actor in one commit (no shard, no cleanup on a node)",
                                  value=stats.get("released_before_handoff", 0))
        if self.readiness is not None:
            yield GaugeMetricFamily("gpuaas_ready", "1 while the database answers (the gRPC health status is "
                                    "SERVING), 0 while it does not (NOT_SERVING)", value=int(self.readiness.ready))
            yield CounterMetricFamily("gpuaas_readiness_changes", "Times the control plane turned ready or "
                                      "not ready", value=self.readiness.changes)
        problems = self._durability_problems()
        if problems is not None:
            yield GaugeMetricFamily("gpuaas_database_durable",
                                    "1 when the database makes each commit durable before acknowledging it "
                                    "(fsync, synchronous_commit and full_page_writes on for the runtime role), 0 "
                                    "when a setting changed since start lets it lose acknowledged commits; "
                                    f"read at most every {self.DURABILITY_CHECK_S:.0f} s",
                                    value=0 if problems else 1)
        yield GaugeMetricFamily("gpuaas_queue_depth", "Requests waiting in the placement queue",
                                value=len(core.queued))
        intake = core.intake
        yield GaugeMetricFamily("gpuaas_intake_requests_waiting", "Requests admitted and not yet decided "
                                "(the placement actor's intake, one queue per tenant)", value=intake.waiting)
        yield GaugeMetricFamily("gpuaas_intake_tenants_waiting", "Tenants with requests in the intake (they take "
                                "turns)", value=intake.tenants_waiting())
        refused = CounterMetricFamily("gpuaas_intake_refused", "Calls refused at the intake (UNAVAILABLE, back "
                                      "off), by the bound they hit: all requests waiting, or the tenant's share",
                                      labels=["bound"])
        for bound, n in intake.refused.items():
            refused.add_metric([bound], n)
        yield refused
        yield GaugeMetricFamily("gpuaas_nodes", "Nodes in the placement actor's capacity view", value=len(core.nodes))
        yield GaugeMetricFamily("gpuaas_handoffs_waiting",
                                "Committed placements not yet handed to their allocation shard (dispatch_linger_s)",
                                value=core.handoffs_waiting())

        # Where the committer's time goes, summed since start: divided by the placements' rate, the
        # cost of a placement per stage (deciding, the group commit, answering and handing off).
        stage = CounterMetricFamily("gpuaas_placement_stage_seconds",
                                    "Placement committer time by stage, wall clock and the thread's CPU",
                                    labels=["stage", "clock"])
        for name in ("decide", "commit", "answer"):
            stage.add_metric([name, "wall"], stats.get(f"{name}_s", 0.0))
            if f"{name}_cpu_s" in stats:
                stage.add_metric([name, "cpu"], stats[f"{name}_cpu_s"])
        yield stage
        # The whole process by thread (read from /proc when scraped): the committer and writer above,
        # and what else shares the process's interpreter lock and cores with them: gRPC's handler pool
        # and poller, the dispatcher, and gRPC's and Ray's native threads ("native:" + kernel name).
        from actors.runtime import thread_cpu_s

        threads = CounterMetricFamily("gpuaas_placement_thread_cpu_seconds",
                                      "CPU time of the placement actor's process by thread name (a pool's "
                                      "threads summed)", labels=["thread"])
        for name, cpu_s in sorted(thread_cpu_s().items()):
            threads.add_metric([name], cpu_s)
        yield threads
        gc_stats = core.gc.stats
        gc_runs = CounterMetricFamily("gpuaas_placement_gc_collections",
                                      "Garbage collections in the placement actor's process, by generation "
                                      "(generation 2 only when its pacer gives the frozen objects back)",
                                      labels=["generation"])
        gc_time = CounterMetricFamily("gpuaas_placement_gc_seconds",
                                      "Time the placement actor's process spent in garbage collections (every "
                                      "thread waits meanwhile), by generation", labels=["generation"])
        for g in range(3):
            gc_runs.add_metric([str(g)], gc_stats["collections"][g])
            gc_time.add_metric([str(g)], gc_stats["collection_s"][g])
        yield gc_runs
        yield gc_time
        probe = core.pauses
        yield CounterMetricFamily("gpuaas_placement_pauses",
                                  f"Times the placement actor's process ran no Python for {probe.threshold_s * 1000:.0f} ms "
                                  "or more (a collection, a call holding the interpreter, no core): every request "
                                  "in flight waited", value=probe.pauses)
        yield CounterMetricFamily("gpuaas_placement_pause_seconds", "Those pauses' length, summed",
                                  value=probe.pause_s)

        cap = {name: GaugeMetricFamily(f"gpuaas_gpu_{name}", help_, labels=["gpu_model"]) for name, help_ in (
            ("total", "GPUs in the fleet"),
            ("healthy", "GPUs in service"),
            ("allocated_milli", "GPU share allocated, in milli-GPUs"),
            ("free_milli", "GPU share free on healthy GPUs, in milli-GPUs"),
            ("stranded_milli", "Free share left on partly used GPUs (only sharing tasks can use it)"))}
        for model, total, healthy, allocated, free, stranded, _ in core.capacity_samples():
            for name, v in zip(cap, (total, healthy, allocated, free, stranded)):
                cap[name].add_metric([model], v)
        yield from cap.values()

        refs = [(i, s.snapshot.remote()) for i, s in enumerate(core.alloc_shards)]
        by_state: dict[str, int] = {}
        shard_counters = CounterMetricFamily("gpuaas_allocation_shard_events",
                                             "Allocation shard outcomes (prepared, released, failures, …)",
                                             labels=["shard", "event"])
        for i, ref in refs:
            try:
                snap = ray.get(ref, timeout=SCRAPE_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - a busy or restarting shard is left out of this scrape
                SCRAPE_ERRORS.labels(f"allocation_shard_{i}").inc()
                continue
            for state, n in snap.get("by_state", {}).items():
                by_state[state] = by_state.get(state, 0) + n
            for event, n in snap.get("stats", {}).items():
                shard_counters.add_metric([str(i), event], n)
        live = GaugeMetricFamily("gpuaas_allocations_live", "Allocations the shards hold, by state", labels=["state"])
        for state, n in sorted(by_state.items()):
            live.add_metric([state], n)
        yield live
        yield shard_counters

        ledger = self.ledger_fn() if self.ledger_fn else None
        if ledger is not None:
            try:
                lstats = ray.get(ledger.stats.remote(), timeout=SCRAPE_TIMEOUT_S)
            except Exception:  # noqa: BLE001
                SCRAPE_ERRORS.labels("ledger").inc()
            else:
                gauges = {"cursor": "Last outbox id the ledger consumed",
                          "lag_rows": "Outbox rows not yet consumed by the ledger",
                          "open_meters": "Allocations being metered now"}
                counters = CounterMetricFamily("gpuaas_ledger_events", "Ledger consumer counters", labels=["counter"])
                for k, v in sorted(lstats.items()):
                    if k in gauges or k in ("meter_interval_s", "outbox_max_id") or isinstance(v, bool) \
                            or not isinstance(v, (int, float)):
                        continue
                    counters.add_metric([k], v)
                yield counters
                for k, help_ in gauges.items():
                    if k in lstats:
                        yield GaugeMetricFamily(f"gpuaas_ledger_{k}", help_, value=lstats[k])


def serve(listen: str, collector: ControlPlaneCollector) -> tuple[str, object]:
    """Start the HTTP endpoint (``/metrics``) on ``listen`` ("host:port", port 0 picks one)."""
    REGISTRY.register(collector)
    host, port = listen.rsplit(":", 1)
    server, thread = start_http_server(int(port), addr=host.strip("[]"), registry=REGISTRY)
    bound = server.server_address[1]
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return f"{host}:{bound}", server

