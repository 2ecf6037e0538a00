"""Control-plane configuration: one typed, keyword-only object, units last."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class ControlPlaneConfig:
    listen: str = "127.0.0.1:50051"
    # Placement policy name (scheduler.PolicyName member name, case-insensitive).
    policy: str = "default"
    node_shards: int = 1
    allocation_shards: int = 2
    # Group commit: the placement actor decides and commits up to this many
    # requests per transaction; it never waits to fill a batch.
    batch_size_max: int = 4096
    place_batch_items_max: int = 10_000
    # PLACED allocations wait up to this long to be handed to their allocation shard together (one
    # actor call per shard, one PrepareBatch per node, one commit to RUNNING), counted from the first
    # that found none waiting. The answer to the client never waits for it. Larger windows make each
    # placement cheaper for the whole machine under load; 0.1 s is measured in docs/scheduler.md
    # ("Hand-off window").
    dispatch_linger_s: float = 0.1
    grpc_workers: int = 32
    # How often the placement actor checks that its database answers (runtime.Readiness); no answer for
    # two intervals and a half turns its gRPC health status NOT_SERVING until the next answer.
    readiness_probe_s: float = 1.0
    # Start even when the database would acknowledge a commit it may lose in a crash (fsync,
    # synchronous_commit or full_page_writes off: ledger.db.DURABILITY_SETTINGS). Off, such a database
    # is refused at start, since every answer of this control plane promises its commit. For
    # throwaway databases only; each problem is logged as a warning.
    allow_non_durable_database: bool = False
    # Prometheus endpoint (/metrics) of the placement actor, "host:port"; port 0 picks a free one,
    # "" turns it off. Loopback by default: expose it deliberately.
    metrics_listen: str = "127.0.0.1:0"
    grpc_message_bytes_max: int = 32 * 1024 * 1024
    telemetry_interval_ms: int = 1000
    # Node heartbeat = telemetry. Silent past grace → SUSPECT; past offline → OFFLINE.
    heartbeat_grace_s: float = 3.0
    heartbeat_offline_s: float = 10.0
    health_tick_s: float = 0.25
    prepare_attempts_max: int = 3
    release_attempts_max: int = 5
    cleanup_backoff_base_s: float = 0.2
    cleanup_backoff_max_s: float = 10.0
    rpc_timeout_s: float = 5.0
    queue_timeout_default_s: int = 3600
    lease_s_max: int = 30 * 24 * 3600
    meter_interval_s: float = 60.0
    # Node shards attribute GPU utilization and energy to the RUNNING allocations
    # and hand them to the ledger's metering at this period (the ledger closes
    # intervals this much + 1 s late, so the window covering an interval's end is in). Each window
    # costs one read of the RUNNING allocations on the shard's nodes.
    usage_window_s: float = 10.0
    allocation_tick_s: float = 0.2
    # How often the placement actor appends a capacity snapshot (ledger.capacity_samples) for analytics.
    capacity_sample_s: float = 10.0
    # How often the placement actor looks for finished allocations whose capacity it still holds (a
    # lost capacity_freed); 0 turns the pass off. Each pass after the first reads only the event log
    # since the previous ones (PlacementCore.reconcile_released).
    reconcile_s: float = 10.0
    # A GPU at or above this temperature, or in hardware thermal slowdown, is a thermal trip.
    thermal_trip_c: int = 92
