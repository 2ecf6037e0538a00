"""The control plane's Prometheus endpoint tells an operator what happened."""
from __future__ import annotations

import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import rid

RUNNING, RELEASED = 3, 5


def _scrape(cp) -> dict:
    assert cp.metrics_address, "the endpoint is on by default"
    body = urllib.request.urlopen(f"http://{cp.metrics_address}/metrics", timeout=10).read().decode()
    out: dict = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def test_calls_outcomes_capacity_and_allocations_are_scraped(control_plane, tenant):
    """After a placement, a refused call and a release, the scrape counts each by method and status code,
    times the unary ones, and shows placements, capacity per model, live allocations and the ledger."""
    before = _scrape(control_plane)
    a = tenant.place(rid(), gpu_milli=250)
    tenant.wait_state(a.allocation_id, {RUNNING}, 30)
    with pytest.raises(grpc.RpcError):
        tenant.place(rid(), gpu_count=-1)
    m = _scrape(control_plane)
    assert _value(m, "gpuaas_rpc_total", method="Place", code="OK") >= _value(
        before, "gpuaas_rpc_total", method="Place", code="OK") + 1
    assert _value(m, "gpuaas_rpc_total", method="Place", code="INVALID_ARGUMENT") >= _value(
        before, "gpuaas_rpc_total", method="Place", code="INVALID_ARGUMENT") + 1
    assert _value(m, "gpuaas_rpc_seconds_count", method="Place") >= _value(
        before, "gpuaas_rpc_seconds_count", method="Place") + 2
    assert _value(m, "gpuaas_placements_total", outcome="placed") >= _value(
        before, "gpuaas_placements_total", outcome="placed") + 1
    assert _value(m, "gpuaas_gpu_total", gpu_model="H100") > 0
    assert _value(m, "gpuaas_gpu_allocated_milli", gpu_model="H100") >= 250
    assert _value(m, "gpuaas_allocations_live", state="RUNNING") >= 1
    assert _value(m, "gpuaas_ledger_cursor") > 0
    # The allocation is RUNNING, so its hand-off is done: nothing waits (and the gauge is there).
    assert ("gpuaas_handoffs_waiting", ()) in m and _value(m, "gpuaas_handoffs_waiting") == 0
    # The committer's time by stage: the placement was decided and committed, so both have run.
    assert _value(m, "gpuaas_placement_stage_seconds_total", stage="decide", clock="cpu") > 0
    assert _value(m, "gpuaas_placement_stage_seconds_total", stage="commit", clock="wall") > 0
    # The intake: nothing waits once the placement is answered, and nothing was refused.
    assert ("gpuaas_intake_requests_waiting", ()) in m and ("gpuaas_intake_tenants_waiting", ()) in m
    assert _value(m, "gpuaas_intake_refused_total", bound="tenant") == 0
    # The database answers: ready (the health status is SERVING).
    assert m[("gpuaas_ready", ())] == 1 and ("gpuaas_readiness_changes_total", ()) in m
    # The embedded database makes commits durable before they are acknowledged.
    assert m[("gpuaas_database_durable", ())] == 1
    # The process by thread: the committer and writer threads have used CPU, and nothing is negative.
    threads = {dict(k[1])["thread"]: v for k, v in m.items() if k[0] == "gpuaas_placement_thread_cpu_seconds_total"}
    assert {"placement-committer", "placement-writer", "MainThread"} <= set(threads)
    assert all(v >= 0 for v in threads.values()) and sum(threads.values()) > 0
    # Each group commit of new allocations is timed: this one's commit is in the histogram.
    assert _value(m, "gpuaas_placement_commit_seconds_count") >= _value(before, "gpuaas_placement_commit_seconds_count") + 1
    assert _value(m, "gpuaas_placement_commit_seconds_sum") > _value(before, "gpuaas_placement_commit_seconds_sum")
    # The placement actor's process has run young-generation collections by now (it has decoded,
    # decided and committed requests), and its pacer has not let the interpreter start a full one.
    assert _value(m, "gpuaas_placement_gc_collections_total", generation="0") > 0
    assert ("gpuaas_placement_gc_seconds_total", (("generation", "2"),)) in m
    # Whole-process pauses of the placement actor (runtime.PauseProbe), counted and summed.
    assert ("gpuaas_placement_pauses_total", ()) in m and ("gpuaas_placement_pause_seconds_total", ()) in m
    # The shards' calls to the daemons: its Prepare went in a PrepareBatch.
    assert _shard_events(m, "prepare_calls") >= _shard_events(before, "prepare_calls") + 1
    tenant.release(a.allocation_id)
    tenant.wait_state(a.allocation_id, {RELEASED}, 30)
    m = _scrape(control_plane)
    assert _value(m, "gpuaas_rpc_total", method="Release", code="OK") >= 1
    # It was prepared, so its Cleanup went out (in a CleanupBatch), and it counts as released.
    assert _shard_events(m, "cleanup_calls") >= _shard_events(before, "cleanup_calls") + 1
    assert _shard_events(m, "released") >= _shard_events(before, "released") + 1
    # Releases the placement actor settled before their hand-off (none of this test's: it ran first).
    assert ("gpuaas_releases_before_handoff_total", ()) in m
    assert _value(m, "gpuaas_releases_before_handoff_total") >= _value(before, "gpuaas_releases_before_handoff_total")


def _shard_events(m: dict, event: str) -> float:
    return sum(v for (name, labels), v in m.items()
               if name == "gpuaas_allocation_shard_events_total" and ("event", event) in labels)


def test_every_component_names_its_postgres_connections(control_plane):
    """pg_stat_activity tells an operator which component holds each connection (a lock, a slow
    statement): every actor sets application_name for the connections its process opens."""
    import psycopg

    with psycopg.connect(control_plane.urls.owner, autocommit=True) as conn:
        names = {r[0] for r in conn.execute("SELECT application_name FROM pg_stat_activity"
                                            " WHERE usename = 'gpuaas_app'")}
    expected = {"gpuaas-placement", "gpuaas-ledger", "gpuaas-node-shard-0"} | {
        f"gpuaas-allocation-shard-{i}" for i in range(control_plane.cfg.allocation_shards)}
    assert expected <= names, f"missing {sorted(expected - names)}; seen {sorted(names)}"


def test_admin_health_is_a_probe(control_plane):
    """`gpuaas admin health`: the control plane's gRPC health status, no token needed; exit 0 while it
    is SERVING, 1 for anything else, including nothing listening at the address."""
    import socket
    import subprocess
    import sys

    def run(address: str):
        p = subprocess.run([sys.executable, "-m", "gpuaas.cli", "admin", "health", "--address", address],
                           capture_output=True, text=True, timeout=60)
        return p.returncode, p.stdout.strip()

    assert run(control_plane.address) == (0, f"{control_plane.address}: SERVING")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    code, out = run(dead)
    assert code == 1 and out == f"{dead}: UNAVAILABLE"
